"""Optimizer from config; lazy per-row updates of [K, ...] leaves.

Gradients only for trainables: the trainer splits the parameters by regex (`models.trainable`),
takes `value_and_grad` over the trainable tree and builds optimizer state only for it.

Per-cluster isolation: `update(grads, state, params, present=bool[K])` leaves the rows of
cluster-stacked leaves (`cluster_stacked_pattern`, leading axis K) whose cluster is absent from the
global batch bitwise unchanged: zero update (-0.0, so `p + u == p` bit for bit even for p = -0.0)
and the optimizer state (Adam mu/nu, momentum) kept via `where(present, new, old)`. This is lazy
Adam in the TF LazyAdam sense: the step count (bias correction) stays global. Clipping cannot leak
into absent rows: their gradients are exactly zero, so they add nothing to the global norm, and
their scaled update is discarded anyway. Weight decay is off for adapter leaves
(`no_decay_pattern`) and 1-D leaves (biases, norms).

Paths are the '/'-joined dict keys of a leaf ('blocks_0/ff/adapter/down'); patterns are
`re.fullmatch`ed against them. Parameter trees must be unboxed (`nn.unbox`).
"""
import re

import jax
import jax.numpy as jnp
import optax

NAMES = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
DEFAULTS = dict(
    name="adamw",
    learning_rate=1e-4,
    schedule="constant",  # 'constant' (linear warmup if warmup_steps), 'cosine', 'warmup_cosine'.
    warmup_steps=0,
    total_steps=0,  # Needed by the cosine schedules; make_optimizer's argument overrides it.
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    momentum=0.0,  # sgd only.
    weight_decay=0.0,  # Decoupled (adamw / sgd); never on adapters or 1-D leaves.
    grad_clip=1.0,  # Global-norm clipping; 0 = off.
    no_decay_pattern=r"(.*/)?(adapter/.*|lora_(a|b))",
    cluster_stacked_pattern=r"(.*/)?adapter/(down|down_bias|up|up_bias)",
)


# ---------------------------------------------------------------------------------------------
# Optimizer.

class Optimizer(optax.GradientTransformationExtraArgs):
  """An optax transformation with `learning_rate_fn(step)` attached (for logging)."""


def _settings(config, total_steps, method):
  given = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown optimizer config field(s) {unknown}; known: {sorted(DEFAULTS)}")
  s = {**DEFAULTS, **given}
  if total_steps is not None:
    s["total_steps"] = int(total_steps)
  if s["name"] not in NAMES:
    raise ValueError(f"optim.name={s['name']!r} is not one of {NAMES}")
  if s["schedule"] not in SCHEDULES:
    raise ValueError(f"optim.schedule={s['schedule']!r} is not one of {SCHEDULES}")
  if s["name"] == "adam" and s["weight_decay"]:
    raise ValueError(f"optim.name='adam' has no weight decay (weight_decay="
                     f"{s['weight_decay']}); use 'adamw'")
  if s["schedule"] == "cosine" and s["warmup_steps"]:
    raise ValueError("optim.schedule='cosine' has no warmup; use 'warmup_cosine' or set "
                     "optim.warmup_steps=0")
  if s["schedule"] != "constant" and s["total_steps"] <= s["warmup_steps"]:
    raise ValueError(f"optim.schedule={s['schedule']!r} needs total_steps > warmup_steps, got "
                     f"total_steps={s['total_steps']}, warmup_steps={s['warmup_steps']}")
  # Rows are tied to clusters only for GRASP; MoE experts (same names) are not.
  if method is not None and method.get("adapter", method.get("name")) != "grasp":
    s["cluster_stacked_pattern"] = None
  return s


def learning_rate_fn(config, total_steps=None):
  """The learning-rate schedule `step -> lr` of an optimizer config (fields: see DEFAULTS)."""
  s = _settings(config, total_steps, None)
  lr, warmup = s["learning_rate"], s["warmup_steps"]
  if s["schedule"] == "cosine":
    return optax.cosine_decay_schedule(lr, s["total_steps"])
  if s["schedule"] == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, s["total_steps"])
  return optax.warmup_constant_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)


def make_optimizer(config, total_steps=None, method=None):
  """optax transformation from an optimizer ConfigDict (fields and defaults: DEFAULTS).

  total_steps: overrides config.total_steps (the trainer passes config.train.steps).
  method: the method ConfigDict; lazy per-row updates only apply to method.adapter == 'grasp'
    (without it, to every leaf matching config.cluster_stacked_pattern).
  Returns an `Optimizer` whose update(grads, state, params, present=None) takes `present`, a
  bool [K] of the clusters in the global batch (None: plain update of every row).
  """
  s = _settings(config, total_steps, method)
  schedule = learning_rate_fn(config, total_steps)
  parts = []
  if s["grad_clip"]:
    parts.append(optax.clip_by_global_norm(s["grad_clip"]))
  if s["name"] in ("adam", "adamw"):
    parts.append(optax.scale_by_adam(b1=s["b1"], b2=s["b2"], eps=s["eps"]))
  elif s["momentum"]:
    parts.append(optax.trace(decay=s["momentum"]))
  if s["weight_decay"]:
    no_decay = re.compile(s["no_decay_pattern"])
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda kp, p: p.ndim >= 2 and not no_decay.fullmatch(_path(kp)), params)
    parts.append(optax.add_decayed_weights(s["weight_decay"], mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = _lazy_rows(optax.chain(*parts), s["cluster_stacked_pattern"])
  opt = Optimizer(tx.init, tx.update)
  opt.learning_rate_fn = schedule
  return opt


def _key_name(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path(key_path):
  return "/".join(_key_name(k) for k in key_path)


def _lazy_rows(inner, pattern):
  """Wraps `inner` so absent rows of cluster-stacked leaves keep params and state (see top)."""
  regex = re.compile(pattern) if pattern else None

  def update(updates, state, params=None, *, present=None, **extra_args):
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    if present is None or regex is None:
      return new_updates, new_state
    present = jnp.asarray(present).astype(bool)
    rows = {}  # Param key-name path -> (row mask broadcastable to the leaf, leaf shape).
    for kp, g in jax.tree_util.tree_flatten_with_path(updates)[0]:
      if regex.fullmatch(_path(kp)):
        if g.ndim == 0 or g.shape[0] != present.shape[0]:
          raise ValueError(f"cluster-stacked leaf {_path(kp)} has shape {g.shape}, expected a "
                           f"leading axis K={present.shape[0]} (len(present))")
        rows[tuple(_key_name(k) for k in kp)] = (
            present.reshape((-1,) + (1,) * (g.ndim - 1)), g.shape)
    if not rows:
      return new_updates, new_state
    lengths = {len(p) for p in rows}

    def row_mask(kp, leaf):
      # Param-shaped state (mu, nu, trace) mirrors the param tree: its key path ends with the
      # param's path.
      names = tuple(_key_name(k) for k in kp)
      for n in lengths:
        hit = rows.get(names[-n:]) if len(names) >= n else None
        if hit is not None and hit[1] == jnp.shape(leaf):
          return hit[0]
      return None

    def keep_updates(kp, u):
      m = row_mask(kp, u)
      return u if m is None else jnp.where(m, u, jnp.asarray(-0.0, u.dtype))

    def keep_state(kp, new, old):
      m = row_mask(kp, new)
      return new if m is None else jnp.where(m, new, old)

    return (jax.tree_util.tree_map_with_path(keep_updates, new_updates),
            jax.tree_util.tree_map_with_path(keep_state, new_state, state))

  return optax.GradientTransformationExtraArgs(inner.init, update)
