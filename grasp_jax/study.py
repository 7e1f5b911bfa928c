r"""The reproduction study: every method on both backbones through the same trainer.

  python -m grasp_jax.study --workdir=workdir/study        # results/study.json, docs/RESULTS.md

Pretrains the demo's small base once per backbone (WORKDIR/<backbone>/base), fine-tunes each run
of configs/study.py on it with equal steps and batch, samples and evaluates it as the demo does
(WORKDIR/<backbone>/<run>/seed<k>/results.json), runs the gradient-conflict diagnostics on the
`full` and `grasp` runs, then aggregates: results/study.json holds
method -> backbone -> group -> metric -> {mean, std, n} over seeds, and docs/RESULTS.md the
tables and plots (report.py). Finished runs are skipped, so an interrupted study resumes.
"""
import glob
import json
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from configs import study as study_config
from grasp_jax import run_setup

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/study", "Runs, bases and caches.")
flags.DEFINE_string("out", "results/study.json", "Aggregated results.")
flags.DEFINE_string("doc", "docs/RESULTS.md", "The report (its images go next to it, study/).")
flags.DEFINE_list("backbones", ["unet", "dit"], "Backbones.")
flags.DEFINE_list("runs", list(study_config.RUNS), "Runs of configs/study.py.")
flags.DEFINE_list("seeds", ["0"], "Seeds of every run.")
flags.DEFINE_list("seeded_runs", ["grasp", "full"], "Runs that also get --more_seeds (UNet).")
flags.DEFINE_list("more_seeds", ["1", "2"], "The extra seeds of --seeded_runs.")
flags.DEFINE_list("diagnose", ["full", "grasp"], "Runs whose gradient conflict is measured.")
flags.DEFINE_bool("smoke", False, "configs/study.py:smoke (tests: tiny runs, no Inception).")


def plan(backbones, runs, seeds, seeded_runs, more_seeds):
  """[(backbone, run, seed)] in the order they are trained."""
  unknown = sorted(set(runs) - set(study_config.RUNS))
  if unknown:
    raise ValueError(f"--runs: unknown {unknown}; known: {sorted(study_config.RUNS)}")
  out = []
  for b in backbones:
    out += [(b, r, int(s)) for r in runs for s in seeds]
    if b == "unet":
      out += [(b, r, int(s)) for r in seeded_runs if r in runs for s in more_seeds
              if s not in seeds]
  return out


def trainable_count(trainer):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainer.state.params)))


def run_one(workdir, backbone, run, seed, smoke, diagnose):
  """Trains + evaluates one run (skipped when done); returns its summary record."""
  from grasp_jax import train
  run_dir = os.path.join(workdir, backbone, run, f"seed{seed}")
  record_path = os.path.join(run_dir, "study_run.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  base = os.path.join(workdir, backbone)
  config = study_config.get_config(f"backbone={backbone},run={run},seed={seed},smoke={smoke}")
  with config.unlocked():
    config.model.pretrained = train.pretrain_base(
        config.copy_and_resolve_references(), base)
    config.eval.cache_dir = os.path.join(workdir, "cache")
  run_setup.validate_config(config)
  run_setup.write_config(config, run_dir)
  shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # A half-done run.
  start = time.perf_counter()
  trainer = train.train_and_evaluate(config, run_dir)
  record = {"backbone": backbone, "run": run, "seed": seed, "method": config.method.name,
            "trainable_params": trainable_count(trainer), "steps": int(config.train.steps),
            "batch_size": int(config.data.batch_size), "seconds": time.perf_counter() - start}
  if run in diagnose:
    train.train_and_evaluate(config, run_dir, mode="diagnose")
  with open(os.path.join(run_dir, "results.json")) as f:
    results = json.load(f)
  record["results"] = results[max(results, key=int)]
  diag_dir = os.path.join(run_dir, "diagnostics")
  if os.path.isdir(diag_dir):
    with open(os.path.join(diag_dir, sorted(os.listdir(diag_dir))[-1])) as f:
      record["diagnostics"] = json.load(f)
  with open(f"{record_path}.tmp", "w") as f:
    json.dump(record, f)
  os.replace(f"{record_path}.tmp", record_path)
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from grasp_jax import report
  logging.get_absl_handler().addFilter(run_setup.QuietLibraries())
  # Every run compiles the same evaluation classifiers and mostly the same samplers.
  jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  for backbone, run, seed in plan(FLAGS.backbones, FLAGS.runs, FLAGS.seeds, FLAGS.seeded_runs,
                                  FLAGS.more_seeds):
    logging.info("study: %s / %s / seed %d", backbone, run, seed)
    run_one(FLAGS.workdir, backbone, run, seed, FLAGS.smoke, FLAGS.diagnose)
  report.write(collect(FLAGS.workdir), FLAGS.workdir, FLAGS.out, FLAGS.doc)


def collect(workdir):
  """Every finished run's record in WORKDIR (this invocation's and earlier ones'), in the
  order backbone, configs/study.py's RUNS, seed."""
  records = []
  for path in glob.glob(os.path.join(workdir, "*", "*", "seed*", "study_run.json")):
    with open(path) as f:
      records.append(json.load(f))
  runs = list(study_config.RUNS)
  return sorted(records, key=lambda r: (r["backbone"] != "unet", runs.index(r["run"]), r["seed"]))


if __name__ == "__main__":
  app.run(main)
