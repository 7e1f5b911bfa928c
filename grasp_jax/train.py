"""The one trainer: mesh, state, shardings, step, checkpoint, loop.

What is trained, on what data and with which loss is built by `experiment.build`; this file only
knows that the loss is per-sample, that every sample has a cluster id, and which parameters are
trainable. The same code runs on one CPU, 8 fake CPU devices, GPUs, a TPU pod slice, and several
hosts.
"""
import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import optax

from configs import common
from grasp_jax import accounting
from grasp_jax import checkpoint
from grasp_jax import distributed
from grasp_jax import optim
from grasp_jax import sharding
from grasp_jax import train_metrics
from grasp_jax.models import adapters
from grasp_jax.models import convert


class NonFiniteLossError(FloatingPointError):
  """A step produced a NaN/inf loss or gradient (config.train.nan_policy='stop')."""


# ---------------------------------------------------------------------------------------------
# State.

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # Trainable parameters only; the frozen base is passed to the step separately.
  opt_state: Any
  ema: Any  # EMA of the trainables ({} when off).
  extra: Any  # Non-trainable model variables that training updates (e.g. SeLoRA rank masks).
  fisher: Any  # SeLoRA: squared-gradient sums since the last growth check ({} otherwise).


def _ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


@dataclasses.dataclass
class Trainer:
  """Compiled pieces of one training run on one mesh."""
  mesh: Any
  state: TrainState
  frozen: Any
  step_fn: Any  # Compiled: (state, frozen, batch) -> (state, metrics, finite).
  abstract_state: Any
  tx: Any
  compile_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Setup: abstract shapes -> shardings -> initialised, sharded state -> compiled step.

def setup(exp, config, mesh, example_batch):
  """Initialises the sharded state and compiles the train step ahead of time."""
  rng = jax.random.key(config.seed)
  boxed = jax.eval_shape(exp.init_variables, rng)
  shardings = sharding.logical_shardings(boxed, mesh, config.mesh)
  base = exp.base_on_devices(shardings["params"])
  variables = jax.jit(lambda r, b: nn.unbox(exp.init_variables(r, b)),
                      out_shardings=shardings, donate_argnums=1)(rng, base)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  trainable, frozen = optim.split(params, config.method.trainable)
  tx = optim.make_optimizer(config.optim, config.train.steps, config.method)

  init_state = state_initializer(config, tx)
  state = jax.jit(init_state, out_shardings=state_shardings(init_state, trainable, extra, mesh))(
      trainable, extra)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step_fn, seconds = compile_step(exp, config, mesh, tx, state, frozen, example_batch)
  return Trainer(mesh=mesh, state=state, frozen=frozen, step_fn=step_fn,
                 abstract_state=abstract_state, tx=tx, compile_seconds=seconds)


def state_initializer(config, tx):
  """(trainable, extra) -> TrainState; jitted by `setup`, traced abstractly by memory.py."""
  def init_state(trainable, extra):
    ema = jax.tree.map(jnp.copy, trainable) if config.train.ema_decay > 0 else {}
    fisher = adapters.selora_fisher_init(trainable) if _selora(config) else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      opt_state=tx.init(trainable), ema=ema, extra=extra, fisher=fisher)
  return init_state


def state_shardings(init_state, trainable, extra, mesh):
  """The TrainState's shardings: optimizer moments and EMA take their parameter's sharding."""
  return sharding.mirror_shardings(jax.eval_shape(init_state, trainable, extra), trainable, mesh)


def _selora(config):
  return config.method.adapter == "selora"


def _train_step(state, frozen, batch, *, exp, config, tx):
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  num_clusters = exp.partition.num_clusters
  # SeLoRA probes each layer's next rank in the same backward pass (its B row is zero, so the
  # loss is unchanged) to measure the Fisher information that rank would add.
  extra = ({**state.extra, "selora": adapters.selora_probe(state.extra["selora"])}
           if _selora(config) else state.extra)

  def loss_fn(trainable):
    per_sample, aux_loss = exp.loss_fn(optim.merge(trainable, frozen), extra, batch, rng)
    return jnp.mean(per_sample) + aux_loss, per_sample

  (loss, per_sample), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  fisher = state.fisher
  if _selora(config):
    fisher = adapters.selora_fisher_update(fisher, grads)
    grads = adapters.selora_mask_grads(grads, state.extra["selora"])
  cluster_ids = batch["cluster_id"]
  counts = jax.ops.segment_sum(jnp.ones_like(per_sample), cluster_ids, num_clusters)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, present=counts > 0)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if config.train.nan_policy == "skip":
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  ema = state.ema
  if config.train.ema_decay > 0:
    ema = _ema_update(ema, params, config.train.ema_decay)
  new_extra = state.extra
  if _selora(config):
    params, new_extra, fisher = _selora_growth(state.step, params, state.extra, fisher, config)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                            extra=new_extra, fisher=fisher)
  metrics = train_metrics.TrainMetrics.single_from_model_output(
      loss=loss, grad_norm=grad_norm, learning_rate=tx.learning_rate_fn(state.step),
      cluster_loss_sum=jax.ops.segment_sum(per_sample, cluster_ids, num_clusters),
      cluster_count=counts)
  return new_state, metrics, finite


