"""Evaluation blocks: metrics per class, per group and overall, from arrays (images, features,
predictions, labels) and the partition's groups; the CLU scalars and plots of one evaluation.

Groups (`eval_groups`): `cluster/<name>` for every partition cluster, and `frequency/<name>`,
which depend on the data alone, not on the run's partition, so that runs of different methods on
one dataset are compared on the same classes: the healthy class apart (when it is a class), the
others in head/medium/tail by training count (terciles, or the partition config's thresholds).
"""
import math

import numpy as np

from grasp_jax import partition as partition_lib
from grasp_jax.evaluation import estimates
from grasp_jax.evaluation import metrics
from grasp_jax.evaluation import plots

SCALAR_METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")


def eval_groups(part, healthy, thresholds=None):
  """{'cluster/<name>': class indices, 'frequency/<name>': class indices} (module docstring).

  healthy: the healthy class's name (apart when it is one of the classes); thresholds: the
  frequency boundaries (config.partition.thresholds), or None for terciles.
  """
  groups = {f"cluster/{name}": [i for i, c in enumerate(part.class_to_cluster) if c == k]
            for k, name in enumerate(part.cluster_names)}
  apart = int(healthy in part.class_names and part.num_classes > 1)
  freq = partition_lib.build_partition(
      part.class_names, part.class_counts, strategy="healthy+frequency" if apart else "frequency",
      k=None if thresholds else min(3, part.num_classes - apart) + apart, thresholds=thresholds,
      healthy=healthy)
  for k, name in enumerate(freq.cluster_names):
    groups[f"frequency/{name}"] = [i for i, c in enumerate(freq.class_to_cluster) if c == k]
  return groups


def _per_entry(fn, groups, order, names):
  """{"classes": {name: fn([c])} head to tail, "groups": {g: {"classes", **fn(members)}},
  "all": fn(order)}."""
  return {"classes": {names[c]: fn([c]) for c in order},
          "groups": {g: {"classes": [names[c] for c in m], **fn(list(m))}
                     for g, m in groups.items()},
          "all": fn(list(order))}


def _sample_metrics(real, real_y, fake, fake_y, n_boot, seed):
  return {"fd": estimates.fd(real, real_y, fake, fake_y, n_boot=n_boot, seed=seed),
          "kid": estimates.kid(real, real_y, fake, fake_y, n_boot=n_boot, seed=seed),
          **estimates.prdc(real, real_y, fake, fake_y, n_boot=n_boot, seed=seed)}


def feature_block(real, real_y, fake, fake_y, twin, twin_y, groups, order, names, info, *,
                  n_boot, seed=0):
  """FD, KID, precision/recall/density/coverage (k=5) of the samples against the reference real
  images per class, per group and overall, each {value, lo, hi}; "floor": the same metrics of
  the real twin (held-out real images, as many per class as samples) against the reference."""
  def entry(members):
    r, f, t = (np.isin(y, members) for y in (real_y, fake_y, twin_y))
    return {"n_real": int(r.sum()), "n_fake": int(f.sum()), "n_twin": int(t.sum()),
            **_sample_metrics(real[r], real_y[r], fake[f], fake_y[f], n_boot, seed),
            "floor": _sample_metrics(real[r], real_y[r], twin[t], twin_y[t], n_boot, seed)}
  return {"features": info, "n_boot": n_boot, **_per_entry(entry, groups, order, names)}


def retrieval_block(train, train_y, real_y, real_nn, fake, fake_y, fake_nn, twin, twin_y, twin_nn,
                    groups, order, names, *, n_boot, seed=0, percentile=5.0):
  """IRS (metrics.irs against the training images of the entry's classes) and the memorisation
  rate (nearest-training-image distances `*_nn` to the whole train set, below the `percentile`-th
  percentile of the entry's reference images' ones), with the real twin's values as floors."""
  def irs(x, y, members):
    m, pool = np.isin(y, members), np.isin(train_y, members)
    if not m.any() or not pool.any():  # No samples, or a class without training images.
      return None
    r = metrics.irs(train[pool], x[m])
    return {"value": r.pop("irs"), "lo": r.pop("irs_lo"), "hi": r.pop("irs_hi"), **r}

  def memorization(distance, y, members, threshold):
    rows = (distance[np.isin(y, members)] < threshold).astype(np.float64)
    return {**estimates.mean(rows, y[np.isin(y, members)], n_boot=n_boot, seed=seed),
            "n": int(len(rows))}

  def entry(members):
    reference = real_nn[np.isin(real_y, members)]
    threshold = float(np.percentile(reference, percentile)) if len(reference) else math.nan
    return {"irs": irs(fake, fake_y, members),
            "memorization": {**memorization(fake_nn, fake_y, members, threshold),
                             "threshold": threshold},
            "floor": {"irs": irs(twin, twin_y, members),
                      "memorization": memorization(twin_nn, twin_y, members, threshold)}}
  return {"percentile": percentile, "n_train": int(len(train_y)),
          **_per_entry(entry, groups, order, names)}


