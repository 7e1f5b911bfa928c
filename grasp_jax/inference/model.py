"""The model side of a run, from its config alone: backbone and frozen base, schedule, VAE.

Training (task/experiment.py) and sampling without the dataset (inference/generator.py) build the
model with these, so both see the same module, base parameters and schedule. Model parameters come
from a diffusers folder (`config.model.pretrained`), or, for the embedded demo, from the small base
trained first and cached in WORKDIR/base in the same diffusers layout.
"""
import json
import os

from absl import logging
import jax.numpy as jnp

from grasp_jax import files
from grasp_jax.diffusion import schedules
from grasp_jax.inference import latents
from grasp_jax.models import adapters
from grasp_jax.models import backbone
from grasp_jax.models import convert


def adapter_config(config):
  m = config.method
  # The bottleneck uses the FFN's own nonlinearity, so a GRASP row folds exactly into a wider FFN
  # at export (GEGLU's exact GELU for UNets, SD3's tanh GELU for the MMDiT).
  activation = "gelu" if config.model.backbone == "unet" else "gelu_tanh"
  return adapters.AdapterConfig(method=m.adapter, num_clusters=m.num_clusters, rank=m.rank,
                                moe_mode=m.moe_mode, activation=activation)


def base_folder(config, workdir):
  """The diffusers folder holding the frozen base model."""
  if not config.model.pretrained:
    return os.path.join(workdir, "base")
  sub = os.path.join(config.model.pretrained, backbone.SUBFOLDERS[config.model.backbone])
  return sub if os.path.isdir(sub) else config.model.pretrained


def load_backbone(config, folder, *, from_scratch=False):
  """(module, base params as numpy or None, base hash) of the run's backbone.

  folder: the base's diffusers folder (`base_folder`). from_scratch: a random init of the
  architecture `config.model.base` instead (no base parameters).
  """
  lib = backbone.lib(config.model.backbone)
  extra = dict(adapter=adapter_config(config), dtype=jnp.dtype(config.model.dtype),
               remat=config.model.remat)
  if from_scratch:
    return lib.from_config(lib.tiny_config(**config.model.base.to_dict()), **extra), None, \
        "scratch"
  if not os.path.exists(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"{folder}/config.json not found: the base model's diffusers folder "
                            "(config.model.pretrained, or WORKDIR/base for the demo)")
  _, base_params = convert.load_diffusers(folder)
  with open(os.path.join(folder, "config.json")) as f:
    module = lib.from_config(json.load(f), **extra)
  return module, base_params, files.folder_hash(folder)


def make_schedule(config, folder):
  """The pretrained pipeline's scheduler config when there is one, else the config's."""
  sched_file = os.path.join(os.path.dirname(folder), "scheduler", "scheduler_config.json")
  if config.model.pretrained and os.path.exists(sched_file):
    with open(sched_file) as f:
      return schedules.from_diffusers_config(json.load(f))
  d = config.diffusion
  if d.objective == "flow":
    return schedules.FlowSchedule(num_train_timesteps=d.num_train_timesteps, shift=d.flow_shift)
  prediction = {"eps": "epsilon", "v": "v_prediction"}[d.objective]
  return schedules.ddpm_schedule(d.schedule, d.num_train_timesteps,
                                 prediction_type=prediction, clip_sample=d.clip_sample)


def load_codec(config, module):
  """The VAE of latent diffusion (config.model.vae, else <pretrained>/vae), checked against the
  backbone's input channels; None in pixel space."""
  folder = latents.vae_folder(config)
  if folder is None:
    return None
  codec = latents.load_codec(folder, param_dtype=config.model.frozen_dtype)
  c = config.data
  shape = codec.latent_shape((c.image_size, c.image_size, c.channels))
  if shape[-1] != module.in_channels:
    raise ValueError(f"{folder}: the VAE makes {shape[-1]} latent channels, the "
                     f"{config.model.backbone} takes in_channels={module.in_channels}")
  logging.info("latent diffusion: %s images -> %s latents (VAE %s)",
               (c.image_size, c.image_size, c.channels), shape, folder)
  return codec


def latent_shape(config, codec):
  """(H, W, C) of the backbone's samples: VAE latents, or the images in pixel space."""
  c = config.data
  image = (c.image_size, c.image_size, c.channels)
  return codec.latent_shape(image) if codec is not None else image
