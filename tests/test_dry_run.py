"""The dry-run memory plan against what the trainer really allocates (tiny MMDiT, 8 devices)."""
import jax
import numpy as np
import pytest

from configs import common
from configs import sharding as sharding_configs
from grasp_jax.run import dry_run
from grasp_jax.parallel import sharding
from grasp_jax.trainer import loop

BATCH = 8


def _config(batch=BATCH, remat=False, method="grasp"):
  c = common.base_config()
  c.model.backbone, c.diffusion.objective = "dit", "flow"
  c.model.base = {"num_layers": 1, "sample_size": 16, "pos_embed_max_size": 4}
  c.model.remat = remat
  c.method = common.method_config(method, num_clusters=4, rank=4)
  c.data.image_size, c.data.batch_size, c.text.max_length = 16, batch, 4
  c.train.ema_decay = 0.999
  c.mesh.data, c.mesh.fsdp, c.mesh.rules = 2, 4, sharding_configs.fsdp_rules()
  return c


def _device0_bytes(tree):
  """Bytes the arrays of `tree` really occupy on the first device."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.fixture(scope="module")
def planned_and_real():
  config = _config(method="full")
  mesh = sharding.make_mesh(config.mesh)
  planned = dry_run.plan(config, mesh)
  exp = dry_run.abstract_experiment(config)
  rng = np.random.default_rng(0)
  batch = {k: rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else
           np.zeros(x.shape, x.dtype) for k, x in dry_run.abstract_batch(config, exp, BATCH).items()}
  trainer = loop.setup(exp, config, mesh, batch)
  return planned, trainer, sharding.put_batch(batch, mesh)


def test_rows_equal_allocated_bytes(planned_and_real):
  planned, trainer, batch = planned_and_real
  rows = {r.name: r.device_bytes for r in planned.rows}
  s = trainer.state
  assert rows["frozen parameters"] == _device0_bytes(trainer.frozen)
  assert rows["trainable parameters"] == _device0_bytes(s.params)
  assert rows["optimizer state"] == _device0_bytes(s.opt_state)
  assert rows["EMA of trainables"] == _device0_bytes(s.ema)
  assert rows["batch"] == _device0_bytes(batch)
  # FSDP really divides: the parameters take well under half of their size on one device.
  assert rows["trainable parameters"] < 0.5 * dry_run.global_bytes(s.params)


def test_xla_arguments_equal_allocated_inputs(planned_and_real):
  planned, trainer, batch = planned_and_real
  used = {k: v for k, v in batch.items() if k != "label"}  # jit drops the unused argument.
  assert planned.xla["argument"] == _device0_bytes((trainer.state, trainer.frozen, used))
  assert planned.xla["alias"] == _device0_bytes(trainer.state)  # The donated state.
  assert planned.flops_per_device > 0


def test_activations_scale_with_batch_and_shrink_with_remat():
  mesh = sharding.make_mesh(_config().mesh)
  act = lambda config: {r.name: r for r in dry_run.plan(config, mesh, compile_step=False).rows}[
      "activations for backward (est.)"]
  base, double = act(_config()), act(_config(batch=2 * BATCH))
  assert base.device_bytes > 0 and double.device_bytes == 2 * base.device_bytes
  assert base.global_bytes == base.device_bytes * 8  # Batch split over data x fsdp = 8.
  assert act(_config(remat=True)).device_bytes < base.device_bytes


def test_table_lists_every_row(planned_and_real):
  planned, _, _ = planned_and_real
  text = dry_run.format_table(planned)
  for row in planned.rows:
    assert row.name in text
  assert "mesh data=2 x fsdp=4" in text and "XLA" in text
