r"""The study driver: every run of the study config, resumable, then the report.

  python -m grasp_jax.study --workdir=workdir/study        # results/study.json, docs/RESULTS.md

Two places: the WORKDIR holds what a run needs while it trains (checkpoints, caches, every
sample); the LEDGER (default results/study/, committed) holds what the report reads: sweeps,
every finished run's record, its final evaluation features, diagnostics, partition and a few
samples per class. A finished run lives in the ledger, so the study continues where it stopped on
another machine or in a fresh clone; the report is drawn from the ledger alone.

Order: (1) one base per backbone, pretrained on the config's base data (the source domain) in
WORKDIR/<backbone>/base (or restored from the package); (2) the learning-rate sweep, per method
family when its first run comes up: every rate of `lr_grid`, `sweep_steps` steps on the first
target, scored by the flow / diffusion loss on the target's class-balanced validation split
(fixed noise and timesteps for every rate) -> LEDGER/<backbone>/sweep.json; (3) every run x
target x seed at its family's rate (WORKDIR/<backbone>/<target>/<run>/seed<k>: the run's own
workdir, evaluated in training and at the end, gradient-conflict diagnostics at the end), kept in
LEDGER/<backbone>/<target>/<run>/seed<k>/ (`keep`) when done; (4) per backbone and target, once
its last partitioned run is done, the within- vs between-cluster gradient alignment of the GRASP
runs' partitions (prior, random, measured, K = C) on held-out batches of the frozen base ->
LEDGER/<backbone>/<target>/alignment.json; (5) the report (grasp_jax/run/report.py).
Finished pieces are skipped; a half-done run restarts from its last checkpoint in WORKDIR.
"""
import glob
import os
import shutil
import time

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from grasp_jax import files
from grasp_jax.run import lock
from grasp_jax.run import setup
from grasp_jax.run import study_configs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/study.py", "The study config (runs[backbone]"
                                "[run] is each run's full config).", lock_config=False)
flags.DEFINE_string("workdir", "workdir/study", "Scratch: runs' checkpoints, bases, caches.")
flags.DEFINE_string("ledger", "results/study", "The study's record (module docstring).")
flags.DEFINE_string("out", "results/study.json", "Aggregated results.")
flags.DEFINE_string("doc", "docs/RESULTS.md", "The report (its images go next to it, study/).")
flags.DEFINE_list("runs", [], "Runs of the study config to train (default: all).")
flags.DEFINE_bool("report_only", False, "Only aggregate the finished runs.")


def plan(study, runs=None):
  """[(backbone, target, run, seed)] in the order they are trained: per backbone and target
  (headline target first) the zero-step base and the seeded runs at every seed, then, on the
  headline target only, the other runs at the first seed, so that an interrupted study has its
  headline comparison first. A later target replicates the headline comparison under another
  class -> count permutation."""
  known = list(study.run_order)  # ConfigDict keys iterate sorted; the config's order counts.
  unknown = sorted(set(runs or ()) - set(known))
  if unknown:
    raise ValueError(f"--runs: unknown {unknown}; known: {known}")
  runs = [r for r in known if not runs or r in runs]
  out = []
  for backbone in study.backbones:
    for target in study.targets:
      first = [r for r in runs if r == "base" or r in study.seeded]
      out += [(backbone, target, r, seed) for seed in study.seeds for r in first
              if seed == study.seeds[0] or r in study.seeded]
      if target == study.targets[0]:
        out += [(backbone, target, r, study.seeds[0]) for r in runs if r not in first]
  return out


def trainable_count(trainer):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainer.state.params)))


def validation_loss(exp, trainer):
  """Mean loss on the class-balanced eval-split batches (the sweep's config points it at the
  target's validation split), with the same noise and timesteps for every run."""
  from grasp_jax.run import hooks  # pylint: disable=g-import-not-at-top
  params, extra = hooks.sampling_params(trainer)
  loss = jax.jit(lambda p, b, r: jnp.mean(exp.loss_fn(p, extra, b, r)[0]))
  with jax.set_mesh(trainer.mesh):
    batches = exp.heldout_batches(trainer.mesh)
    return float(np.mean([loss(params, b, jax.random.key(i)) for i, b in enumerate(batches)]))


