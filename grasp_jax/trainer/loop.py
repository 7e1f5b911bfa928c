"""The one trainer: mesh, state, shardings, step, checkpoint, loop.

What is trained, on what data and with which loss is built by `task.experiment.build`; this file
only knows that the loss is per-sample, that every sample has a cluster id, which parameters are
trainable, and the method's hook (`trainer.methods`: SeLoRA's probe and rank growth). The same code runs on one CPU, 8 fake CPU devices, GPUs, a TPU pod slice, and several
hosts.
"""
import dataclasses
import functools
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
import optax

from grasp_jax.trainer import accounting
from grasp_jax.trainer import checkpoint
from grasp_jax.trainer import optim
from grasp_jax.parallel import sharding
from grasp_jax.trainer import methods
from grasp_jax.trainer import metrics as train_metrics
from grasp_jax.models import trainable as trainable_lib


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
  method_state: Any  # The method hook's own state (SeLoRA's Fisher sums; {} otherwise).


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
  variables = initial_variables(exp, config, mesh)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  trainable, frozen = trainable_lib.split(params, config.method.trainable)
  tx = optim.make_optimizer(config.optim, config.train.steps, config.method)

  init_state = state_initializer(config, tx)
  state = jax.jit(init_state, out_shardings=state_shardings(init_state, trainable, extra, mesh))(
      trainable, extra)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step_fn, seconds = compile_step(exp, config, mesh, tx, state, frozen, example_batch)
  return Trainer(mesh=mesh, state=state, frozen=frozen, step_fn=step_fn,
                 abstract_state=abstract_state, tx=tx, compile_seconds=seconds)


def initial_variables(exp, config, mesh):
  """The variables the trainer starts from (`init_variables` of config.seed), sharded over
  `mesh`: also the zero-step model that a run's before/after comparison samples."""
  rng = jax.random.key(config.seed)
  boxed = jax.eval_shape(exp.init_variables, rng)
  shardings = sharding.logical_shardings(boxed, mesh, config.mesh)
  base = exp.base_on_devices(shardings["params"])
  return jax.jit(functools.partial(init_variables, exp, config),
                 out_shardings=shardings, donate_argnums=1)(rng, base)


def init_variables(exp, config, rng, base):
  """The run's variables, unboxed, frozen leaves in config.model.frozen_dtype: a placed base
  comes in that dtype already (`Experiment.base_on_devices`); a random init is cast here, inside
  the jitted init, so its float32 frozen leaves are never outputs."""
  variables = nn.unbox(exp.init_variables(rng, base))
  trainable, frozen = trainable_lib.split(variables["params"], config.method.trainable)
  return {**variables, "params": trainable_lib.merge(trainable, store_frozen(frozen, config))}


def store_frozen(frozen, config):
  """The frozen params as kept on device: floating leaves in config.model.frozen_dtype.

  The models cast every parameter to their compute dtype where they use it (flax layers' dtype,
  adapters.Dense's astype), so low-precision frozen leaves go straight into the forward pass:
  there is no whole-tree upcast that would keep a float32 copy alive through the backward pass.
  """
  dtype = jnp.dtype(config.model.frozen_dtype)
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def micro_batch_size(config, mesh):
  """Samples per micro-batch; each must split evenly over the mesh's batch shards."""
  batch, steps = config.data.batch_size, config.train.grad_accum_steps
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % (steps * shards):
    raise ValueError(f"config.data.batch_size={batch} does not split into "
                     f"config.train.grad_accum_steps={steps} micro-batches over the {shards} "
                     f"batch shards of mesh {dict(mesh.shape)}: it must be a multiple of "
                     f"{steps * shards}")
  return batch // steps


def state_initializer(config, tx):
  """(trainable, extra) -> TrainState; jitted by `setup`, traced abstractly by run/dry_run.py."""
  def init_state(trainable, extra):
    ema = jax.tree.map(jnp.copy, trainable) if config.train.ema_decay > 0 else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      opt_state=tx.init(trainable), ema=ema, extra=extra,
                      method_state=methods.for_config(config.method).init(trainable))
  return init_state


def state_shardings(init_state, trainable, extra, mesh):
  """The TrainState's shardings: optimizer moments and EMA take their parameter's sharding."""
  return sharding.mirror_shardings(jax.eval_shape(init_state, trainable, extra), trainable, mesh)


