"""The demo's own base model: no pretrained weights can be downloaded, so the demo trains one
here, or restores the one that ships with the package for the same pretraining config.

Shipped bases: SHIPPED/<key>/ holds a diffusers folder (config.json, the safetensors) and
spec.json ({"key", "spec", "provenance"}), key = sha256 of `spec(cfg)`: what determines the trained
weights (data, model, text, diffusion, optimizer, steps, seed), not paths, logging, sampling or
evaluation. A config that changes any of those fields trains its own base. To rebuild one, run
the demo with `--config.model.base_shipped=false`, then copy WORKDIR/base/'s files and
WORKDIR/base_spec.json (as spec.json) into SHIPPED/<key>/ (README, "The shipped base").
"""
import hashlib
import json
import os
import shutil
import time

from absl import logging
from jax.experimental import multihost_utils

from grasp_jax import files
from grasp_jax.models import convert
from grasp_jax.parallel import distributed
from grasp_jax.task import experiment
from grasp_jax.trainer import loop
from grasp_jax.models import trainable as trainable_lib

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bases")
WEIGHTS = ("config.json", "diffusion_pytorch_model.safetensors")


def pretraining_config(config):
  """The config that trains the base of `config`: full training from scratch on the config's
  data with `model.base_data`'s fields, `model.base_steps` steps, one cluster."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.method.name, cfg.method.adapter, cfg.method.trainable = "full", "none", (r".*",)
    cfg.train.steps = config.model.base_steps
    cfg.train.resume_from = 0  # A fine-tune's resume_from is not the base run's.
    cfg.optim.learning_rate = config.model.base_learning_rate
    cfg.data.balance = ""
    cfg.data.update(config.model.base_data)
    cfg.diffusion.cbdm_weight = cfg.diffusion.coral_weight = 0.0  # Regularisers are fine-tuning's.
    # No adapters, so one cluster; a measured (gradient) partition needs this base first.
    cfg.partition.strategy, cfg.partition.k = "single", 1
    cfg.partition.thresholds = cfg.partition.groups = ""
  return cfg


def spec(cfg):
  """What determines the weights a pretraining config `cfg` trains (module docstring)."""
  c = cfg.to_dict()
  return {
      "seed": c["seed"],
      "data": {k: v for k, v in c["data"].items() if k not in ("data_dir", "manual_dir", "cache")},
      "model": {k: v for k, v in c["model"].items()
                if k not in ("pretrained", "base_data", "base_shipped", "remat")},
      "text": {k: v for k, v in c["text"].items() if k != "cache"},
      "diffusion": c["diffusion"],
      "optim": c["optim"],
      "method": c["method"]["name"],
      "train": {k: c["train"][k] for k in ("steps", "ema_decay", "grad_accum_steps")},
  }


def key(spec_):
  return hashlib.sha256(json.dumps(spec_, sort_keys=True).encode()).hexdigest()[:16]


def shipped_folder(config):
  """SHIPPED/<key>/ of `config`'s base, or None when none ships for it."""
  folder = os.path.join(SHIPPED, key(spec(pretraining_config(config))))
  return folder if all(os.path.exists(os.path.join(folder, f)) for f in WEIGHTS) else None


def pretrain_base(config, workdir):
  """The base of `config` as a diffusers folder WORKDIR/base (reused when it exists); returns
  the folder. Copied from the package when a base ships for this config and
  `config.model.base_shipped`; else trained from scratch (`pretraining_config`)."""
  base_dir = os.path.join(workdir, "base")
  if os.path.exists(os.path.join(base_dir, "config.json")):
    return base_dir
  cfg = pretraining_config(config)
  shipped = shipped_folder(config) if config.model.base_shipped else None
  if shipped:
    if distributed.is_primary():
      os.makedirs(base_dir + ".tmp", exist_ok=True)
      for name in WEIGHTS:
        shutil.copy(os.path.join(shipped, name), os.path.join(base_dir + ".tmp", name))
      os.replace(base_dir + ".tmp", base_dir)  # Never a half-copied base/.
      logging.info("base restored from the package: %s", shipped)
    distributed.barrier("base_model_saved")
    return base_dir
  run_dir = os.path.join(workdir, "base_run")
  exp = experiment.build(cfg, run_dir, from_scratch=True)
  logging.info("pretraining the base model for %d steps in %s", cfg.train.steps, run_dir)
  start = time.perf_counter()
  trainer = loop.fit(exp, cfg, run_dir)
  # Gathered by every process (FSDP shards may live on other hosts), written by one.
  params = multihost_utils.process_allgather(trainable_lib.merge(trainer.state.params, trainer.frozen),
                                             tiled=True)
  if distributed.is_primary():
    convert.save_diffusers(base_dir, params, exp.lib.tiny_config(**cfg.model.base.to_dict()))
    # SHIPPED/<key>/spec.json, should this base ship (beside base/: its files are its hash).
    files.write_json(os.path.join(workdir, "base_spec.json"), {
        "key": key(spec(cfg)), "spec": spec(cfg),
        "provenance": {"steps": cfg.train.steps, "seconds": round(time.perf_counter() - start),
                       "data": f"{cfg.data.name}/{cfg.data.config}"}})
  distributed.barrier("base_model_saved")  # The others read base/ next.
  return base_dir