def sweep(study, workdir, ledger, backbone, base, families):
  """{family: {"lr": chosen, "steps": sweep_steps, "config_sha", "losses": {lr: loss}}} of
  `families`: LEDGER/<backbone>/sweep.json, resumable; a family swept under another config (its
  run, `sweep_steps`) is redone, and a rate's run dir made under another config is superseded
  (`supersede`) first."""
  from grasp_jax.task import experiment  # pylint: disable=g-import-not-at-top
  from grasp_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  path = os.path.join(ledger, backbone, "sweep.json")
  done = files.read_json(path) if os.path.exists(path) else {}
  for fam in sorted(families):
    rates = study.lr_grid[fam]
    entry, sha = done.get(fam), study_configs.sweep_sha(study, backbone, fam)
    if entry is not None and entry.get("config_sha") != sha:
      logging.warning("sweep %s %s: measured under another config (run or steps): redone",
                      backbone, fam)
      entry = None
    if entry is None:
      entry = done[fam] = {"steps": int(study.sweep_steps), "config_sha": sha, "losses": {}}
    for lr in rates:
      if str(lr) in entry["losses"]:
        continue
      config = study_configs.sweep_config(study, backbone, fam, base, lr)
      run_dir = os.path.join(workdir, backbone, "sweep", f"{fam}_lr{lr}")
      setup.validate_config(config)
      if _other_config(run_dir, study_configs.config_sha(config)):
        supersede(workdir, run_dir)
      with lock.hold(run_dir):
        setup.write_config(config, run_dir)
        exp = experiment.build(config, run_dir)
        entry["losses"][str(lr)] = validation_loss(exp, loop.fit(exp, config, run_dir))
      logging.info("sweep %s %s lr %g: validation loss %.5f", backbone, fam, lr,
                   entry["losses"][str(lr)])
      entry["lr"] = float(min(entry["losses"], key=entry["losses"].get))
      files.write_json(path, done)
  return done


def run_one(study, workdir, ledger, backbone, target, run, seed, base, lrs):
  """Trains + evaluates one run (skipped when the ledger has it under the same config), keeps it
  in the ledger; returns its record.

  A finished run whose config differs from the one the study would run now (another evaluator,
  budget, sampler, ...), or whose evaluation groups differ from those the code computes now
  (`_groups_current`), is stale: its ledger entry is removed (git history keeps it), its
  WORKDIR folder moves to WORKDIR/superseded/, and the run is redone.
  """
  from grasp_jax.run import stages  # pylint: disable=g-import-not-at-top
  rel = os.path.join(backbone, target, run, f"seed{seed}")
  run_dir, kept = os.path.join(workdir, rel), os.path.join(ledger, rel)
  lr = lrs[study_configs.family(study.runs[backbone][run])]["lr"]
  config = study_configs.run_config(study, workdir, backbone, target, run, seed, base, lr)
  setup.validate_config(config)
  sha = study_configs.config_sha(config)
  for folder in (kept, run_dir):  # A run finished in WORKDIR but not yet kept is kept now.
    record = _record(folder)
    if record is not None and record.get("config_sha") == sha and _groups_current(
        study, record, folder):
      if folder == run_dir:
        keep(run_dir, kept, record)
      return record
  if _record(kept) is not None:
    logging.warning("study: %s ran under another config; removed from the ledger", kept)
    shutil.rmtree(kept)
  if _record(run_dir) is not None or _other_config(run_dir, sha):
    supersede(workdir, run_dir)
  start = time.perf_counter()
  with lock.hold(run_dir):
    setup.write_config(config, run_dir)
    trainer = stages.train_and_evaluate(config, run_dir)
  results = files.read_json(os.path.join(run_dir, "results.json"))
  record = {"backbone": backbone, "target": target, "run": run, "seed": seed,
            "method": config.method.name, "lr": config.optim.learning_rate,
            "trainable_params": trainable_count(trainer), "steps": int(config.train.steps),
            "batch_size": int(config.data.batch_size), "seconds": time.perf_counter() - start,
            "steps_evaluated": sorted(int(s) for s in results), "config_sha": sha,
            "results": results}
  files.write_json(os.path.join(run_dir, RECORD), record)
  keep(run_dir, kept, record)
  return record