def _selora_growth(step, params, extra, fisher, config):
  """Every `method.selora_every` steps: grow ranks whose Fisher ratio exceeds the threshold."""
  grown_params, grown_vars, _ = adapters.selora_grow(params, extra["selora"], fisher,
                                                    config.method.selora_threshold)
  due = (step + 1) % config.method.selora_every == 0
  pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(due, x, y), a, b)
  reset = jax.tree.map(jnp.zeros_like, fisher)
  return (pick(grown_params, params), {**extra, "selora": pick(grown_vars, extra["selora"])},
          pick(reset, fisher))


def _example_batch(exp, mesh):
  """One process's share of a step's batch: shapes and dtypes as the step takes them (latents
  in latent diffusion, so one batch is encoded here)."""
  host = exp.device_batch(next(exp.train_iterator()))
  placed = exp.encode_batch(sharding.put_batch(host, mesh), jax.random.key(0))
  return jax.tree.map(lambda h, x: jax.ShapeDtypeStruct(h.shape[:1] + x.shape[1:], x.dtype),
                      host, placed)


def compile_step(exp, config, mesh, tx, state, frozen, example_batch):
  """AOT-compiles the step; returns (compiled, seconds). `example_batch`: one process's share."""
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), example_batch)
  step = jax.jit(functools.partial(_train_step, exp=exp, config=config, tx=tx),
                 in_shardings=(state_sh, frozen_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh), sharding.replicated(mesh)),
                 donate_argnums=(0,))
  # Every process feeds an equal share of the global batch (sharding.put_batch).
  global_shape = lambda x: (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(global_shape(x), x.dtype, sharding=s), example_batch,
      batch_sh)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, abstract_batch).compile()
  seconds = time.perf_counter() - start
  logging.info("train step compiled in %.1f s", seconds)
  return compiled, seconds


# ---------------------------------------------------------------------------------------------
# Loop.

def _check_finite(finite, step, cluster_ids, config, mngr):
  if bool(finite):
    return
  msg = (f"non-finite loss or gradient at step {step}; clusters in the batch: "
         f"{sorted(set(cluster_ids.tolist()))}; last good checkpoint: step "
         f"{mngr.latest_step()} in {mngr.directory}")
  if config.train.nan_policy == "stop":
    mngr.wait_until_finished()
    raise NonFiniteLossError(msg)
  logging.warning("%s (step skipped)", msg)

