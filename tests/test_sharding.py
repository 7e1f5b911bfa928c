"""FSDP rules on 8 fake devices: large-backbone PartitionSpecs, and sharded steps equal unsharded.

The SD3-medium-sized MMDiT and SD2-sized UNet are only traced (jax.eval_shape: nothing is
allocated); their sizes are checked against diffusers' PyTorch models built on the meta device.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from configs import sharding as sharding_configs
from grasp_jax.run import dry_run
from grasp_jax.parallel import sharding
from grasp_jax.trainer import loop
from grasp_jax.models import adapters
from grasp_jax.models import dit
from grasp_jax.models import unet

import test_train

DATA, FSDP, K = 2, 4, 4
BIG = 1_000_000  # Parameters above this size must be sharded.


def _mesh_config():
  c = common.base_config().mesh
  c.data, c.fsdp, c.rules = DATA, FSDP, sharding_configs.fsdp_rules()
  return c


def _diffusers_param_count(name, config):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    model = getattr(diffusers, name).from_config(config)
  return sum(p.numel() for p in model.parameters())


def _abstract(lib, arch):
  module = lib.from_config(arch, adapter=adapters.AdapterConfig("grasp", num_clusters=K,
                                                                rank=64))
  boxed = jax.eval_shape(module.init, jax.random.key(0), *lib.example_inputs(module))
  mesh = sharding.make_mesh(_mesh_config())
  return boxed["params"], sharding.logical_shardings(boxed, mesh, _mesh_config())["params"]


@pytest.fixture(scope="module", params=["sd3_medium", "sd2_unet"])
def large(request):
  lib, arch, torch_name = {
      "sd3_medium": (dit, sharding_configs.sd3_medium(), "SD3Transformer2DModel"),
      "sd2_unet": (unet, sharding_configs.sd2_unet(), "UNet2DConditionModel"),
  }[request.param]
  boxed, shardings = _abstract(lib, arch)
  return request.param, boxed, shardings, _diffusers_param_count(torch_name, arch)


def _leaves(boxed, shardings):
  flat_b = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(
      x, nn.Partitioned))
  flat_s = jax.tree.leaves(shardings)
  assert len(flat_b) == len(flat_s)
  for (path, box), s in zip(flat_b, flat_s):
    yield jax.tree_util.keystr(path), nn.unbox(box), s


def test_base_size_matches_diffusers(large):
  name, boxed, shardings, reference = large
  base = sum(int(np.prod(x.shape)) for path, x, _ in _leaves(boxed, shardings)
             if "adapter" not in path)
  assert base == reference, name


def test_every_large_leaf_is_sharded_over_fsdp(large):
  name, boxed, shardings, _ = large
  checked = 0
  for path, x, s in _leaves(boxed, shardings):
    spec = tuple(s.spec) + (None,) * (x.ndim - len(s.spec))
    axes = [i for i, a in enumerate(spec) if a == "fsdp" or (isinstance(a, tuple) and
                                                            "fsdp" in a)]
    assert len(axes) <= 1, (path, spec)
    for i in axes:
      assert x.shape[i] % FSDP == 0, f"{name} {path}: {x.shape} axis {i} not divisible"
    assert "data" not in str(spec), (path, spec)  # Parameters are never split over 'data'.
    if "adapter" in path:
      assert spec[0] is None and x.shape[0] == K, (path, spec)  # Replicated along K.
    if np.prod(x.shape) > BIG:
      assert axes, f"{name} {path} {x.shape} is replicated: {spec}"
      checked += 1
  assert checked > 20


def test_fsdp_divides_parameter_memory(large):
  _, boxed, shardings, _ = large
  params = dry_run.with_shardings(nn.unbox(boxed), shardings)
  # Per device: a quarter of the sharded leaves plus the (small) replicated ones.
  assert dry_run.device_bytes(params) < 0.26 * dry_run.global_bytes(params)


# ---------------------------------------------------------------------------------------------
# Numerics: one and a few steps with FSDP rules on (data=2, fsdp=4) equal one device.

def _fsdp(config):
  config.mesh.data, config.mesh.fsdp = DATA, FSDP
  config.mesh.rules = sharding_configs.fsdp_rules()
  return config


def test_toy_fsdp_training_equals_single_device(tmp_path):
  config = test_train.toy_config(3, 100)
  single = loop.fit(test_train.ToyExperiment(config, (0, 1, 2, 3)), config,
                     str(tmp_path / "one"), devices=jax.devices()[:1])
  fsdp_config = _fsdp(test_train.toy_config(3, 100))
  sharded = loop.fit(test_train.ToyExperiment(fsdp_config, (0, 1, 2, 3)), fsdp_config,
                      str(tmp_path / "fsdp"))
  down = sharded.state.params["ff"]["adapter"]["down"]  # [K, C, r]: C over 'fsdp'.
  assert down.sharding.spec[:2] == (None, "fsdp")
  # Adam's moments live where their parameter lives (not replicated on every device).
  for leaf in jax.tree.leaves(sharded.state.opt_state):
    if leaf.shape == down.shape:
      assert leaf.sharding.is_equivalent_to(down.sharding, down.ndim)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               test_train.trainable(single), test_train.trainable(sharded))


def test_tiny_mmdit_full_step_fsdp_equals_single_device():
  config = common.base_config()
  config.model.backbone, config.diffusion.objective = "dit", "flow"
  config.model.base = {"num_layers": 1, "sample_size": 16, "pos_embed_max_size": 4}
  config.data.image_size = 16
  config.method = common.method_config("full", num_clusters=K)
  # SGD: the update is linear in the gradient (Adam's first step is ~sign(g), noise-sensitive).
  config.optim.name, config.optim.learning_rate = "sgd", 0.1
  config.data.batch_size, config.text.max_length = 8, 4
  exp = dry_run.abstract_experiment(config)
  rng = np.random.default_rng(0)
  batch = {k: rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else
           rng.integers(0, K, size=x.shape).astype(x.dtype)
           for k, x in dry_run.abstract_batch(config, exp, 8).items()}

  def one_step(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer = loop.setup(exp, config, mesh, batch)
    with jax.set_mesh(mesh):
      state, metrics, _ = trainer.step_fn(trainer.state, trainer.frozen,
                                          sharding.put_batch(batch, mesh))
    return jax.device_get(state.params), float(metrics.compute()["loss"]), state

  ref_params, ref_loss, _ = one_step(config, jax.devices()[:1])
  params, loss, state = one_step(_fsdp(config.copy_and_resolve_references()), None)
  kernel = state.params["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, ref_params)


def test_checkpoint_from_8_devices_continues_on_4(tmp_path):
  """FSDP (data=2, fsdp=4) for 3 steps, then (data=2, fsdp=2) on 4 devices to step 6."""
  workdir = str(tmp_path / "run")
  first = _fsdp(test_train.toy_config(3, 3))
  loop.fit(test_train.ToyExperiment(first, (0, 1, 2, 3)), first, workdir)
  second = test_train.toy_config(6, 3)
  second.mesh.data, second.mesh.fsdp = -1, 2
  second.mesh.rules = sharding_configs.fsdp_rules()
  resumed = loop.fit(test_train.ToyExperiment(second, (0, 1, 2, 3)), second, workdir,
                      devices=jax.devices()[:4])
  assert resumed.mesh.devices.size == 4 and int(resumed.state.step) == 6
  reference = test_train.toy_config(6, 100)
  single = loop.fit(test_train.ToyExperiment(reference, (0, 1, 2, 3)), reference,
                     str(tmp_path / "one"), devices=jax.devices()[:1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               test_train.trainable(single), test_train.trainable(resumed))