RECORD = "study_run.json"


def _groups_current(study, record, folder):
  """Whether the run's recorded `frequency/*` groups are those the evaluation code computes now
  from its partition's class counts: a change of the grouping rule is a code change that
  config_sha cannot see (session 10's fix regrouped the shared adapter's classes)."""
  from grasp_jax.evaluation import blocks  # pylint: disable=g-import-not-at-top
  from grasp_jax import partition as partition_lib  # pylint: disable=g-import-not-at-top
  from grasp_jax.task import experiment  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, "partition.json")
  if not os.path.exists(path):
    return False
  part = partition_lib.Partition.load(path)
  p = study.runs[record["backbone"]][record["run"]].partition
  want = blocks.eval_groups(part, study.healthy[record["target"]],
                            experiment.partition_thresholds(p))
  want = {g: [part.class_names[i] for i in m] for g, m in want.items()
          if g.startswith("frequency/")}
  meta = record["results"][str(record["steps_evaluated"][-1])]["meta"]
  return want == {g: m for g, m in meta["groups"].items() if g.startswith("frequency/")}


def _record(folder):
  path = os.path.join(folder, RECORD)
  return files.read_json(path) if os.path.exists(path) else None


def keep(run_dir, kept, record):
  """Copies what the report reads of a finished run into its ledger folder `kept`, in the run
  dir's layout: the final evaluation's features and their reference, the final diagnostics, the
  partition (and its alignment heatmap), the first samples of each class (the report's grids),
  and the record last: the record marks the entry complete."""
  from grasp_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  from grasp_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from grasp_jax.run import report  # pylint: disable=g-import-not-at-top
  if os.path.exists(kept):
    shutil.rmtree(kept)
  step = record["steps_evaluated"][-1]
  meta = compare.load_run(run_dir, step)[0]["meta"]
  names = [os.path.join("eval", f"step_{step:06d}", "features.npz"),
           os.path.join("eval", meta["reference"]),
           os.path.join("diagnostics", f"step_{record['steps']}.json"), "partition.json",
           "partition_alignment.png", os.path.join("samples", "classes.json")]
  for cls in meta["class_names"]:
    folder = os.path.join("samples", generate.folder_name(cls))
    if os.path.isdir(os.path.join(run_dir, folder)):
      names += [os.path.join(folder, f) for f in
                sorted(os.listdir(os.path.join(run_dir, folder)))[:report.GRID_PER_CLASS]]
  for name in names:
    if os.path.exists(src := os.path.join(run_dir, name)):
      os.makedirs(os.path.dirname(dst := os.path.join(kept, name)), exist_ok=True)
      shutil.copyfile(src, dst)
  files.write_json(os.path.join(kept, RECORD), record)


def supersede(workdir, run_dir):
  """Moves a run dir made under another config to WORKDIR/superseded/<its path>.<n> (kept,
  never reported), so that it is redone from scratch."""
  old = os.path.join(workdir, "superseded", os.path.relpath(run_dir, workdir))
  n = 1
  while os.path.exists(f"{old}.{n}"):
    n += 1
  os.makedirs(os.path.dirname(old), exist_ok=True)
  os.replace(run_dir, f"{old}.{n}")
  logging.warning("study: %s ran under another config; moved to %s.%d, redoing it", run_dir,
                  old, n)


def _other_config(run_dir, sha):
  """Whether run_dir was ever run under a config other than `sha`'s: its config.json, or an
  earlier one setup.write_config kept as config.<n>.json (a run interrupted after its config
  was rewritten still holds the other config's checkpoints)."""
  return any(study_configs.config_sha(files.read_json(p)) != sha
             for p in glob.glob(os.path.join(run_dir, "config*.json")))


# The partitions whose held-out alignment the study compares (runs of one K each).
ALIGNMENT_RUNS = ("grasp", "grasp_random", "grasp_gradient", "grasp_kc")


