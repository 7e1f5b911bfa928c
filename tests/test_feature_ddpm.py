"""Feature DDPM: forward marginals vs the closed form; conditional samples land on their class."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grasp_jax.diffusion import schedules
from grasp_jax.feature_ddpm import ddpm
from grasp_jax.feature_ddpm import quality


def test_forward_marginals_match_closed_form():
  schedule = schedules.ddpm_schedule("linear", 1000, 1e-4, 0.02)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # Independent closed form.
  f0 = np.array([1.5, -2.0, 0.3], np.float32)
  n = 20000
  for t in (0, 10, 300, 999):
    ts = jnp.full((n,), t)
    f_t, _ = ddpm.forward_sample(schedule, jax.random.PRNGKey(t), jnp.tile(f0, (n, 1)), ts)
    f_t = np.asarray(f_t, np.float64)
    np.testing.assert_allclose(f_t.mean(0), np.sqrt(abar[t]) * f0,
                               atol=5 * np.sqrt((1 - abar[t]) / n) + 1e-6)
    np.testing.assert_allclose(f_t.var(0), np.full(3, 1 - abar[t]), rtol=0.05)


def test_timestep_embedding():
  emb = np.asarray(ddpm.timestep_embedding(jnp.array([0, 7]), 6))
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]),
                             rtol=1e-5)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("network,width,depth,steps", [("mlp", 64, 2, 1000),
                                                       ("transformer", 32, 1, 400)])
def test_samples_are_closest_to_their_class(network, width, depth, steps):
  """Toy well-separated Gaussian mixture: MMD(sampled c, real c) < MMD(sampled c, real c')."""
  rng = np.random.default_rng(0)
  num_classes, dim, per_class = 3, 6, 300
  means = 2.0 * np.eye(num_classes, dim) - 0.7
  scales = np.array([0.3, 0.5, 0.4])
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  feats = (means[labels] + scales[labels, None] * rng.normal(size=(len(labels), dim))
           ).astype(np.float32)
  schedule = schedules.ddpm_schedule("linear", 100, 1e-3, 0.2)  # DDPM's betas scaled to T=100.
  net = ddpm.EpsNet(num_classes, width=width, depth=depth, network=network, num_tokens=4,
                    heads=2)
  model, history = ddpm.train(net, feats, labels, schedule, steps=steps, batch_size=128,
                              learning_rate=2e-3, seed=0, chunk=steps)
  assert np.isfinite(history).all()
  draws = np.repeat(np.arange(num_classes), 200)
  syn = model.sample(draws, jax.random.PRNGKey(1))
  assert syn.shape == (len(draws), dim)
  for c in range(num_classes):
    mmd = [quality.mmd2_rbf(syn[draws == c], feats[labels == k], bandwidth=1.0)
           for k in range(num_classes)]
    assert np.argmin(mmd) == c, (c, mmd)
    if network == "mlp":  # And the class mean is recovered (the sampler's scale is right).
      assert np.linalg.norm(syn[draws == c].mean(0) - means[c]) < 0.5


def test_parameters_have_logical_axes():
  for network in ddpm.NETWORKS:
    net = ddpm.EpsNet(4, width=16, depth=1, network=network, num_tokens=2, heads=2,
                      prototype_cond=True)
    x = jnp.zeros((2, 5))
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, jnp.zeros(2, jnp.int32),
                                             jnp.zeros(2, jnp.int32), x))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda l: isinstance(l, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves), network


def test_bad_input():
  net = ddpm.EpsNet(2, width=8, depth=1, prototype_cond=True)
  schedule = schedules.ddpm_schedule("linear", 10)
  with pytest.raises(ValueError, match="prototypes"):
    ddpm.train(net, np.zeros((4, 3)), np.zeros(4), schedule, steps=1)
  with pytest.raises(ValueError, match="labels must lie"):
    ddpm.train(ddpm.EpsNet(2), np.zeros((4, 3)), np.array([0, 1, 2, 0]), schedule, steps=1)
