"""The end of a training run: a before/after grid of the tail classes and a five-second summary.

  WORKDIR/plots/before_after_tail.png   the zero-step model (the base: adapters start as the
                                        identity) and the trained model on the tail classes,
                                        same seeds, side by side
  results.json[<final step>]["summary"] sample_accuracy (overall, tail), evaluator_accuracy_real,
                                        headline metrics with intervals, seconds, paths
"""
import os

import jax
import numpy as np

from grasp_jax import files
from grasp_jax.evaluation import plots
from grasp_jax.inference import generate
from grasp_jax.task import experiment
from grasp_jax.trainer import loop

TAIL = "frequency/tail"


def zero_step_params(exp, mesh):
  """(params, extra) of the model before the first step, exactly as the trainer starts: same
  rng, frozen dtype and shardings, so sampling it reuses the trained model's compiled sampler."""
  variables = loop.initial_variables(exp, exp.config, mesh)
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def before_after_grid(exp, trained, workdir, *, mesh, per_class=8):
  """Writes WORKDIR/plots/before_after_tail.png; returns its path."""
  names = exp.partition.class_names
  tail = experiment.eval_groups(exp)[TAIL]
  labels = np.repeat(np.asarray(tail, np.int64), per_class)
  rng = jax.random.key(exp.config.seed + 7)
  rows = []
  for title, (params, extra) in (("zero-step base", zero_step_params(exp, mesh)),
                                 ("after fine-tuning", trained)):
    images = generate.to_uint8(generate.sample_labels(exp, params, extra, labels, rng, mesh=mesh))
    rows.append(plots.labelled_class_grid(images, labels, tail, names, per_row=per_class,
                                          title=f"{title}: tail classes, same seeds"))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  path = os.path.join(workdir, "plots", "before_after_tail.png")
  if jax.process_index() == 0:
    plots.save_png(path, np.concatenate(rows, axis=0))
  return path


def _value(entry, *keys):
  for k in keys:
    entry = (entry or {}).get(k)
  return entry


def summarize(workdir, step, seconds, grid_path):
  """Adds `summary` to results.json[step] and returns the lines to print."""
  path = os.path.join(workdir, "results.json")
  data = files.read_json(path)
  r = data[str(step)]
  acc = r["accuracy"]
  summary = {
      "sample_accuracy": _value(acc, "all", "conditional_accuracy", "value"),
      "sample_accuracy_tail": _value(acc, "groups", TAIL, "conditional_accuracy", "value"),
      "evaluator_accuracy_real": r["evaluator"]["accuracy"],
      "evaluator_ok": r["evaluator"]["ok"],
      "tail": {m: _value(r, block, "groups", TAIL, m) for block, m in
               (("domain", "fd"), ("domain", "coverage"), ("retrieval", "irs"),
                ("retrieval", "memorization"), ("accuracy", "conditional_accuracy"))},
      "seconds": float(seconds), "before_after_grid": grid_path,
      "samples": os.path.join(workdir, "samples"), "results": path}
  r["summary"] = summary
  if jax.process_index() == 0:
    files.write_json(path, data)
  num = lambda x: "n/a" if x is None else f"{x:.3f}"  # None: undefined (no images to score).
  fmt = lambda e: "n/a" if not e else f"{num(e['value'])} [{num(e['lo'])}, {num(e['hi'])}]"
  return [
      f"done in {seconds / 60:.1f} min; outputs in {workdir}",
      f"sample accuracy (frozen evaluator): all {num(summary['sample_accuracy'])}, tail "
      f"{num(summary['sample_accuracy_tail'])}; evaluator on real test images "
      f"{num(summary['evaluator_accuracy_real'])}"
      + ("" if summary["evaluator_ok"] else " (below eval.evaluator_floor: flagged)"),
      "tail: " + ", ".join(f"{m} {fmt(e)}" for m, e in summary["tail"].items()),
      f"before/after grid: {grid_path}"]
