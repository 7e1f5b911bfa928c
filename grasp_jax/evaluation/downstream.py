"""Downstream classifier protocol: does adding synthetic images help a classifier of real ones?

Five classifiers of one architecture and budget, each early-stopped on the macro-F1 of a
validation set, are tested on real test images disjoint from the generative evaluation's
reference set:

  real             the real training images, rows drawn uniformly (natural frequency)
  real_balanced    the same, class-balanced resampling: the control for the rebalancing that
                   adding class-balanced synthetic images also brings
  real+heldout     real + as many held-out real images per class as there are synthetic ones:
                   the control for adding images at all (an ideal generator's value)
  real+synthetic   real + the synthetic images (rows of the union drawn uniformly, as above)
  synthetic        the synthetic images only

Reported: accuracy, macro-F1, balanced accuracy and the number of classes with nonzero F1, with
95% bootstrap intervals over test images (within class), per group too, and per-class F1. The
first three do not depend on the generator (`GENERATOR_FREE`): callers cache them.
"""
import time

from absl import logging
import numpy as np

from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import intervals

VARIANTS = ("real", "real_balanced", "real+heldout", "real+synthetic", "synthetic")
GENERATOR_FREE = VARIANTS[:3]
METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "nonzero_f1_classes")


def training_sets(real, heldout, synthetic):
  """{variant: (images, labels, balanced)} from (images, labels) pairs; `synthetic` may be None
  (only the generator-free variants)."""
  cat = lambda a, b: (np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
  out = {"real": (*real, False), "real_balanced": (*real, True),
         "real+heldout": (*cat(real, heldout), False)}
  if synthetic is not None:
    out["real+synthetic"] = (*cat(real, synthetic), False)
    out["synthetic"] = (*synthetic, False)
  return out


def scores(labels, preds, num_classes, groups, names, *, n_boot, seed=0):
  """classification_metrics with {value, lo, hi} for METRICS overall and per group (95%
  bootstrap over test images within class)."""
  point = classifier.classification_metrics(labels, preds, num_classes, groups, names)

  def fn(y, p):
    m = classifier.classification_metrics(y, p, num_classes, groups)
    return {(metric, g): (m["groups"][g] if g else m)[metric] for metric in METRICS
            for g in (None, *groups)}
  est = intervals.bootstrap_many(fn, [(labels, preds)], strata=[labels], n_boot=n_boot, seed=seed)
  out = {m: est[(m, None)] for m in METRICS}
  out["per_class_f1"], out["per_class_recall"] = point["per_class_f1"], point["per_class_recall"]
  out["groups"] = {g: {"num_classes": point["groups"][g]["num_classes"],
                       "num_samples": point["groups"][g]["num_samples"],
                       **{m: est[(m, g)] for m in METRICS}} for g in groups}
  return out


def run(model_fn, sets, validation, test, groups, names, *, steps, batch_size, validate_every,
        patience, seed=0, n_boot=200):
  """Trains one classifier per entry of `sets` (`training_sets`) and scores it on `test`.

  model_fn: () -> a fresh network (networks.DenseNet or CNN); validation, test: (images,
  labels) of real images. Returns {variant: scores + training record}.
  """
  out = {}
  for variant, (images, labels, balanced) in sets.items():
    start = time.perf_counter()
    clf = classifier.train(model_fn(), images, labels, steps=steps, batch_size=batch_size,
                           seed=seed, balanced=balanced, validation=validation,
                           validate_every=validate_every, patience=patience,
                           prefix=f"downstream/{variant}")
    logging.info("downstream classifier (%s) trained in %.1f s (%d steps, best at %s)", variant,
                 time.perf_counter() - start, clf.history["steps_run"],
                 clf.history.get("best_step"))
    out[variant] = {
        "n_train": int(len(labels)),
        "n_train_per_class": np.bincount(labels, minlength=len(names)).tolist(),
        "balanced": balanced, "steps_run": clf.history["steps_run"],
        "best_step": clf.history.get("best_step"),
        "val_macro_f1": clf.history.get("best_val_macro_f1"),
        **scores(test[1], clf.predict(test[0]), len(names), groups, names, n_boot=n_boot,
                 seed=seed)}
  return out
