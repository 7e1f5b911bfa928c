"""Memory knobs: gradient accumulation over micro-batches, low-precision frozen params.

Checked against independent computations: the toy's one full-batch step (its loss draws no noise,
so N micro-batches must give the same update), a per-micro-batch gradient loop for the tiny
MMDiT's noisy flow loss, float32 params rounded to bfloat16 and upcast by hand (what the models'
per-layer casts must equal), and a VAE run on hand-rounded weights.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from grasp_jax.inference import latents
from grasp_jax.models import adapters
from grasp_jax.models import convert
from grasp_jax.models import trainable as trainable_lib
from grasp_jax.models import vae as vae_lib
from grasp_jax.parallel import sharding
from grasp_jax.run import dry_run
from grasp_jax.run import setup as setup_lib
from grasp_jax.trainer import checkpoint
from grasp_jax.trainer import loop
import test_train

BF16 = jnp.dtype("bfloat16")


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.

def _toy(method, accum, steps=3):
  config = test_train.toy_config(steps, 100)
  config.method = common.method_config(method, num_clusters=test_train.K, rank=2)
  config.method.selora_every = 2  # SeLoRA grows ranks after the second step.
  config.train.ema_decay = 0.9
  config.train.grad_accum_steps = accum
  exp = test_train.ToyExperiment(config, (0, 1, 2, 3))
  exp.module = test_train.Toy(adapters.AdapterConfig(method=method, num_clusters=test_train.K,
                                                     rank=2))
  return exp, config


def _run_steps(exp, config, devices, steps=2):
  """(host state, [metrics]) after `steps` steps on the toy's first batches."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  data = exp.train_iterator()
  trainer = loop.setup(exp, config, mesh, exp.device_batch(next(exp.train_iterator())))
  computed = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      batch = sharding.put_batch(exp.device_batch(next(data)), mesh)
      trainer.state, metrics, _ = trainer.step_fn(trainer.state, trainer.frozen, batch)
      computed.append(metrics.compute())
  return _host(trainer.state), computed


@pytest.mark.parametrize("method,accum,devices", [("grasp", 4, 2), ("selora", 2, 4)])
def test_accumulated_step_equals_full_batch_step(method, accum, devices):
  """Params, optimizer state, EMA, the method's state (SeLoRA's Fisher sums and grown ranks) and
  the metrics after N micro-batches per step equal those of one full-batch step."""
  full, full_metrics = _run_steps(*_toy(method, 1), devices)
  accumulated, accumulated_metrics = _run_steps(*_toy(method, accum), devices)
  _close(full, accumulated)
  for a, b in zip(full_metrics, accumulated_metrics):
    _close(a, b)
  if method == "selora":
    assert any(np.asarray(m).sum() > 1 for m in jax.tree.leaves(full.extra["selora"]))


def test_accumulation_may_change_on_resume(tmp_path):
  """N is a memory knob (the step above): a run resumes under another N; the frozen params'
  dtype rounds the base the adapters train on, so it may not change."""
  def fit(steps, accum, frozen_dtype="float32"):
    exp, config = _toy("grasp", accum, steps)
    config.model.frozen_dtype = frozen_dtype
    return loop.fit(exp, config, str(tmp_path), devices=jax.devices()[:4])

  fit(1, 1)
  assert int(fit(2, 2).state.step) == 2
  with pytest.raises(checkpoint.ConfigChangedError, match="model.frozen_dtype"):
    fit(3, 2, frozen_dtype="bfloat16")


# ---------------------------------------------------------------------------------------------
# The tiny MMDiT: noisy loss, frozen base.

BATCH = 8


def _dit_config(method="grasp", accum=1, frozen_dtype="float32"):
  c = common.base_config()
  c.model.backbone, c.diffusion.objective = "dit", "flow"
  c.model.base = {"num_layers": 1, "sample_size": 16, "pos_embed_max_size": 4}
  c.method = common.method_config(method, num_clusters=4, rank=4)
  c.model.frozen_dtype = frozen_dtype
  c.data.image_size, c.data.batch_size, c.text.max_length = 16, BATCH, 4
  c.train.grad_accum_steps = accum
  c.optim.name, c.optim.learning_rate, c.optim.grad_clip = "sgd", 1.0, 0.0  # update = -grad
  c.mesh.data = 4
  return c


