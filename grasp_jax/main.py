"""Entry point: `python -m grasp_jax.main --config=configs/<name>.py[:args] --workdir=DIR`.

Kept short on purpose (as in the flax examples): parse and check the config, record it in the
workdir, then hand over to the trainer.
"""
import json
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import common

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
                    "(default: GRASP_COORDINATOR, SLURM or TPU VM; see grasp_jax/distributed.py).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def validate_config(config):
  """Value checks the flag parser cannot do; runs before anything is built or compiled."""
  def check(ok, field, value, allowed):
    if not ok:
      raise ValueError(f"config.{field}={value!r} is invalid; expected {allowed}")
  check(config.model.backbone in common.BACKBONES, "model.backbone", config.model.backbone,
        common.BACKBONES)
  check(config.method.name in common.METHODS, "method.name", config.method.name, common.METHODS)
  objectives = ("eps", "v") if config.model.backbone == "unet" else ("flow",)
  check(config.diffusion.objective in objectives, "diffusion.objective",
        config.diffusion.objective, objectives)
  check(config.data.balance in ("", "class", "cluster"), "data.balance", config.data.balance,
        ("", "class", "cluster"))
  check(config.train.nan_policy in ("stop", "skip"), "train.nan_policy",
        config.train.nan_policy, ("stop", "skip"))
  check(config.data.batch_size > 0, "data.batch_size", config.data.batch_size, "> 0")
  check(config.train.steps >= 0, "train.steps", config.train.steps, ">= 0")


def write_config(config, workdir):
  """Writes WORKDIR/config.json; a different earlier config is kept as config.N.json."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != text:
      n = 1
      while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
        n += 1
      os.replace(path, os.path.join(workdir, f"config.{n}.json"))
      logging.info("config changed since the last run; the old one is config.%d.json", n)
  with open(path, "w") as f:
    f.write(text)
  json.loads(text)  # Fails loudly if a field is not JSON-serialisable.


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax / TFDS (dozens of lines per checkpoint); keeps warnings."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/grain/", "/jax/_src/")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  if config.get("task") == "feature_ddpm":  # The feature-level method has its own runner.
    write_config(config, FLAGS.workdir)
    from grasp_jax.features import run
    run.run(config, FLAGS.workdir)
    return
  validate_config(config)
  if FLAGS.dry_run:
    from grasp_jax import memory
    memory.dry_run(config, num_devices=FLAGS.dry_run_devices)
    return
  # Imported late: jax/tf start-up only after the config is valid.
  from grasp_jax import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if distributed.is_primary():
    write_config(config, FLAGS.workdir)
  from grasp_jax import train
  train.train_and_evaluate(config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
  app.run(main)
