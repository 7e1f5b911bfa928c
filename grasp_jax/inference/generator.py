"""A trained run, ready to sample, from its workdir or its adapter export: no dataset, no optimizer.

  gen = generator.load("workdir/demo")                      # latest checkpoint (EMA when kept)
  gen = generator.load("workdir/demo/export/adapters")      # export_adapters folder
  params, extra = gen.place(mesh)                           # or gen.params, gen.extra on one device
  images = generate.sample_prompts(gen, params, extra, texts, cluster_ids, jax.random.key(0))

What is read: the run config (WORKDIR/config.json or the export's), the partition (partition.json),
the frozen base (`config.model.pretrained`, or WORKDIR/base for the demo; `base=` overrides), the
trained leaves (from the latest orbax checkpoint only the 'params' or 'ema' subtree and 'extra',
e.g. SeLoRA's rank masks; or the export's adapters.safetensors), the text encoder and the VAE.
A Generator has the sampling side of task.experiment.Experiment (config, module, partition,
conditioner, schedule, null_cond, latent_shape, decode_latents), so every function of
inference/generate.py takes it in place of one.
"""
import dataclasses
import os
from typing import Any

from absl import logging
import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from grasp_jax import files
from grasp_jax import partition as partition_lib
from grasp_jax.data import prompts
from grasp_jax.data.builders import class_prompts
from grasp_jax.inference import conditioning
from grasp_jax.inference import export
from grasp_jax.inference import generate
from grasp_jax.inference import model
from grasp_jax.inference import routing
from grasp_jax.models import backbone
from grasp_jax.parallel import sharding


def prompt_phrases(class_names, data):
  """{class: phrases that name it in a prompt} for routing.Router: its name in words, and the
  dataset's template prompt where that does not contain the name ('normal chest x-ray').
  data: the run config's data section (name, config)."""
  out = {}
  for name in class_names:
    words = prompts.human_name(name)
    template = class_prompts.class_prompt(data.name, data.config, name)
    out[name] = [words] if words in template else [words, template]
  return out


def routing_table(partition, data):
  """partition.json's content plus the `prompt_phrases` routing.Router reads."""
  return {**partition.to_json(), "prompt_phrases": prompt_phrases(partition.class_names, data)}


@dataclasses.dataclass(eq=False)
class Generator:
  config: Any
  partition: partition_lib.Partition
  conditioner: Any
  module: Any
  schedule: Any
  null_cond: Any  # The empty prompt's condition (classifier-free guidance).
  params: Any  # Base + trained parameters (numpy).
  extra: Any  # The other variable collections (SeLoRA's 'selora' masks).
  codec: Any = None  # latents.LatentCodec in latent diffusion.
  source: str = ""  # Where the trained leaves came from.

  @property
  def latent_shape(self):
    return model.latent_shape(self.config, self.codec)

  def decode_latents(self, samples):
    """The sampler's output -> images (a jitted VAE call in latent diffusion)."""
    return samples if self.codec is None else self.codec.decode(samples)

  @property
  def router(self):
    return routing.Router(routing_table(self.partition, self.config.data))

  def route(self, texts, *, labels=None, cluster=None, unknown=None):
    """[(labels, cluster id)] of each prompt: `cluster` (id or name) for all when given; else
    `labels` (class names) for all when given; else the classes each prompt names (see
    inference/routing.py), the partition's rule deciding the cluster; `unknown` is the cluster
    of a prompt that names none (default: an error)."""
    part = self.partition
    if cluster is not None:
      k = part.cluster_id(int(cluster) if str(cluster).isdigit() else cluster)
      return [(list(labels or ()), k)] * len(texts)
    if labels:
      k = int(part.assign_names([labels])[0])
      return [(list(labels), k)] * len(texts)
    router, out = self.router, []
    for text in texts:
      found, k = router.route(text, unknown)
      out.append((found, int(part.assign_names([found])[0]) if found else k))
    return out

  def place(self, mesh):
    """(params, extra) on `mesh` with the training run's logical shardings (FSDP-sharded weights
    stay sharded), for `generate.*(..., mesh=mesh)`."""
    c = self.config
    cond = jax.tree.map(lambda v: jnp.asarray(v)[None], self.null_cond)
    ids = jnp.zeros((1,), jnp.int32)
    args = backbone.call_args(c.model.backbone, jnp.zeros((1,) + self.latent_shape), ids, cond)
    boxed = jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), *args, cluster_ids=ids,
        **backbone.call_kwargs(c.model.backbone, cond)))
    shardings = sharding.logical_shardings(boxed, mesh, c.mesh)
    variables = {"params": self.params, **self.extra}
    placed = {name: jax.tree.map(jax.device_put, tree, _like(shardings[name], tree))
              for name, tree in variables.items() if name in shardings}
    return placed["params"], {k: v for k, v in placed.items() if k != "params"}


