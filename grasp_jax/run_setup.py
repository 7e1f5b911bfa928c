"""What every entry point does before training: check the config, record it, quiet the logs."""
import json
import logging as std_logging
import os

from absl import logging

from configs import common


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


class QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax / TFDS (dozens of lines per checkpoint); keeps warnings."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/grain/", "/jax/_src/")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)