def partition_alignment(study, workdir, ledger, backbone, target, base):
  """LEDGER/<backbone>/<target>/alignment.json: `gradient_partition.heldout_alignment` of the
  seed-0 partitions of ALIGNMENT_RUNS that the ledger has (None when none); resumable."""
  from grasp_jax import partition as partition_lib  # pylint: disable=g-import-not-at-top
  from grasp_jax.run import gradient_partition  # pylint: disable=g-import-not-at-top
  path = os.path.join(ledger, backbone, target, "alignment.json")
  parts = {r: os.path.join(ledger, backbone, target, r, "seed0", "partition.json")
           for r in ALIGNMENT_RUNS}
  parts = {r: partition_lib.Partition.load(p) for r, p in parts.items() if os.path.exists(p)}
  done = files.read_json(path) if os.path.exists(path) else None
  if done and set(done["partitions"]) == set(parts):
    return done
  if not parts:
    return None
  config = study.runs[backbone][study.compare_to].copy_and_resolve_references()
  with config.unlocked():
    config.data.config = target
    config.partition.healthy = study.healthy[target]
    config.model.pretrained = base
  out = gradient_partition.heldout_alignment(config, os.path.join(workdir, backbone, target),
                                             parts)
  out["partitions"] = sorted(parts)
  files.write_json(path, out)
  return out


def collect(study, ledger):
  """Every run's record in the ledger that ran under the config the study has now; stale ones
  (redone by the next run of the study) are left out."""
  out, stale = [], []
  for path in sorted(glob.glob(os.path.join(ledger, "*", "*", "*", "seed*", RECORD))):
    r = files.read_json(path)
    current = r["run"] in study.runs.get(r["backbone"], {}) and r["target"] in study.targets
    config = study_configs.run_config(study, "", r["backbone"], r["target"], r["run"],
                                      r["seed"], "", r["lr"]) if current else None
    if current and r.get("config_sha") == study_configs.config_sha(config) and (
        _groups_current(study, r, os.path.dirname(path))):
      out.append(r)
    else:
      stale.append(os.path.dirname(path))
  if stale:
    logging.warning("study: %d finished runs ran under another config and are not reported "
                    "(the study redoes them): %s", len(stale), ", ".join(stale))
  return out


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from grasp_jax.run import pretrain  # pylint: disable=g-import-not-at-top
  from grasp_jax.run import report  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(setup.QuietLibraries())
  study = FLAGS.config
  # Every run compiles the same evaluators and mostly the same samplers.
  jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  todo = [] if FLAGS.report_only else plan(study, FLAGS.runs)
  # The alignment of a target's partitions is measured once its last partitioned run is done.
  last_partitioned = {(b, t): (b, t, r, s) for b, t, r, s in todo if r in ALIGNMENT_RUNS}
  bases, lrs = {}, {}
  for backbone, target, run, seed in todo:
    if backbone not in bases:
      config = study.runs[backbone][study.compare_to].copy_and_resolve_references()
      with config.unlocked():
        config.data.config = study.targets[0]  # The base itself trains on model.base_data.
        config.partition.healthy = study.healthy[study.targets[0]]
      with lock.hold(os.path.join(FLAGS.workdir, backbone)):
        bases[backbone] = pretrain.pretrain_base(config, os.path.join(FLAGS.workdir, backbone))
    # Each family's rate is swept when its first run comes up (headline runs start sooner).
    fam = study_configs.family(study.runs[backbone][run])
    swept = lrs.get(backbone, {}).get(fam, {})
    if swept.get("config_sha") != study_configs.sweep_sha(study, backbone, fam) or any(
        str(lr) not in swept["losses"] for lr in study.lr_grid[fam]):
      with lock.hold(os.path.join(FLAGS.workdir, backbone)):
        lrs[backbone] = sweep(study, FLAGS.workdir, FLAGS.ledger, backbone, bases[backbone],
                              {fam})
    logging.info("study: %s / %s / %s / seed %d", backbone, target, run, seed)
    run_one(study, FLAGS.workdir, FLAGS.ledger, backbone, target, run, seed, bases[backbone],
            lrs[backbone])
    if last_partitioned.get((backbone, target)) == (backbone, target, run, seed):
      partition_alignment(study, FLAGS.workdir, FLAGS.ledger, backbone, target, bases[backbone])
  report.write(collect(study, FLAGS.ledger), study, FLAGS.ledger, FLAGS.out, FLAGS.doc)
