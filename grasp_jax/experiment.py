"""Builds what one run trains from its config: data, partition, text conditioning, model, loss.

The trainer (train.py) only sees an `Experiment`: `init_variables`, `base_on_devices`, `loss_fn`,
`train_iterator`, `device_batch`, `encode_batch` and `partition`. Model parameters come from a
diffusers folder (`config.model.pretrained`), or — for the embedded demo, where no weights can be
downloaded — from a small base trained here first and cached in WORKDIR/base in the same diffusers
layout.
"""
import dataclasses
import importlib
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from grasp_jax import checkpoint
from grasp_jax import conditioning
from grasp_jax import diagnostics
from grasp_jax import distributed
from grasp_jax import latents
from grasp_jax import optim
from grasp_jax import sharding
from grasp_jax import partition as partition_lib
from grasp_jax.data import pipeline
from grasp_jax.data.builders import features
from grasp_jax.diffusion import objectives
from grasp_jax.diffusion import schedules
from grasp_jax.models import adapters
from grasp_jax.models import convert

import grasp_jax.data.builders  # noqa: F401  (registers the TFDS builders)

_SUBFOLDER = {"unet": "unet", "dit": "transformer"}
_MODEL_LIB = {"unet": "grasp_jax.models.unet", "dit": "grasp_jax.models.dit"}


# ---------------------------------------------------------------------------------------------
# Data and partition.

def prepare_data(config):
  """Builds (if needed) the TFDS dataset; returns the builder."""
  make = lambda: tfds.builder(config.data.name, config=config.data.config or None,
                              data_dir=config.data.data_dir or None)
  if distributed.is_primary():  # One writer; the others wait and then read what it built.
    download_config = tfds.download.DownloadConfig(manual_dir=config.data.manual_dir or None)
    make().download_and_prepare(download_config=download_config)
  distributed.barrier("data_prepared")
  return make()


def load_or_build_partition(config, workdir, builder):
  """WORKDIR/partition.json is the one source of cluster ids; built once from the train split."""
  path = os.path.join(workdir, "partition.json")
  class_names, class_counts = pipeline.dataset_class_counts(builder, config.data.train_split)
  if os.path.exists(path):
    part = partition_lib.Partition.load(path)
    if tuple(part.class_names) != tuple(class_names):
      raise ValueError(f"{path} was built for classes {part.class_names}, but "
                       f"{config.data.name} has {class_names}; use a fresh workdir")
    return part
  p = config.partition
  thresholds = tuple(int(t) for t in p.thresholds.split(",")) if p.thresholds else None
  part = partition_lib.build_partition(
      class_names, class_counts, strategy=p.strategy,
      k=None if thresholds else p.k, thresholds=thresholds,
      groups=partition_lib.load_groups(p.groups) if p.groups else None, healthy=p.healthy)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    part.save(path)
  return part


# ---------------------------------------------------------------------------------------------
# Text conditioning.

def class_prompt(dataset, class_name):
  """The builders' template prompt of a class (what sampling and CBDM condition on)."""
  if "cxr" in dataset:
    return features.findings_prompt([class_name])
  return features.photo_prompt(class_name)


# ---------------------------------------------------------------------------------------------
# Model.

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
  sub = os.path.join(config.model.pretrained, _SUBFOLDER[config.model.backbone])
  return sub if os.path.isdir(sub) else config.model.pretrained


def call_args(backbone, x_t, t, cond):
  """Positional arguments of each backbone's call convention."""
  if backbone == "unet":
    return (x_t, t, cond["context"])
  return (x_t, cond["context"], cond["pooled"], t)