def _dit_batch(config, exp, seed=0):
  rng = np.random.default_rng(seed)
  shapes = dry_run.abstract_batch(config, exp, BATCH)
  batch = {k: rng.normal(size=x.shape).astype(np.float32) for k, x in shapes.items()}
  batch["cluster_id"] = np.arange(BATCH, dtype=np.int32) % 4
  batch["label"] = batch["cluster_id"]
  return batch


@pytest.fixture(scope="module")
def dit_base():
  """The tiny MMDiT's base params (host float32), as a pretrained folder would give them."""
  config = _dit_config()
  exp = dry_run.abstract_experiment(config)
  params = jax.jit(lambda r: nn.unbox(exp.init_variables(r)))(jax.random.key(3))["params"]
  _, base = trainable_lib.split(params, config.method.trainable)
  return _host(base)


def _trainer(config, base):
  exp = dry_run.abstract_experiment(config)
  exp.base_params = base
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  batch = _dit_batch(config, exp)
  return exp, mesh, batch, loop.setup(exp, config, mesh, batch)


def test_accumulated_gradient_equals_per_micro_batch_loop(dit_base):
  """One SGD step (lr 1) with N=2 moves the trainables by minus the mean of the gradients of
  micro-batches batch[i::2] at rng fold_in(step rng, i), computed one by one here."""
  config = _dit_config(accum=2)
  exp, mesh, batch, trainer = _trainer(config, dit_base)
  before, frozen = _host(trainer.state), _host(trainer.frozen)
  with jax.set_mesh(mesh):
    state, _, _ = trainer.step_fn(trainer.state, trainer.frozen,
                                  sharding.put_batch(batch, mesh))
  moved = jax.tree.map(lambda a, b: a - b, before.params, _host(state.params))
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 0)

  @jax.jit
  def grad(params, micro, rng):
    def loss(p):
      per_sample, aux = exp.loss_fn(trainable_lib.merge(p, frozen), before.extra, micro, rng)
      return jnp.mean(per_sample) + aux
    return jax.grad(loss)(params)

  grads = [grad(before.params, jax.tree.map(lambda x: x[i::2], batch),
                jax.random.fold_in(step_rng, i)) for i in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  _close(moved, _host(expected), rtol=1e-4, atol=1e-6)
  # The two micro-batches' gradients differ: the split and the rng matter to this check.
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, grads))) > 1e-3


def test_bfloat16_frozen_params(dit_base):
  """The frozen base is bfloat16 on device (the float32 base rounded), trainables and optimizer
  state float32; the loss is within bfloat16 rounding of the float32 run's."""
  runs = {}
  for dtype in ("float32", "bfloat16"):
    exp, mesh, batch, trainer = _trainer(_dit_config(frozen_dtype=dtype), dit_base)
    runs[dtype] = trainer
    with jax.set_mesh(mesh):
      _, metrics, _ = trainer.step_fn(trainer.state, trainer.frozen,
                                      sharding.put_batch(batch, mesh))
    runs[dtype + "_loss"] = float(metrics.compute()["loss"])
  half = runs["bfloat16"]
  assert {x.dtype for x in jax.tree.leaves(half.frozen)} == {BF16}
  rounded = jax.tree.map(lambda x: x.astype(BF16), dit_base)
  jax.tree.map(np.testing.assert_array_equal, _host(half.frozen), rounded)
  assert {x.dtype for x in jax.tree.leaves(half.abstract_state)} <= {np.dtype("float32"),
                                                                   np.dtype("int32")}
  assert dry_run.global_bytes(half.frozen) * 2 == dry_run.global_bytes(runs["float32"].frozen)
  full, low = runs["float32_loss"], runs["bfloat16_loss"]
  assert low != full and abs(low - full) < 1e-2 * abs(full)


