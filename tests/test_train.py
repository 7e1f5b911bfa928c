"""Trainer mechanics on a toy experiment (a frozen Dense + a GRASP FeedForward, cheap to compile).

Checked against independent computations: the sharded step vs the single-device step, an
interrupted-and-resumed run vs an uninterrupted one, and bitwise isolation of absent clusters.
"""
import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from configs import common
from grasp_jax import partition as partition_lib
from grasp_jax.trainer import loop
from grasp_jax.models import adapters
from grasp_jax.models import attention

K, DIM, B = 4, 8, 8


class Toy(nn.Module):
  adapter: adapters.AdapterConfig

  @nn.compact
  def __call__(self, x, cluster_ids=None):
    h = adapters.Dense(DIM, kernel_axes=("embed", "mlp"), name="base")(x)
    return attention.FeedForward(mult=2, adapter=self.adapter, name="ff")(h, cluster_ids)


@dataclasses.dataclass
class ToyExperiment:
  config: mlc.ConfigDict
  clusters: tuple  # The cluster ids the data may contain.
  poisoned: int = -1  # Records of this cluster carry NaN inputs.

  def __post_init__(self):
    self.partition = partition_lib.build_partition(
        [f"c{i}" for i in range(K)], [100, 50, 20, 5], strategy="class")
    self.module = Toy(adapters.AdapterConfig(method="grasp", num_clusters=K, rank=2))
    self.base_hash = "toy"
    rng = np.random.default_rng(0)
    self.target = rng.normal(size=(DIM, DIM)).astype(np.float32)

  def init_variables(self, rng, base=None):
    del base
    return self.module.init(rng, jnp.zeros((1, 3, DIM)), jnp.zeros((1,), jnp.int32))

  def base_on_devices(self, shardings):
    del shardings

  def train_iterator(self):
    rng = np.random.default_rng(1)
    records = []
    for _ in range(64):
      c = np.int32(rng.choice(self.clusters))
      x = rng.normal(size=(3, DIM)).astype(np.float32)
      records.append({"x": x * np.nan if c == self.poisoned else x, "cluster_id": c})
    ds = grain.MapDataset.source(records).shuffle(seed=3).repeat().batch(B)
    return iter(ds.to_iter_dataset())

  def device_batch(self, host_batch):
    return host_batch

  def encode_batch(self, batch, rng):
    del rng
    return batch

  def loss_fn(self, params, extra, batch, rng):
    del rng
    y = self.module.apply({"params": params, **extra}, batch["x"], batch["cluster_id"])
    return jnp.mean(jnp.square(y - batch["x"] @ self.target), axis=(1, 2)), 0.0


def toy_config(steps, checkpoint_every, data=-1, fsdp=1):
  c = common.base_config()
  c.method = common.method_config("grasp", num_clusters=K, rank=2)
  c.train.steps = steps
  c.train.checkpoint_every = checkpoint_every
  c.train.log_every = 2
  c.optim.learning_rate = 1e-2
  c.mesh.data, c.mesh.fsdp = data, fsdp
  return c


def trainable(trainer):
  return jax.device_get(trainer.state.params)


def test_sharded_step_equals_single_device(tmp_path):
  single = loop.fit(ToyExperiment(toy_config(3, 100), (0, 1, 2, 3)), toy_config(3, 100),
                     str(tmp_path / "one"), devices=jax.devices()[:1])
  sharded = loop.fit(ToyExperiment(toy_config(3, 100), (0, 1, 2, 3)), toy_config(3, 100),
                      str(tmp_path / "eight"))
  assert len(sharded.mesh.devices.flatten()) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               trainable(single), trainable(sharded))


def test_resume_matches_uninterrupted(tmp_path, monkeypatch):
  full = loop.fit(ToyExperiment(toy_config(6, 3), (0, 1, 2, 3)), toy_config(6, 3),
                   str(tmp_path / "full"))
  monkeypatch.chdir(tmp_path)
  part = "part"  # Relative, as the README's --workdir=workdir/demo.
  loop.fit(ToyExperiment(toy_config(3, 3), (0, 1, 2, 3)), toy_config(3, 3), part)
  resumed = loop.fit(ToyExperiment(toy_config(6, 3), (0, 1, 2, 3)), toy_config(6, 3), part)
  assert int(resumed.state.step) == 6
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), trainable(full),
               trainable(resumed))


def test_absent_cluster_rows_bitwise_unchanged(tmp_path):
  config = toy_config(2, 100)
  exp = ToyExperiment(config, clusters=(0, 2))
  trainer = loop.setup(exp, config, loop.sharding.make_mesh(config.mesh),
                        exp.device_batch(next(exp.train_iterator())))
  before = jax.device_get((trainer.state.params, trainer.state.opt_state))
  after = loop.fit(exp, config, str(tmp_path / "run"))
  after = jax.device_get((after.state.params, after.state.opt_state))
  checked = 0
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before),
                              jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    if "adapter" in name and old.ndim >= 1 and old.shape[0] == K:
      for row in (1, 3):  # Absent: bitwise identical.
        np.testing.assert_array_equal(old[row], new[row], err_msg=name)
      for row in (0, 2):  # Present: trained.
        assert not np.array_equal(old[row], new[row]), f"{name} row {row} did not change"
      checked += 1
  assert checked >= 4  # down, up (+ biases) and their Adam moments.



def test_non_finite_loss_stops_with_step_and_clusters(tmp_path):
  config = toy_config(8, 100)
  exp = ToyExperiment(config, clusters=(0, 1, 2, 3), poisoned=3)
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 1; clusters in the batch: \[.*3"):
    loop.fit(exp, config, str(tmp_path / "run"))


def test_non_finite_steps_are_skipped_when_configured(tmp_path):
  config = toy_config(4, 100)
  config.train.nan_policy = "skip"
  trainer = loop.fit(ToyExperiment(config, clusters=(0, 1, 2, 3), poisoned=3), config,
                      str(tmp_path / "run"))
  assert int(trainer.state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainable(trainer)))
