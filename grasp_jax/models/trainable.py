"""Trainable / frozen parameters: which leaves a method trains, chosen by regex on their paths.

`split` the parameters, take gradients and optimizer state for the trainable tree only, `merge`
them back for the forward pass (training, sampling, export). Paths are the '/'-joined dict keys
of a leaf ('blocks_0/ff/adapter/down'); patterns are `re.fullmatch`ed against them. Trees must be
unboxed (`nn.unbox`).
"""
import re

from flax import traverse_util


def _compile(patterns):
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  try:
    return [re.compile(p) for p in patterns]
  except re.error as e:
    raise ValueError(f"bad trainable pattern in {patterns}: {e}") from None


def _flat_selection(params, patterns):
  regs = _compile(patterns)
  flat = traverse_util.flatten_dict(params)
  chosen = {path: any(r.fullmatch("/".join(map(str, path))) for r in regs) for path in flat}
  if not any(chosen.values()):
    examples = ["/".join(map(str, p)) for p in list(flat)[:5]]
    raise ValueError(f"trainable patterns {patterns} match no parameter; paths look like "
                     f"{examples}")
  return flat, chosen


def trainable_mask(params, patterns):
  """Pytree of bools (params' structure): True where the path fullmatches one of `patterns`."""
  _, chosen = _flat_selection(params, patterns)
  return traverse_util.unflatten_dict(chosen)


def split(params, patterns):
  """(trainable, frozen): the leaves whose path matches one of `patterns`, and the rest."""
  flat, chosen = _flat_selection(params, patterns)
  trainable = {p: v for p, v in flat.items() if chosen[p]}
  frozen = {p: v for p, v in flat.items() if not chosen[p]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
  """Inverse of `split`."""
  flat_t, flat_f = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
  both = flat_t.keys() & flat_f.keys()
  if both:
    raise ValueError(f"merge: leaves both trainable and frozen: {sorted(both)[:3]}")
  return traverse_util.unflatten_dict({**flat_f, **flat_t})