def call_kwargs(backbone, cond):
  """Keyword arguments besides cluster_ids: SDXL's added_cond_kwargs (pooled text, time ids)."""
  if backbone == "unet" and "time_ids" in cond:
    return {"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}
  return {}


def model_fn_for(module, backbone):
  """Adapts a backbone to `model_fn(variables, x_t, t, cond, cluster_ids) -> (pred, mutated)`."""
  def model_fn(variables, x_t, t, cond, cluster_ids):
    return module.apply(variables, *call_args(backbone, x_t, t, cond), cluster_ids=cluster_ids,
                        mutable=["intermediates", "losses"], **call_kwargs(backbone, cond))
  return model_fn


@dataclasses.dataclass
class Experiment:
  config: Any
  workdir: str
  builder: Any
  partition: partition_lib.Partition
  conditioner: Any
  module: Any
  lib: Any  # The backbone's module file (from_config, example_inputs).
  base_params: Any  # Frozen base params (numpy), or None when training from scratch.
  base_hash: str
  schedule: Any
  null_cond: Any  # The empty prompt's condition (classifier-free guidance), leaves [L, D] / [D].
  class_cond: Any  # Each class's template-prompt condition, leaves [C, ...] (CBDM's y').
  codec: Any = None  # latents.LatentCodec for latent diffusion; None in pixel space.
  _heldout: Any = None  # Diagnostics batches, made on first use.

  # --- what the trainer calls -----------------------------------------------------------------

  def init_variables(self, rng, base=None):
    """All variables (base + adapters), initialised through the call that training makes.

    With `base` (the frozen params, already on device) only the missing leaves — adapters, LoRA,
    heads — are initialised: flax creates a param only when the collection lacks it, which also
    spares compiling the random init of the whole backbone.
    """
    c = self.config
    x = jnp.zeros((1,) + self.latent_shape)
    cond = jax.tree.map(lambda v: jnp.asarray(v)[None], self.null_cond)
    ids = jnp.zeros((1,), jnp.int32)
    args = call_args(c.model.backbone, x, ids, cond)
    kwargs = dict(cluster_ids=ids, **call_kwargs(c.model.backbone, cond))
    if base is None:
      variables = self.module.init(rng, *args, **kwargs)
    else:
      _, variables = self.module.apply({"params": base}, *args, **kwargs,
                                       rngs={"params": rng}, mutable=["params", "selora"])
    if c.diffusion.coral_weight:
      _, mutated = self.module.apply(variables, *args, **kwargs, mutable=["intermediates"])
      feats = objectives.bottleneck_features(mutated["intermediates"])
      head = objectives.CoralHead().init(jax.random.fold_in(rng, 1), feats)["params"]
      variables = {**variables, "params": {**variables["params"], "coral_head": head}}
    # Sown collections ('intermediates', 'losses') are per-call outputs, not state.
    return {k: v for k, v in variables.items() if k in ("params", "selora")}

  def base_on_devices(self, shardings):
    """The frozen base params placed with their shardings (None when training from scratch)."""
    if self.base_params is None:
      return None
    return jax.tree.map(jax.device_put, self.base_params, _subtree(shardings, self.base_params))

  def train_iterator(self):
    c = self.config
    return iter(pipeline.make_dataset(
        self.builder, c.data.train_split, batch_size=c.data.batch_size // jax.process_count(),
        image_size=c.data.image_size, channels=c.data.channels, partition=self.partition,
        seed=c.seed, shuffle=True, balance=c.data.balance or None))

  def device_batch(self, host_batch):
    """Host batch (numpy, with prompt strings) -> arrays for the step, text embedded."""
    prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in host_batch["prompt"]]
    return {"image": host_batch["image"].astype(np.float32),
            "cluster_id": host_batch["cluster_id"].astype(np.int32),
            "label": host_batch["label"].astype(np.int32),
            **self.conditioner.lookup(prompts)}

  def encode_batch(self, batch, rng):
    """A placed batch -> what the step trains on: images become VAE latents (sampled from the
    posterior with `rng`) in latent diffusion; unchanged in pixel space."""
    if self.codec is None:
      return batch
    return {**batch, "image": self.codec.encode(batch["image"], rng)}

  @property
  def latent_shape(self):
    """(H, W, C) of the backbone's samples: VAE latents, or the images in pixel space."""
    c = self.config.data
    image = (c.image_size, c.image_size, c.channels)
    return self.codec.latent_shape(image) if self.codec is not None else image

  def decode_latents(self, samples):
    """The backbone's samples -> images (identity in pixel space). A jitted call on arrays:
    apply it to the sampler's output, not inside another jitted function."""
    return samples if self.codec is None else self.codec.decode(samples)

  def loss_fn(self, params, extra, batch, rng):
    """Per-sample loss [B] and the scalar auxiliary loss (MoE load balancing)."""
    c = self.config
    cond = {k: batch[k] for k in self.null_cond}
    common = dict(null_cond=self.null_cond, cond_drop_prob=c.diffusion.cfg_dropout,
                  cbdm=self._cbdm() if c.diffusion.cbdm_weight else None)
    model_params = {k: v for k, v in params.items() if k != "coral_head"}
    apply = model_fn_for(self.module, c.model.backbone)
    model_fn = lambda x_t, t, cond, ids: apply({"params": model_params, **extra}, x_t, t, cond,
                                                 ids)
    if c.diffusion.objective == "flow":
      losses, aux = objectives.flow_matching_loss(model_fn, self.schedule, batch["image"], cond,
                                                  batch["cluster_id"], rng, **common)
    else:
      losses, aux = objectives.diffusion_loss(
          model_fn, self.schedule, batch["image"], cond, batch["cluster_id"], rng,
          min_snr_gamma=c.diffusion.min_snr_gamma or None, **common)
    if c.diffusion.coral_weight:
      feats = objectives.bottleneck_features(aux["model"]["intermediates"])
      proj = objectives.CoralHead().apply({"params": params["coral_head"]}, feats)
      losses = losses + objectives.coral_loss(
          proj, batch["label"], ~aux["drop_mask"], aux["t_frac"],
          temperature=c.diffusion.coral_temperature, weight=c.diffusion.coral_weight)
    aux_loss = sum(jnp.sum(v) for v in jax.tree.leaves(aux["model"].get("losses", {})))
    return losses, c.method.moe_aux_weight * aux_loss

  def _cbdm(self):
    """CBDM's balancing labels y' ~ uniform (fine-tuning) or train frequency, with their own
    prompts and clusters."""
    c = self.config
    table = self.class_cond
    counts = np.asarray(self.partition.class_counts, np.float32)
    probs = counts if c.diffusion.cbdm_prior == "frequency" else np.ones_like(counts)
    to_cluster = jnp.asarray(self.partition.class_to_cluster, jnp.int32)
    return objectives.CBDM(class_probs=probs, tau=c.diffusion.cbdm_weight,
                           cond_for_labels=lambda y: {k: jnp.asarray(v)[y]
                                                      for k, v in table.items()},
                           cluster_for_labels=lambda y: to_cluster[y])

  def heldout_batches(self, mesh):
    """A fixed set of class-balanced eval-split batches (diagnostics), placed on `mesh`."""
    c = self.config
    it = iter(pipeline.make_dataset(
        self.builder, c.data.eval_split, batch_size=c.data.batch_size // jax.process_count(),
        image_size=c.data.image_size, channels=c.data.channels, partition=self.partition,
        seed=c.seed + 1, shuffle=True, balance="class"))
    return [self.encode_batch(sharding.put_batch(self.device_batch(next(it)), mesh),
                              jax.random.fold_in(jax.random.key(c.seed + 1), i))
            for i in range(c.train.diagnostics_batches)]

  def periodic(self, trainer, step, writer):
    """In-training hooks: gradient diagnostics, per-cluster sample grids, evaluation."""
    from grasp_jax import generate  # Both import this module.
    from grasp_jax.evaluation import evaluate as evaluate_lib
    every = self.config.train.diagnostics_every
    if every and step % every == 0:
      if self._heldout is None:
        self._heldout = self.heldout_batches(trainer.mesh)
      diagnostics.run_diagnostics(
          self, optim.merge(trainer.state.params, trainer.frozen), trainer.state.extra,
          self._heldout, jax.random.key(self.config.seed + 1), writer, step)
    c = self.config
    if c.train.sample_every and step % c.train.sample_every == 0:
      params, extra = generate.sampling_params(trainer)
      grids = generate.cluster_grids(self, params, extra, jax.random.key(c.seed), 8,
                                     mesh=trainer.mesh)
      if jax.process_index() == 0:
        writer.write_images(step, {k: g[None] for k, g in grids.items()})
    if c.eval.every and step % c.eval.every == 0:
      params, extra = generate.sampling_params(trainer)
      evaluate_lib.evaluate(self, params, extra, self.workdir, writer, step,
                            rng=jax.random.key(c.seed), mesh=trainer.mesh)


