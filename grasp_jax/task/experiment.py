"""Builds what one run trains from its config: data, partition, text conditioning, model, loss.

The trainer (train.py) only sees an `Experiment`: `init_variables`, `base_on_devices`, `loss_fn`,
`train_iterator`, `device_batch`, `encode_batch` and `partition`. Model parameters come from a
diffusers folder (`config.model.pretrained`), or — for the embedded demo, where no weights can be
downloaded — from a small base trained here first and cached in WORKDIR/base in the same diffusers
layout.
"""
import dataclasses
import functools
import hashlib
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax import files
from grasp_jax import partition as partition_lib
from grasp_jax.data import build as data_build
from grasp_jax.data import pipeline
from grasp_jax.data import precompute
from grasp_jax.data.builders import class_prompts
from grasp_jax.diffusion import objectives
from grasp_jax.evaluation import blocks
from grasp_jax.inference import conditioning
from grasp_jax.inference import latents
from grasp_jax.inference import model
from grasp_jax.models import backbone
from grasp_jax.models import trainable as trainable_lib
from grasp_jax.models import vae as vae_lib
from grasp_jax.parallel import distributed
from grasp_jax.parallel import sharding
from grasp_jax.partition import groups as partition_groups



# ---------------------------------------------------------------------------------------------
# Data and partition.

def prepare_data(config):
  """Builds (if needed) the TFDS dataset with config.data.builder_options; returns the builder."""
  d = config.data
  name = d.name + (f"/{d.config}" if d.config else "")
  options = pipeline.parse_options(d.builder_options)

  def load(build=False):
    return pipeline.load_builder(name, d.data_dir or None, build=build,
                                 manual_dir=d.manual_dir or None, options=options)

  if distributed.is_primary():  # One writer; the others wait and then read what it built.
    load(build=True)
  distributed.barrier("data_prepared")
  builder = load()
  # A dataset stored at another resolution than the run's is an error naming both: it is never
  # silently resized to the config's size (builder_options=resolution=N builds it at N).
  data_build.check_resolution(builder, d.image_size)
  return builder


def partition_thresholds(p):
  """config.partition.thresholds as ints ('100,20' -> (100, 20)); None when unset (quantiles)."""
  return tuple(int(t) for t in p.thresholds.split(",")) if p.thresholds else None


def eval_groups(exp):
  """The evaluation groups of `exp` (grasp_jax.evaluation.blocks.eval_groups)."""
  p = exp.config.partition
  return blocks.eval_groups(exp.partition, p.healthy, partition_thresholds(p))


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
  if p.strategy in partition_lib.GRADIENT_STRATEGIES:
    raise ValueError(f"{path} is missing: partition.strategy={p.strategy!r} is measured on the "
                     "base model before the run (grasp_jax.main does it; or `python -m "
                     "grasp_jax.partition --strategy=gradient --config=... --workdir=... "
                     f"--out={path}`)")
  thresholds = partition_thresholds(p)
  part = partition_lib.build_partition(
      class_names, class_counts, strategy=p.strategy,
      k=None if thresholds else p.k, thresholds=thresholds,
      groups=partition_groups.load_groups(p.groups) if p.groups else None, healthy=p.healthy,
      seed=p.seed)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    part.save(path)
  return part


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
    args = backbone.call_args(c.model.backbone, x, ids, cond)
    kwargs = dict(cluster_ids=ids, **backbone.call_kwargs(c.model.backbone, cond))
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
    """The base params placed with their shardings (None when training from scratch).

    The leaves the method does not train are cast to config.model.frozen_dtype on the host, so
    no float32 copy reaches the devices; trained leaves (all of them for 'full') stay float32.
    """
    if self.base_params is None:
      return None
    dtype = jnp.dtype(self.config.model.frozen_dtype)
    trained = trainable_lib.trainable_mask(shardings, self.config.method.trainable)

    def put(x, where, train):
      x = np.asarray(x)
      return jax.device_put(x if train or not jnp.issubdtype(x.dtype, jnp.floating)
                            else x.astype(dtype), where)
    return jax.tree.map(put, self.base_params, _subtree(shardings, self.base_params),
                        _subtree(trained, self.base_params))

  def train_iterator(self):
    c = self.config
    return iter(pipeline.make_dataset(
        self.builder, c.data.train_split, batch_size=c.data.batch_size // jax.process_count(),
        image_size=c.data.image_size, channels=c.data.channels, partition=self.partition,
        seed=c.seed, shuffle=True, balance=c.data.balance or None, cache=c.data.cache or None))

  def device_batch(self, host_batch):
    """Host batch (numpy) -> arrays for the step: prompts embedded; a cached batch
    (config.data.cache) brings its embeddings and the VAE posterior as image, image_logvar."""
    labels = {"cluster_id": host_batch["cluster_id"].astype(np.int32),
              "label": host_batch["label"].astype(np.int32)}
    if "latent_mean" in host_batch:
      return {"image": host_batch["latent_mean"], "image_logvar": host_batch["latent_logvar"],
              **labels, **{k: host_batch[k].astype(np.float32) for k in self.null_cond}}
    texts = [p.decode() if isinstance(p, bytes) else str(p) for p in host_batch["prompt"]]
    return {"image": host_batch["image"].astype(np.float32), **labels,
            **self.conditioner.lookup(texts)}

  def encode_batch(self, batch, rng):
    """A placed batch -> what the step trains on: images become VAE latents (sampled from the
    posterior with `rng`) in latent diffusion; unchanged in pixel space. A cached posterior is
    sampled as the VAE samples its own (image_logvar stays: the step ignores it, and the
    trainer's example batch needs the host batch's keys)."""
    if self.codec is None:
      return batch
    if "image_logvar" in batch:
      return {**batch, "image": _sample_latents(self.codec.module, batch["image"],
                                                batch["image_logvar"], rng)}
    return {**batch, "image": self.codec.encode(batch["image"], rng)}

  @property
  def latent_shape(self):
    """(H, W, C) of the backbone's samples: VAE latents, or the images in pixel space."""
    return model.latent_shape(self.config, self.codec)

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
    apply = backbone.model_fn_for(self.module, c.model.backbone)
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