def train_step(state, frozen, batch, *, exp, config, tx):
  """One optimizer step on the trainables: (state, frozen, batch) -> (state, metrics, finite).

  With config.train.grad_accum_steps = N > 1 the batch is split into N micro-batches, sample i
  into micro-batch i % N (so every device splits its own shard and no data moves), each with its
  own noise rng fold_in(rng, i); a scan averages their gradients. The optimizer, the method hook,
  EMA and metrics then see the mean gradient of the whole batch, once per step.
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  num_clusters = exp.partition.num_clusters
  method = methods.for_config(config.method)
  extra = method.forward_extra(state.extra)

  def loss_fn(trainable, batch, rng):
    per_sample, aux_loss = exp.loss_fn(trainable_lib.merge(trainable, frozen), extra, batch, rng)
    return jnp.mean(per_sample) + aux_loss, per_sample

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n = config.train.grad_accum_steps
  if n == 1:
    (loss, per_sample), grads = grad_fn(state.params, batch, rng)
  else:
    def accumulate(carry, xs):
      micro, i = xs
      (loss, per_sample), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), per_sample

    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, n) + x.shape[1:]), 0, 1), batch)
    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), per_sample = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n)))
    loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
    per_sample = jnp.swapaxes(per_sample, 0, 1).reshape(-1)  # Back in batch order.
  grads, method_state = method.grads(grads, state.extra, state.method_state)
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
  params, new_extra, method_state = method.after_update(state.step, params, state.extra,
                                                        method_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                            extra=new_extra, method_state=method_state)
  metrics = train_metrics.TrainMetrics.single_from_model_output(
      loss=loss, grad_norm=grad_norm, learning_rate=tx.learning_rate_fn(state.step),
      cluster_loss_sum=jax.ops.segment_sum(per_sample, cluster_ids, num_clusters),
      cluster_count=counts)
  return new_state, metrics, finite


def example_batch(exp, mesh):
  """One process's share of a step's batch: shapes and dtypes as the step takes them (latents
  in latent diffusion, so one batch is encoded here)."""
  host = exp.device_batch(next(exp.train_iterator()))
  placed = exp.encode_batch(sharding.put_batch(host, mesh), jax.random.key(0))
  return jax.tree.map(lambda h, x: jax.ShapeDtypeStruct(h.shape[:1] + x.shape[1:], x.dtype),
                      host, placed)


def compile_step(exp, config, mesh, tx, state, frozen, example_batch):
  """AOT-compiles the step; returns (compiled, seconds). `example_batch`: one process's share."""
  micro_batch_size(config, mesh)  # Fails before compiling when the batch does not split.
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), example_batch)
  step = jax.jit(functools.partial(train_step, exp=exp, config=config, tx=tx),
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

def fit(exp, config, workdir, devices=None, periodic=None):
  """Trains `exp` to config.train.steps, resuming from WORKDIR/checkpoints; returns the Trainer.

  `devices` restricts the mesh to a subset of the devices (default: all). `periodic(trainer,
  step, writer)` runs after every step (the run's in-training hooks: diagnostics, grids, eval).
  """
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"),
                            save_every=config.train.checkpoint_every,
                            keep=config.train.keep_checkpoints)
  start = checkpoint.resume_step(mngr, config.train.resume_from)
  if start is not None:  # Checked before anything is compiled.
    checkpoint.check_config(mngr, start, config)
    checkpoint.set_aside_after(mngr, start)
  mesh = sharding.make_mesh(config.mesh, devices)
  data_iter = exp.train_iterator()
  trainer = setup(exp, config, mesh, example_batch(exp, mesh))
  if start is not None:
    _restore(trainer, mngr, start, exp, data_iter)
    logging.info("resumed from step %d", start)

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
      if periodic is not None:
        periodic(trainer, step, writer)
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
# Resume for the one-stage modes.

def restore_latest(exp, config, workdir):
  """A Trainer holding the latest checkpoint of WORKDIR, or step config.train.resume_from (for
  the sample/evaluate/... modes)."""
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
  step = checkpoint.resume_step(mngr, config.train.resume_from)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
  checkpoint.check_config(mngr, step, config)
  mesh = sharding.make_mesh(config.mesh)
  data_iter = exp.train_iterator()
  trainer = setup(exp, config, mesh, example_batch(exp, mesh))
  _restore(trainer, mngr, step, exp, data_iter)
  return trainer


def _restore(trainer, mngr, step, exp, data_iter):
  """Loads checkpoint `step` into `trainer` after checking its base model and partition."""
  state, base_hash, partition = checkpoint.restore(mngr, step, trainer.abstract_state, data_iter)
  where = f"{mngr.directory}/{step}"
  if base_hash != exp.base_hash:
    raise ValueError(f"{where} was trained on a different base model (sha256 {base_hash[:12]}, "
                     f"now {exp.base_hash[:12]})")
  checkpoint.check_partition(partition, exp.partition, where)
  trainer.state = state