def _subtree(tree, like):
  """The part of `tree` with the structure of `like` (nested dicts)."""
  return {k: _subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


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


def build(config, workdir, *, from_scratch=False):
  """An Experiment for `config`. `from_scratch`: random init of the base architecture."""
  builder = prepare_data(config)
  part = load_or_build_partition(config, workdir, builder)
  lib = importlib.import_module(_MODEL_LIB[config.model.backbone])
  dtype = jnp.dtype(config.model.dtype)
  extra = dict(adapter=adapter_config(config), dtype=dtype, remat=config.model.remat)
  if from_scratch:
    module = lib.from_config(lib.tiny_config(**config.model.base.to_dict()), **extra)
    base_params, base_hash, folder = None, "scratch", ""
  else:
    folder = base_folder(config, workdir)
    base_module, base_params = convert.load_diffusers(folder)
    with open(os.path.join(folder, "config.json")) as f:
      module = lib.from_config(json.load(f), **extra)
    del base_module
    base_hash = checkpoint.folder_hash(folder)
  logging.info("partition:\n%s", partition_lib.format_table(part))
  codec = load_codec(config, module)
  conditioner = conditioning.load_conditioner(config, workdir)
  null_cond = conditioner.null_condition()
  class_cond = conditioner.lookup([class_prompt(config.data.name, n) for n in part.class_names])
  return Experiment(config=config, workdir=workdir, builder=builder, partition=part,
                    conditioner=conditioner, module=module, lib=lib, base_params=base_params,
                    base_hash=base_hash, schedule=make_schedule(config, folder),
                    null_cond=null_cond, class_cond=class_cond, codec=codec)


def load_codec(config, module):
  """The VAE of latent diffusion (config.model.vae, else <pretrained>/vae), checked against the
  backbone's input channels; None in pixel space."""
  folder = latents.vae_folder(config)
  if folder is None:
    return None
  codec = latents.load_codec(folder)
  c = config.data
  shape = codec.latent_shape((c.image_size, c.image_size, c.channels))
  if shape[-1] != module.in_channels:
    raise ValueError(f"{folder}: the VAE makes {shape[-1]} latent channels, the "
                     f"{config.model.backbone} takes in_channels={module.in_channels}")
  logging.info("latent diffusion: %s images -> %s latents (VAE %s)",
               (c.image_size, c.image_size, c.channels), shape, folder)
  return codec
