"""The demo's own base model: no pretrained weights ship, so the demo first trains one here."""
import os

from absl import logging
from jax.experimental import multihost_utils

from grasp_jax.models import convert
from grasp_jax.parallel import distributed
from grasp_jax.task import experiment
from grasp_jax.trainer import loop
from grasp_jax.models import trainable as trainable_lib


def pretrain_base(config, workdir):
  """Full training from scratch, saved as a diffusers folder WORKDIR/base (reused when it
  exists); returns the folder. The data are the config's, with `config.model.base_data`'s fields
  (e.g. the demo's balanced source domain) where it gives them."""
  base_dir = os.path.join(workdir, "base")
  if os.path.exists(os.path.join(base_dir, "config.json")):
    return base_dir
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
  run_dir = os.path.join(workdir, "base_run")
  exp = experiment.build(cfg, run_dir, from_scratch=True)
  logging.info("pretraining the base model for %d steps in %s", cfg.train.steps, run_dir)
  trainer = loop.fit(exp, cfg, run_dir)
  # Gathered by every process (FSDP shards may live on other hosts), written by one.
  params = multihost_utils.process_allgather(trainable_lib.merge(trainer.state.params, trainer.frozen),
                                             tiled=True)
  if distributed.is_primary():
    convert.save_diffusers(base_dir, params, exp.lib.tiny_config(**cfg.model.base.to_dict()))
  distributed.barrier("base_model_saved")  # The others read base/ next.
  return base_dir
