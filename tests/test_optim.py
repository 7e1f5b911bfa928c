"""optim: regex split, lazy per-row updates of cluster-stacked leaves, weight-decay mask, schedules.

References are plain optax optimizers run separately on the present rows, and NumPy formulas.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from optax import tree_utils as otu
import pytest

from grasp_jax.trainer import optim
from grasp_jax.models import trainable as trainable_lib

K, C, R = 3, 4, 2
LR, WD = 1e-2, 0.1


def _params():
  ks = jax.random.split(jax.random.key(0), 5)
  return {"blocks_0": {
      "ff": {"adapter": {"down": jax.random.normal(ks[0], (K, C, R)),
                         "down_bias": jnp.zeros((K, R)),
                         # Exercises the bitwise claim on -0.0 too.
                         "up": jnp.zeros((K, R, C)).at[1, 0, 0].set(-0.0),
                         "up_bias": jax.random.normal(ks[1], (K, C))},
             "net_2": {"kernel": jax.random.normal(ks[2], (C, C)), "bias": jnp.zeros((C,))}},
      "norm": {"scale": jnp.ones((C,))}}}


def _grads(seed, present):
  """Random gradients; rows of absent clusters are exactly zero, as the model produces them."""
  leaves, tree = jax.tree.flatten(_params())
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  grads = jax.tree.unflatten(tree, [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
  row = jnp.asarray(present, jnp.float32)
  adapter = grads["blocks_0"]["ff"]["adapter"]
  for name, g in adapter.items():
    adapter[name] = g * row.reshape((-1,) + (1,) * (g.ndim - 1))
  return grads


def _config(**kw):
  c = mlc.ConfigDict(dict(name="adamw", learning_rate=LR, weight_decay=WD, grad_clip=0.0))
  c.update(kw)
  return c


def test_split_merge_and_mask():
  params = _params()
  mask = trainable_lib.trainable_mask(params, r".*/adapter/.*")
  assert mask["blocks_0"]["ff"]["adapter"]["down"] and not mask["blocks_0"]["ff"]["net_2"]["kernel"]
  trainable, frozen = trainable_lib.split(params, (r".*/adapter/.*", r".*/norm/scale"))
  assert set(trainable["blocks_0"]) == {"ff", "norm"} and "net_2" not in trainable["blocks_0"]["ff"]
  assert set(frozen["blocks_0"]["ff"]) == {"net_2"}
  jax.tree.map(np.testing.assert_array_equal, trainable_lib.merge(trainable, frozen), params)
  with pytest.raises(ValueError, match="match no parameter"):
    trainable_lib.split(params, r".*/lora_.*")


def _adam_state(state):
  return otu.tree_get(state, "mu"), otu.tree_get(state, "nu")


def test_lazy_rows_keep_absent_clusters_bitwise_and_match_plain_adam():
  params = _params()
  tx = optim.make_optimizer(_config(), total_steps=10)
  update = jax.jit(tx.update)
  state = tx.init(params)
  presents = [np.array([True, False, True]), np.array([True, True, False])]
  history = [(params, state)]
  for step, present in enumerate(presents):
    grads = _grads(step + 1, present)
    updates, state = update(grads, state, params, present=jnp.asarray(present))
    params = optax.apply_updates(params, updates)
    history.append((params, state))

  def adapter(tree):
    return tree["blocks_0"]["ff"]["adapter"]

  # Absent rows: params and Adam moments bitwise unchanged by that step.
  for step, present in enumerate(presents):
    (p0, s0), (p1, s1) = history[step], history[step + 1]
    for k in np.flatnonzero(~present):
      for name in adapter(p0):
        for before, after in [(adapter(p0), adapter(p1)), *zip(map(adapter, _adam_state(s0)),
                                                                 map(adapter, _adam_state(s1)))]:
          np.testing.assert_array_equal(np.asarray(after[name][k]).view(np.uint32),
                                        np.asarray(before[name][k]).view(np.uint32))
  # Row 0 is present in both steps: plain Adam (no decay on adapters) on that row alone.
  ref_tx = optax.adam(LR)
  row0 = {n: v[0] for n, v in adapter(history[0][0]).items()}
  ref_state = ref_tx.init(row0)
  for step, present in enumerate(presents):
    g = {n: v[0] for n, v in adapter(_grads(step + 1, present)).items()}
    u, ref_state = ref_tx.update(g, ref_state, row0)
    row0 = optax.apply_updates(row0, u)
    for name in row0:
      np.testing.assert_allclose(adapter(history[step + 1][0])[name][0], row0[name], rtol=1e-6,
                                 atol=1e-7)
  # Row 1 first appears at step 2: fresh moments, global step count (LazyAdam), in NumPy.
  g = np.asarray(adapter(_grads(2, presents[1]))["down"][1], np.float64)
  mu_hat, nu_hat = 0.1 * g / (1 - 0.9 ** 2), 0.001 * g ** 2 / (1 - 0.999 ** 2)
  want = np.asarray(adapter(history[0][0])["down"][1]) - LR * mu_hat / (np.sqrt(nu_hat) + 1e-8)
  np.testing.assert_allclose(adapter(history[2][0])["down"][1], want, rtol=1e-5, atol=1e-7)
  # Every row changed when present; the decayed base leaf matches plain adamw.
  assert np.all(np.asarray(adapter(history[1][0])["down"][2] != history[0][0]["blocks_0"]["ff"]
                           ["adapter"]["down"][2]))
  ref = optax.adamw(LR, weight_decay=WD)
  kernel = history[0][0]["blocks_0"]["ff"]["net_2"]["kernel"]
  ref_state = ref.init(kernel)
  for step, present in enumerate(presents):
    u, ref_state = ref.update(_grads(step + 1, present)["blocks_0"]["ff"]["net_2"]["kernel"],
                              ref_state, kernel)
    kernel = optax.apply_updates(kernel, u)
  np.testing.assert_allclose(history[2][0]["blocks_0"]["ff"]["net_2"]["kernel"], kernel,
                             rtol=1e-6, atol=1e-7)


def test_clipping_does_not_leak_into_absent_rows():
  params, present = _params(), np.array([False, True, True])
  grads = jax.tree.map(lambda g: 100 * g, _grads(3, present))  # Clipping active.
  tx = optim.make_optimizer(_config(grad_clip=1.0, weight_decay=0.0), total_steps=10)
  updates, state = tx.update(grads, tx.init(params), params, present=present)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR))
  ref_updates, _ = ref.update(grads, ref.init(params), params)
  down, ref_down = (u["blocks_0"]["ff"]["adapter"]["down"] for u in (updates, ref_updates))
  np.testing.assert_allclose(down[1:], ref_down[1:], rtol=1e-6)
  assert np.all(np.asarray(down[0]) == 0)
  np.testing.assert_array_equal(otu.tree_get(state, "mu")["blocks_0"]["ff"]["adapter"]["down"][0],
                                0.0)


def test_frozen_leaves_get_no_optimizer_state():
  trainable, frozen = trainable_lib.split(_params(), r".*/adapter/.*")
  tx = optim.make_optimizer(_config(), total_steps=10)
  state = tx.init(trainable)
  paths = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
           for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert not any("net_2" in p or "norm" in p for p in paths), paths
  n_state = sum(x.size for x in jax.tree.leaves(otu.tree_get(state, "mu")))
  assert n_state == sum(x.size for x in jax.tree.leaves(trainable))


def test_weight_decay_skips_adapters_and_1d_leaves():
  params = _params()
  tx = optim.make_optimizer(_config(), total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, new["blocks_0"]["ff"]["adapter"],
               params["blocks_0"]["ff"]["adapter"])
  np.testing.assert_array_equal(new["blocks_0"]["norm"]["scale"],
                                params["blocks_0"]["norm"]["scale"])
  kernel = np.asarray(params["blocks_0"]["ff"]["net_2"]["kernel"])
  np.testing.assert_allclose(new["blocks_0"]["ff"]["net_2"]["kernel"], kernel * (1 - LR * WD),
                             rtol=1e-6)


def test_present_is_ignored_unless_method_is_grasp():
  params, present = _params(), np.array([False, True, True])
  grads = _grads(4, np.ones(K, bool))
  method = mlc.ConfigDict(dict(name="moe", adapter="moe"))
  tx = optim.make_optimizer(_config(), total_steps=10, method=method)
  updates, _ = tx.update(grads, tx.init(params), params, present=present)
  assert np.all(np.asarray(updates["blocks_0"]["ff"]["adapter"]["down"][0]) != 0)


def test_schedules_match_formulas():
  lr, warm, total = 0.1, 10, 110
  f = optim.learning_rate_fn(_config(learning_rate=lr, schedule="warmup_cosine",
                                     warmup_steps=warm), total)
  for s in (0, 5, 10, 60, 110):
    cos = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    want = lr * s / warm if s < warm else lr * cos
    np.testing.assert_allclose(float(f(s)), want, rtol=1e-5, atol=1e-8)
  f = optim.learning_rate_fn(_config(learning_rate=lr, schedule="constant", warmup_steps=4))
  np.testing.assert_allclose([float(f(s)) for s in (0, 2, 4, 50)], [0, lr / 2, lr, lr], rtol=1e-6)
  f = optim.learning_rate_fn(_config(learning_rate=lr, schedule="cosine"), total)
  np.testing.assert_allclose(float(f(55)), lr * 0.5 * (1 + math.cos(math.pi / 2)), atol=1e-7)
  tx = optim.make_optimizer(_config(learning_rate=lr), total_steps=5)
  assert float(tx.learning_rate_fn(3)) == pytest.approx(lr)


@pytest.mark.parametrize("field,value,match", [
    ("name", "lamb", "optim.name"), ("schedule", "linear", "optim.schedule"),
    ("warmup_stpes", 3, "warmup_stpes")])
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_config(**{field: value}), total_steps=10)