def test_full_fine_tuning_keeps_float32():
  """Method 'full' trains every base leaf: frozen_dtype leaves them float32 and unrounded (the
  base as `loop.setup` places and initialises it)."""
  config = _dit_config(method="full", frozen_dtype="bfloat16")
  exp = dry_run.abstract_experiment(config)
  rng = jax.random.key(3)
  exp.base_params = _host(jax.jit(lambda r: nn.unbox(exp.init_variables(r)))(rng)["params"])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  shardings = sharding.logical_shardings(jax.eval_shape(exp.init_variables, rng), mesh,
                                         config.mesh)
  params = jax.jit(lambda r, b: loop.init_variables(exp, config, r, b))(
      rng, exp.base_on_devices(shardings["params"]))["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
  jax.tree.map(np.testing.assert_array_equal, _host(params), exp.base_params)


def test_models_cast_frozen_leaves_per_layer():
  """bfloat16 frozen leaves fed straight to the model give the loss of the same leaves upcast
  to float32 by hand, bit for bit: every layer casts its params to the compute dtype (so the
  step needs no whole-tree upcast, which would keep a float32 copy alive). The VAE test below
  covers the convolution and group-norm blocks the UNet shares."""
  config = _dit_config()
  exp = dry_run.abstract_experiment(config)
  variables = jax.jit(lambda r: nn.unbox(exp.init_variables(r)))(jax.random.key(0))
  trainable, frozen = trainable_lib.split(variables["params"], config.method.trainable)
  low = jax.tree.map(lambda x: np.asarray(x).astype(BF16), frozen)
  upcast = jax.tree.map(lambda x: x.astype(np.float32), low)
  extra = {k: v for k, v in variables.items() if k != "params"}
  loss = jax.jit(lambda f, b: exp.loss_fn(trainable_lib.merge(trainable, f), extra, b,
                                          jax.random.key(1))[0])
  batch = _dit_batch(config, exp)
  np.testing.assert_array_equal(loss(low, batch), loss(upcast, batch))


# ---------------------------------------------------------------------------------------------
# The VAE.

def test_vae_bfloat16_storage(tmp_path):
  """load_codec(param_dtype='bfloat16') keeps the VAE bfloat16 on the host and the device and
  encodes as the float32 VAE on the same weights rounded to bfloat16 by hand."""
  module = vae_lib.from_config({"block_out_channels": [8, 8], "norm_num_groups": 4,
                                "latent_channels": 4, "layers_per_block": 1})
  params = module.init(jax.random.key(0), *vae_lib.example_inputs(module))["params"]
  folder = str(tmp_path / "vae")
  convert.save_diffusers(folder, _host(params), {
      "_class_name": "AutoencoderKL", "block_out_channels": [8, 8], "norm_num_groups": 4,
      "latent_channels": 4, "layers_per_block": 1,
      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2})
  codec = latents.load_codec(folder, param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(codec.params_on(None))} == {BF16}
  assert {x.dtype for x in jax.tree.leaves(codec.param_shapes())} == {BF16}
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(BF16).astype(np.float32), _host(params))
  reference = latents.LatentCodec(module, rounded)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(codec.encode(images), reference.encode(images), rtol=1e-6,
                             atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Config checks.

@pytest.mark.parametrize("field,value,message", [
    ("model.frozen_dtype", "bf16", r"config.model.frozen_dtype='bf16' is invalid; expected one "
                                   r"of \('float32', 'bfloat16', 'float16'\)"),
    ("train.grad_accum_steps", 0, r"config.train.grad_accum_steps=0 is invalid; expected an "
                                  r"integer >= 1"),
    ("train.grad_accum_steps", 3, r"config.train.grad_accum_steps=3 is invalid; expected a "
                                  r"divisor of data.batch_size=32"),
])
def test_config_checks(field, value, message):
  config = common.base_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    setup_lib.validate_config(config)


def test_micro_batches_must_split_over_the_mesh():
  config = _dit_config(accum=4)  # 8 samples: micro-batches of 2 over 4 batch shards.
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  with pytest.raises(ValueError, match=r"batch_size=8 does not split into "
                                       r"config.train.grad_accum_steps=4 micro-batches over "
                                       r"the 4 batch shards.*multiple of 16"):
    loop.micro_batch_size(config, mesh)
  assert loop.micro_batch_size(_dit_config(accum=2), mesh) == 4