def _like(tree, like):
  """The part of `tree` with the structure of `like` (nested dicts)."""
  return {k: _like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


# ---------------------------------------------------------------------------------------------
# Loading.

def latest_trainables(directory, *, use_ema=True):
  """(trained params, extra collections, step, base sha256) of the latest orbax checkpoint in
  `directory` (WORKDIR/checkpoints), as numpy. Only the trained leaves are read: the EMA when the
  run kept one and use_ema, else the trainables; never the optimizer state or the data position.
  """
  # Every item the trainer writes (trainer/checkpoint.py) has its handler, or orbax warns.
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
              **{k: ocp.JsonCheckpointHandler() for k in ("config", "partition", "base")}}
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=tuple(handlers),
                               item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}: train first")
  meta = mngr.item_metadata(step)["state"]
  meta = getattr(meta, "tree", meta)
  key = "ema" if use_ema and jax.tree.leaves(meta.get("ema", {})) else "params"
  wanted = {key: meta[key], "extra": meta.get("extra", {})}
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True),
      base=ocp.args.JsonRestore()))
  return out.state[key], out.state.get("extra") or {}, step, out.base["sha256"]


def _with_trained(base_params, trained):
  """The base parameters with the trained leaves added (adapters) or replacing them (full)."""
  flat = flax.traverse_util.flatten_dict
  trained = {k: v for k, v in trained.items() if k not in generate.NOT_MODEL}
  return flax.traverse_util.unflatten_dict({**flat(base_params or {}), **flat(trained)})


def load(path, config=None, *, base=None, use_ema=True):
  """A Generator from a run's workdir (its latest checkpoint) or an `export_adapters` folder.

  config: the run config to sample with (default: the one saved with the run), e.g. with
    `config.sample` overridden. base: the frozen base's diffusers folder (default
    `config.model.pretrained`, or the demo's WORKDIR/base; an export folder inside its run,
    WORKDIR/export/adapters, finds that too).
  use_ema: sample with the EMA of the trainables when the checkpoint holds one.
  """
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, export.ADAPTERS_FILE)):
    variables, part, saved = export.load_adapters(path)
    trained = variables.pop("params")
    extra, base_hash, source = variables, None, f"adapter export {path}"
    workdir, cache_dir = os.path.dirname(os.path.dirname(path)), None
  else:
    for name in ("config.json", "partition.json"):
      if not os.path.exists(os.path.join(path, name)):
        raise FileNotFoundError(f"{os.path.join(path, name)} not found: {path} is neither a run's "
                                f"workdir nor an adapter export ({export.ADAPTERS_FILE})")
    saved = ml_collections.ConfigDict(files.read_json(os.path.join(path, "config.json")))
    part = partition_lib.Partition.load(os.path.join(path, "partition.json"))
    trained, extra, step, base_hash = latest_trainables(os.path.join(path, "checkpoints"),
                                                        use_ema=use_ema)
    workdir, cache_dir, source = path, path, f"checkpoint {step} of {path}"
  config = saved if config is None else config
  folder = base or model.base_folder(config, workdir)
  module, base_params, folder_hash = model.load_backbone(config, folder)
  if base_hash is not None and base_hash != folder_hash:
    raise ValueError(f"{source} was trained on another base model than {folder} (sha256 "
                     f"{base_hash[:12]}, found {folder_hash[:12]})")
  codec = model.load_codec(config, module)
  conditioner = conditioning.load_conditioner(config, cache_dir)
  logging.info("sampling %s (%s, %s) on the base %s", source, config.method.name,
               config.model.backbone, folder)
  return Generator(config=config, partition=part, conditioner=conditioner, module=module,
                   schedule=model.make_schedule(config, folder),
                   null_cond=conditioner.null_condition(),
                   params=_with_trained(base_params, trained), extra=extra, codec=codec,
                   source=source)