def _mean(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else math.nan


def ms_ssim_block(real, real_y, fake, fake_y, groups, order, names):
  """Intra-class mean pairwise MS-SSIM; groups and 'all' average their classes. NaN below 2
  images or below the 11-px SSIM window."""
  def value(images):
    if len(images) < 2 or min(images.shape[1:3]) < 11:
      return math.nan
    return metrics.mean_pairwise_ms_ssim(images)
  per_class = {c: {"n_fake": int(np.sum(fake_y == c)), "ms_ssim": value(fake[fake_y == c]),
                   "n_real": int(np.sum(real_y == c)), "ms_ssim_real": value(real[real_y == c])}
               for c in order}
  def pooled(members):
    members = [c for c in members if c in per_class]
    return {"classes": [names[c] for c in members],
            "ms_ssim": _mean([per_class[c]["ms_ssim"] for c in members]),
            "ms_ssim_real": _mean([per_class[c]["ms_ssim_real"] for c in members])}
  return {"resolution": int(fake.shape[1]), "max_val": 255,
          "classes": {names[c]: v for c, v in per_class.items()},
          "groups": {g: pooled(m) for g, m in groups.items()}, "all": pooled(order)}


def accuracy_block(pred_fake, fake_y, pred_twin, twin_y, pred_real, real_y, groups, order,
                   names, *, n_boot, seed=0):
  """The evaluator's "conditional_accuracy" (a sample is classified as its prompt's class) with
  the real twin's accuracy as "floor", and its "accuracy_real" on all held-out real images of
  the evaluation (reference and twin), each {value, lo, hi} with N."""
  def accuracy(pred, y, members):
    m = np.isin(y, members)
    return {**estimates.mean(pred[m] == y[m], y[m], n_boot=n_boot, seed=seed), "n": int(m.sum())}
  both, both_y = np.concatenate([pred_real, pred_twin]), np.concatenate([real_y, twin_y])
  return _per_entry(lambda m: {"conditional_accuracy": accuracy(pred_fake, fake_y, m),
                               "floor": {"conditional_accuracy": accuracy(pred_twin, twin_y, m)},
                               "accuracy_real": accuracy(both, both_y, m)}, groups, order, names)


def _entries(block):
  return [*block["groups"].items(), ("all", block["all"])]


def scalars(results):
  """The CLU scalars of one evaluation: values ("<metric>") and floors ("<metric>_floor") per
  group and overall (finite values only)."""
  out = {}
  value = lambda e: None if e is None else e["value"]
  for space in ("domain", "inception"):
    for g, entry in _entries(results[space]) if space in results else ():
      for m in SCALAR_METRICS:
        out[f"eval/{space}/{g}/{m}"] = value(entry[m])
        out[f"eval/{space}/{g}/{m}_floor"] = value(entry["floor"][m])
  for block, metrics_ in (("retrieval", ("irs", "memorization")),
                          ("accuracy", ("conditional_accuracy",))):
    for g, entry in _entries(results[block]):
      for m in metrics_:
        out[f"eval/{m}/{g}"] = value(entry[m])
        out[f"eval/{m}/{g}_floor"] = value(entry["floor"][m])
  out["eval/evaluator/accuracy"] = results["evaluator"]["accuracy"]
  for g, entry in _entries(results["ms_ssim"]):
    out[f"eval/ms_ssim/{g}"] = entry["ms_ssim"]
  for variant, d in results["downstream"]["variants"].items() if "downstream" in results else ():
    for m in ("macro_f1", "balanced_accuracy", "nonzero_f1_classes"):
      out[f"eval/downstream/{variant}/{m}"] = d[m]["value"]
    for g, entry in d["groups"].items():
      out[f"eval/downstream/{variant}/{g}/macro_f1"] = entry["macro_f1"]["value"]
  return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def plot_images(results, fake, fake_y, order, names, step):
  """{name: uint8 image}: metrics per class (head to tail), each beside its real-twin floor, and
  a labelled sample grid."""
  labels = [names[c] for c in order]
  def get(block, key, floor=False):
    entries = [block["classes"][n] for n in labels]
    return [(e["floor"] if floor else e)[key]["value"] for e in entries]
  out = {}
  for space in ("domain", "inception"):
    for metric in ("fd", "coverage") if space in results else ():
      out[f"{metric}_{space}"] = plots.per_class_bars(
          {"samples": get(results[space], metric), "real twin (floor)":
           get(results[space], metric, floor=True)}, labels,
          f"{metric} per class ({space} features), step {step}", metric)
  acc = results["accuracy"]
  out["conditional_accuracy"] = plots.per_class_bars(
      {"samples": get(acc, "conditional_accuracy"),
       "real twin (floor)": get(acc, "conditional_accuracy", floor=True)}, labels,
      f"evaluator accuracy on samples of each class, step {step}", "accuracy")
  out["ms_ssim"] = plots.per_class_bars(
      {"samples": [results["ms_ssim"]["classes"][n]["ms_ssim"] for n in labels],
       "real": [results["ms_ssim"]["classes"][n]["ms_ssim_real"] for n in labels]}, labels,
      f"intra-class MS-SSIM (lower = more diverse), step {step}", "MS-SSIM")
  if "downstream" in results:
    variants = results["downstream"]["variants"]
    out["downstream_f1"] = plots.per_class_bars(
        {v: [d["per_class_f1"][n] for n in labels] for v, d in variants.items()}, labels,
        f"downstream classifier F1 per class, step {step}", "F1")
  out["samples"] = plots.labelled_class_grid(fake, fake_y, order, names,
                                             title=f"samples, step {step}")
  return out
