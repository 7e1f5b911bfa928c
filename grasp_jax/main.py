"""Entry point: `python -m grasp_jax.main --config=configs/<name>.py[:args] --workdir=DIR`.

Kept short on purpose (as in the flax examples): parse and check the config, lock the workdir
for the life of the run (grasp_jax/run/lock.py), check the config against the checkpoint it
resumes, record it in the workdir, then hand over to the run's stages (grasp_jax/run/stages.py).
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from grasp_jax.run import lock
from grasp_jax.run.setup import QuietLibraries
from grasp_jax.run.setup import validate_config
from grasp_jax.run.setup import write_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and results.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "diagnose", "export"],
                  "train: (pre)train, sample, evaluate and export; the others run one stage on "
                  "the latest checkpoint of --workdir.")
flags.DEFINE_bool("dry_run", False, "Print the per-device memory plan of --config on its mesh "
                  "and exit; nothing is allocated.")
flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: plan for this many devices, "
                     "simulated on CPU (0: this host's devices, with XLA's compiled numbers).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                    "(default: GRASP_COORDINATOR, SLURM or TPU VM; see grasp_jax/parallel/distributed.py).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(QuietLibraries())
  config = FLAGS.config
  if config.get("task") == "feature_ddpm":  # The feature-level method has its own runner.
    with lock.hold(FLAGS.workdir):
      write_config(config, FLAGS.workdir)
      from grasp_jax.feature_ddpm import run as feature_run
      feature_run.run(config, FLAGS.workdir)
    return
  validate_config(config)
  if FLAGS.dry_run:
    from grasp_jax.run import dry_run
    dry_run.dry_run(config, num_devices=FLAGS.dry_run_devices)
    return
  # Imported late: jax/tf start-up only after the config is valid.
  from grasp_jax.parallel import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  with lock.hold(FLAGS.workdir, primary=distributed.is_primary(),
                 sync=lambda: distributed.barrier("workdir_locked")):
    from grasp_jax.run import stages
    from grasp_jax.trainer import checkpoint
    # Before config.json is rewritten: a resumed checkpoint's config must be this one.
    checkpoint.check_resume(FLAGS.workdir, config)
    if distributed.is_primary():
      write_config(config, FLAGS.workdir)
    stages.train_and_evaluate(config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
  app.run(main)