def fit(exp, config, workdir, devices=None):
  """Trains `exp` to config.train.steps, resuming from WORKDIR/checkpoints; returns the Trainer.

  `devices` restricts the mesh to a subset of the devices (default: all).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  data_iter = exp.train_iterator()
  trainer = setup(exp, config, mesh, _example_batch(exp, mesh))
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"),
                            save_every=config.train.checkpoint_every,
                            keep=config.train.keep_checkpoints)
  latest = mngr.latest_step()
  if latest is not None:
    state, base_hash, _ = checkpoint.restore(mngr, latest, trainer.abstract_state, data_iter)
    if base_hash != exp.base_hash:
      raise ValueError(f"{workdir}/checkpoints/{latest} was trained on a different base model "
                       f"(sha256 {base_hash[:12]}, now {exp.base_hash[:12]})")
    trainer.state = state
    logging.info("resumed from step %d", latest)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=config.train.steps,
                                                 writer=writer))
    if config.train.profile_steps:
      hooks.append(periodic_actions.Profile(logdir=workdir,
                                            num_profile_steps=config.train.profile_steps))
  meter = accounting.Meter(trainer.step_fn, global_batch=config.data.batch_size,
                           num_devices=mesh.size, device_kind=mesh.devices.flat[0].device_kind,
                           compile_seconds=trainer.compile_seconds)
  writer.write_scalars(int(trainer.state.step), meter.compile_scalars())
  accumulated, pending = None, None
  step = int(trainer.state.step)
  encode_key = jax.random.split(jax.random.key(config.seed))[1]  # VAE posterior samples.
  with jax.set_mesh(mesh):
    while step < config.train.steps:
      host = next(data_iter)
      batch = exp.encode_batch(sharding.put_batch(exp.device_batch(host), mesh),
                               jax.random.fold_in(encode_key, step))
      trainer.state, metrics, finite = trainer.step_fn(trainer.state, trainer.frozen, batch)
      step += 1
      # The previous step's flag is read after this step is queued, so the host never stalls
      # the device; a bad step is still reported with its own number and clusters.
      if pending is not None:
        _check_finite(*pending, config, mngr)
      pending = (finite, step, host["cluster_id"])
      accumulated = metrics if accumulated is None else accumulated.merge(metrics)
      for hook in hooks:
        hook(step)
      if step % config.train.log_every == 0 or step == config.train.steps:
        writer.write_scalars(step, {**train_metrics.scalars(
            accumulated.compute(), exp.partition.cluster_names), **meter.scalars(step)})
        accumulated = None
      exp.periodic(trainer, step, writer)
      last = step == config.train.steps
      if last or mngr.should_save(step):  # Never checkpoint a non-finite state.
        _check_finite(*pending, config, mngr)
        pending = None
      checkpoint.save(mngr, step, trainer.state, data_iter, config.to_json_best_effort(),
                      exp.partition.to_json(), exp.base_hash,
                      force=last)
  mngr.wait_until_finished()
  writer.flush()
  return trainer


# ---------------------------------------------------------------------------------------------
# Stages.

def pretrain_base(config, workdir):
  """The demo's own base model: full training from scratch, saved as a diffusers folder."""
  from grasp_jax import experiment  # The data/model stack; fit() itself needs none of it.
  base_dir = os.path.join(workdir, "base")
  if os.path.exists(os.path.join(base_dir, "config.json")):
    return base_dir
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.method = common.method_config("full", num_clusters=config.method.num_clusters)
    cfg.train.steps = config.model.base_steps
    cfg.optim.learning_rate = config.model.base_learning_rate
    cfg.data.balance = ""
    cfg.diffusion.cbdm_weight = cfg.diffusion.coral_weight = 0.0  # Regularisers are fine-tuning's.
  run_dir = os.path.join(workdir, "base_run")
  exp = experiment.build(cfg, run_dir, from_scratch=True)
  logging.info("pretraining the base model for %d steps in %s", cfg.train.steps, run_dir)
  trainer = fit(exp, cfg, run_dir)
  # Gathered by every process (FSDP shards may live on other hosts), written by one.
  params = multihost_utils.process_allgather(optim.merge(trainer.state.params, trainer.frozen),
                                             tiled=True)
  if distributed.is_primary():
    convert.save_diffusers(base_dir, params, exp.lib.tiny_config(**cfg.model.base.to_dict()))
  distributed.barrier("base_model_saved")  # The others read base/ next.
  return base_dir


def restore_latest(exp, config, workdir):
  """A Trainer holding the latest checkpoint of WORKDIR (for the sample/evaluate/... modes)."""
  mesh = sharding.make_mesh(config.mesh)
  data_iter = exp.train_iterator()
  trainer = setup(exp, config, mesh, _example_batch(exp, mesh))
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
  trainer.state, _, _ = checkpoint.restore(mngr, step, trainer.abstract_state, data_iter)
  return trainer


def train_and_evaluate(config, workdir, mode="train"):
  """main's entry. train: (pretrain the base,) fine-tune, export; the other modes run one stage
  on the latest checkpoint of WORKDIR."""
  from grasp_jax import diagnostics
  from grasp_jax import experiment
  from grasp_jax import export
  from grasp_jax import generate
  from grasp_jax.evaluation import evaluate as evaluate_lib
  if mode == "train":
    if not config.model.pretrained:
      pretrain_base(config, workdir)
    exp = experiment.build(config, workdir)
    trainer = fit(exp, config, workdir)
  else:
    exp = experiment.build(config, workdir)
    trainer = restore_latest(exp, config, workdir)
  step = int(trainer.state.step)
  if mode in ("train", "export"):
    export.run_export(exp, trainer, workdir)
  if mode == "diagnose":
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    with jax.set_mesh(trainer.mesh):
      result = diagnostics.run_diagnostics(
          exp, optim.merge(trainer.state.params, trainer.frozen), trainer.state.extra,
          exp.heldout_batches(trainer.mesh), jax.random.key(config.seed + 1), writer, step)
    path = os.path.join(workdir, "diagnostics", f"step_{step}.json")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(result, f, indent=2)
    writer.flush()
  if mode in ("train", "sample", "evaluate"):
    params, extra = generate.sampling_params(trainer)
    with jax.set_mesh(trainer.mesh):
      out = generate.run_sample(exp, params, extra, workdir, mesh=trainer.mesh)
      if mode != "sample":
        writer = metric_writers.create_default_writer(workdir,
                                                      just_logging=jax.process_index() > 0)
        evaluate_lib.evaluate(exp, params, extra, workdir, writer, step,
                              rng=jax.random.key(config.seed), mesh=trainer.mesh,
                              samples=(out.images, out.labels))
        writer.flush()
  return trainer
