"""Paired run-vs-run comparison from two evaluations' saved features.

  compare.paired("runs/grasp_s0", "runs/full_s0", "fd", "frequency/tail")
  -> {"diff": a - b, "lo", "hi", "verdict": "better" | "worse" | "inconclusive", ...}

Each run's evaluation wrote WORKDIR/eval/step_<n>/features.npz (per sample: evaluator features,
label, predicted class, distance to the nearest training image) and eval/reference_<key>.npz.
Two runs sampled with the same seed draw sample i from the same initial noise
(normal(fold_in(rng, i)), grasp_jax.inference.generate), so sample i of a and sample i of b are a
pair: rows are resampled with shared indices and the noise they share cancels in the difference
(intervals.paired_difference). Both runs must have been measured with the same evaluator, on the
same reference images, with the same labels in the same order.

Metrics (`DIRECTION`): "fd", "kid" on the features; "precision", "density" (per sample given the
reference), "recall", "coverage" (per reference image given the samples, paired over reference
images); "memorization" (nearest-training distance below the reference's 5th percentile);
"conditional_accuracy". IRS has no paired form (resampling invents collisions).
"""
import io
import json
import os

import numpy as np

from grasp_jax.evaluation import estimates
from grasp_jax.evaluation import intervals
from grasp_jax.evaluation import metrics

DIRECTION = {"fd": False, "kid": False, "precision": True, "recall": True, "density": True,
             "coverage": True, "memorization": False, "conditional_accuracy": True}


def _load(path):
  with open(path, "rb") as f:
    with np.load(io.BytesIO(f.read())) as z:
      out = {k: z[k] for k in z.files}
  out["meta"] = json.loads(str(out["meta"]))
  return out


def steps(workdir):
  """The steps with saved features in WORKDIR/eval, ascending."""
  folder = os.path.join(workdir, "eval")
  return sorted(int(n[5:]) for n in os.listdir(folder)
                if n.startswith("step_") and os.path.exists(os.path.join(folder, n,
                                                                         "features.npz")))


def load_run(workdir, step=None):
  """(samples, reference) arrays of one evaluation (the latest step by default)."""
  step = steps(workdir)[-1] if step is None else step
  samples = _load(os.path.join(workdir, "eval", f"step_{int(step):06d}", "features.npz"))
  reference = _load(os.path.join(workdir, "eval", samples["meta"]["reference"]))
  return samples, reference


def _members(meta, group):
  names = meta["class_names"]
  if group == "all":
    return list(range(len(names)))
  if group in meta["groups"]:
    return [names.index(n) for n in meta["groups"][group]]
  if group in names:
    return [names.index(group)]
  raise ValueError(f"unknown group {group!r}: 'all', a group of {sorted(meta['groups'])} or a "
                   f"class of {names}")


def _check_paired(a, b, ref_a, ref_b):
  if a["meta"]["evaluator_sha1"] != b["meta"]["evaluator_sha1"]:
    raise ValueError("the runs were measured with different evaluators")
  if a["meta"]["reference"] != b["meta"]["reference"] or not np.array_equal(
      ref_a["labels"], ref_b["labels"]):
    raise ValueError("the runs were measured against different reference images")
  if not np.array_equal(a["labels"], b["labels"]):
    raise ValueError("the runs' samples have different labels or order: not paired")
  if a["meta"]["seed"] != b["meta"]["seed"]:
    raise ValueError(f"seeds {a['meta']['seed']} and {b['meta']['seed']} differ: samples are "
                     f"paired only when drawn from the same noise")


def paired(results_dir_a, results_dir_b, metric, group="all", *, step=None, n_boot=1000, seed=0,
           level=0.95):
  """metric(a) - metric(b) on `group` ('all', a group such as 'frequency/tail', or a class name),
  with its paired bootstrap interval and verdict for a (module docstring).

  Returns {"metric", "group", "diff", "lo", "hi", "verdict", "n" (paired rows), "n_boot", "step"}.
  """
  if metric not in DIRECTION:
    raise ValueError(f"metric {metric!r}; expected one of {sorted(DIRECTION)}")
  a, ref = load_run(results_dir_a, step)
  b, ref_b = load_run(results_dir_b, step)  # Each run's latest (a zero-step base has step 0).
  _check_paired(a, b, ref, ref_b)
  members = _members(a["meta"], group)
  s, r = np.isin(a["labels"], members), np.isin(ref["labels"], members)
  sample_y, ref_y = a["labels"][s], ref["labels"][r]
  fa, fb = (x["features"][s].astype(np.float64) for x in (a, b))
  fr = ref["features"][r].astype(np.float64)
  kwargs = dict(higher_is_better=DIRECTION[metric], n_boot=n_boot, seed=seed, level=level)

  if metric == "fd":
    out = intervals.paired_difference(metrics.fid, fr, fa, fb, strata=(ref_y, sample_y), **kwargs)
  elif metric == "kid":
    # Indices into [a; b] so one closure serves both runs; estimates.kid drops tied pairs.
    n = len(fa)
    out = intervals.paired_difference(estimates.kid_fn(fr, np.concatenate([fa, fb])),
                                      np.arange(len(fr)), np.arange(n), n + np.arange(n),
                                      strata=(ref_y, sample_y), **kwargs)
  elif metric in ("precision", "density", "recall", "coverage"):
    if min(len(fr), len(fa)) <= estimates.PRDC_K:  # No k-NN balls in a group this small.
      return {"metric": metric, "group": group, "step": a["meta"]["step"], "diff": None,
              "lo": None, "hi": None, "verdict": "inconclusive", "n": len(fa)}
    rows_a, rows_b = (estimates.prdc_rows(fr, f)[metric] for f in (fa, fb))
    labels = sample_y if metric in ("precision", "density") else ref_y
    out = intervals.paired_difference(np.mean, None, rows_a, rows_b, strata=(None, labels),
                                      **kwargs)
  elif metric == "memorization":
    rows_a, rows_b = (estimates.memorization_rows(ref["nn_distance"][r], x["nn_distance"][s])[0]
                      for x in (a, b))
    out = intervals.paired_difference(np.mean, None, rows_a, rows_b, strata=(None, sample_y),
                                      **kwargs)
  else:
    rows_a, rows_b = ((x["pred"][s] == sample_y).astype(np.float64) for x in (a, b))
    out = intervals.paired_difference(np.mean, None, rows_a, rows_b, strata=(None, sample_y),
                                      **kwargs)
  return {"metric": metric, "group": group, "step": a["meta"]["step"], **out}