@functools.partial(jax.jit, static_argnums=0)
def _sample_latents(vae, mean, logvar, rng):
  """Scaled latents from a cached VAE posterior, drawn as `LatentCodec.encode` draws them."""
  z = vae_lib.DiagonalGaussian(mean, logvar).sample(rng)
  return vae.apply({}, z, method=vae.scale_latents)


def cache_identity(config, builder):
  """What a precomputed cache depends on (data/precompute.py IDENTITY): the train split, the VAE
  (sha256 of its folder), the text encoder (sha256 of its weights) and the image shape."""
  d = config.data
  vae = latents.vae_folder(config)
  return {"dataset": builder.info.full_name, "split": d.train_split,
          "count": builder.info.splits[d.train_split].num_examples,
          "vae": files.folder_hash(vae) if vae else None,
          "vae_dtype": config.model.frozen_dtype if vae else None,
          "text_encoder": _text_encoder_identity(config),
          "image_size": d.image_size, "channels": d.channels}


def _text_encoder_identity(config):
  """'minilm', or the sha256 of the text encoders' weights with what else shapes their output
  (as conditioning.load_conditioner reads them)."""
  t = config.text
  if t.encoder == "minilm":
    return "minilm"
  folder = config.model.pretrained if t.encoder == "pipeline" else t.encoder
  slots, notes = ["text_encoder", "text_encoder_2"], []
  if os.path.isdir(os.path.join(folder, "transformer")):  # SD3: T5 tokens close the context.
    mode = conditioning.t5_mode(folder, t.t5)
    slots += ["text_encoder_3"] if mode == "encoder" else []
    notes.append(f"t5={mode}x{t.t5_length}")
  if config.model.frozen_dtype != "float32":
    notes.append(f"params={config.model.frozen_dtype}")
  parts = [os.path.join(folder, s) for s in slots
           if os.path.isdir(os.path.join(folder, s))] or [folder]
  digest = hashlib.sha256("".join(files.folder_hash(p) for p in parts).encode()).hexdigest()
  return " ".join([f"sha256:{digest[:16]}"] + notes)


def _subtree(tree, like):
  """The part of `tree` with the structure of `like` (nested dicts)."""
  return {k: _subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def build(config, workdir, *, from_scratch=False):
  """An Experiment for `config`. `from_scratch`: random init of the base architecture."""
  builder = prepare_data(config)
  if config.data.cache:  # Refused before anything is loaded when made for another run.
    precompute.check_identity(precompute.load_manifest(config.data.cache),
                              cache_identity(config, builder), config.data.cache)
  part = load_or_build_partition(config, workdir, builder)
  folder = "" if from_scratch else model.base_folder(config, workdir)
  module, base_params, base_hash = model.load_backbone(config, folder, from_scratch=from_scratch)
  logging.info("partition:\n%s", partition_lib.format_table(part))
  codec = model.load_codec(config, module)
  conditioner = conditioning.load_conditioner(config, workdir)
  null_cond = conditioner.null_condition()
  d = config.data
  class_cond = conditioner.lookup([class_prompts.class_prompt(d.name, d.config, n)
                                   for n in part.class_names])
  return Experiment(config=config, workdir=workdir, builder=builder, partition=part,
                    conditioner=conditioner, module=module,
                    lib=backbone.lib(config.model.backbone), base_params=base_params,
                    base_hash=base_hash, schedule=model.make_schedule(config, folder),
                    null_cond=null_cond, class_cond=class_cond, codec=codec)
