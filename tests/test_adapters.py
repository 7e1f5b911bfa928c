"""Adapter banks against independent NumPy references (per-sample / per-token Python loops)."""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from grasp_jax.models import adapters
from grasp_jax.models import attention

B, N, C, K, R = 5, 3, 8, 3, 4


def _gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _x(seed=0, shape=(B, N, C)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _ff(**cfg):
  return attention.FeedForward(mult=2, activation="gelu",
                               adapter=adapters.AdapterConfig(**cfg))


def _randomize(tree, seed, names):
  """Replaces the leaves whose last path key is in `names` by random normals."""
  flat = traverse_util.flatten_dict(tree)
  keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
  return traverse_util.unflatten_dict({
      p: (0.5 * jax.random.normal(next(keys), v.shape) if p[-1] in names else v)
      for p, v in flat.items()})


@pytest.fixture(scope="module")
def base():
  model = _ff()
  params = nn.unbox(model.init(jax.random.key(1), _x()))["params"]
  return model, params


def _with_base(variables, base_params):
  """Adapter-model variables whose base leaves are those of the 'none' model."""
  flat = traverse_util.flatten_dict(variables)
  base_flat = traverse_util.flatten_dict(base_params)
  for path in base_flat:
    flat[("params",) + path] = base_flat[path]
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("cfg", [
    dict(method="grasp", num_clusters=K, rank=R),
    dict(method="grasp", num_clusters=K, rank=R, gather="onehot"),
    dict(method="lora", rank=R, lora_alpha=8.0),
    dict(method="selora", rank=R),
    dict(method="moe", num_clusters=K, rank=R),
    dict(method="moe", num_clusters=K, rank=R, moe_mode="top1"),
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_zero_init_reproduces_base_bitwise(base, cfg):
  base_model, base_params = base
  x, ids = _x(), jnp.array([0, 2, 1, 2, 0])
  want = base_model.apply({"params": base_params}, x)
  model = _ff(**cfg)
  variables = _with_base(nn.unbox(model.init(jax.random.key(2), x, ids)), base_params)
  got = model.apply(variables, x, ids, mutable=["losses"])[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if cfg["method"] == "grasp":  # Rows are independent draws (split rng), not copies.
    down = np.asarray(variables["params"]["adapter"]["down"])
    assert not np.allclose(down[0], down[1]) and not np.allclose(down[1], down[2])
  # The base parameter names are untouched by the adapter.
  assert set(traverse_util.flatten_dict(base_params)) <= set(
      traverse_util.flatten_dict(variables["params"]))


def _grasp_params(seed=3):
  model = adapters.FFNAdapter(adapters.AdapterConfig("grasp", num_clusters=K, rank=R))
  params = nn.unbox(model.init(jax.random.key(seed), _x(), jnp.zeros(B, jnp.int32)))["params"]
  return _randomize(params, seed + 1, ("down", "down_bias", "up", "up_bias"))


def _adapter_np(p, k, x):
  return _gelu(x @ p["down"][k] + p["down_bias"][k]) @ p["up"][k] + p["up_bias"][k]


@pytest.fixture(scope="module")
def grasp_params():
  return _grasp_params()


@pytest.mark.parametrize("gather", ["index", "onehot"])
def test_grasp_matches_per_sample_loop(grasp_params, gather):
  p = jax.tree.map(np.asarray, grasp_params)
  model = adapters.FFNAdapter(adapters.AdapterConfig("grasp", num_clusters=K, rank=R,
                                                     gather=gather))
  ids = np.array([2, 0, -1, 1, 2])  # -1: no adapter for that sample.
  for shape in [(B, N, C), (B, C)]:
    x = np.asarray(_x(4, shape), np.float64)
    got = model.apply({"params": grasp_params}, jnp.asarray(x, jnp.float32), jnp.asarray(ids))
    want = np.stack([_adapter_np(p, k, x[b]) if 0 <= k < K else np.zeros_like(x[b])
                     for b, k in enumerate(ids)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_onehot_equals_index(grasp_params):
  x, ids = _x(5), jnp.array([1, 1, 0, 2, 0])
  out = {g: adapters.FFNAdapter(adapters.AdapterConfig("grasp", num_clusters=K, rank=R, gather=g))
         .apply({"params": grasp_params}, x, ids) for g in adapters.GATHERS}
  np.testing.assert_allclose(np.asarray(out["onehot"]), np.asarray(out["index"]),
                             rtol=1e-6, atol=1e-7)


def test_soft_weights_are_weighted_sum_of_cluster_outputs(grasp_params):
  p = jax.tree.map(np.asarray, grasp_params)
  x = np.asarray(_x(6), np.float64)
  w = np.asarray(jax.random.uniform(jax.random.key(7), (B, K)), np.float64)
  w /= w.sum(-1, keepdims=True)
  model = adapters.FFNAdapter(adapters.AdapterConfig("grasp", num_clusters=K, rank=R,
                                                     gather="onehot"))
  got = model.apply({"params": grasp_params}, jnp.asarray(x, jnp.float32),
                    jnp.asarray(w, jnp.float32))
  want = np.stack([sum(w[b, k] * _adapter_np(p, k, x[b]) for k in range(K)) for b in range(B)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="onehot"):
    adapters.FFNAdapter(adapters.AdapterConfig("grasp", num_clusters=K, rank=R)).apply(
        {"params": grasp_params}, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))


@pytest.mark.parametrize("gather", ["index", "onehot"])
def test_absent_cluster_rows_get_exactly_zero_gradient(grasp_params, gather):
  model = adapters.FFNAdapter(adapters.AdapterConfig("grasp", num_clusters=K, rank=R,
                                                     gather=gather))
  ids = jnp.array([0, 2, 2, 0, 0])  # Cluster 1 absent.
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, _x(8), ids) ** 2))(grasp_params)
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(g[1] == 0), name
    assert np.all(np.abs(g[[0, 2]]).sum(axis=tuple(range(1, g.ndim))) > 0), name


@pytest.mark.parametrize("mode", ["soft", "top1", "top2"])
def test_moe_matches_per_token_loop_and_aux_formula(mode):
  cfg = adapters.AdapterConfig("moe", num_clusters=K, rank=R, moe_mode=mode)
  model = adapters.FFNAdapter(cfg)
  x = _x(9)
  params = nn.unbox(model.init(jax.random.key(10), x, jnp.zeros(B, jnp.int32)))["params"]
  params = _randomize(params, 11, ("down", "down_bias", "up", "up_bias", "router"))
  got, mut = model.apply({"params": params}, x, jnp.zeros(B, jnp.int32), mutable=["losses"])
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  xs = np.asarray(x, np.float64).reshape(-1, C)
  want, probs, top1 = [], [], []
  for t in xs:
    logits = t @ p["router"]
    pr = np.exp(logits - logits.max())
    pr /= pr.sum()
    order = np.argsort(-pr)
    if mode == "soft":
      w = pr
    else:
      k = int(mode[3:])
      w = np.zeros(K)
      w[order[:k]] = pr[order[:k]] if k == 1 else pr[order[:k]] / pr[order[:k]].sum()
    want.append(sum(w[e] * _adapter_np(p, e, t) for e in range(K)))
    probs.append(pr)
    top1.append(order[0])
  np.testing.assert_allclose(np.asarray(got).reshape(-1, C), np.stack(want), rtol=1e-4,
                             atol=1e-5)
  f = np.bincount(top1, minlength=K) / len(top1)
  aux_want = K * np.sum(f * np.mean(probs, axis=0))
  np.testing.assert_allclose(sum(jax.tree.leaves(mut["losses"])), aux_want, rtol=1e-5)
  # None -> the base: no delta, no router, no aux loss.
  none_out, none_mut = model.apply({"params": params}, x, None, mutable=["losses"])
  assert not np.any(np.asarray(none_out)) and not none_mut


class _Pair(nn.Module):
  """Two Dense layers: `to_q` (a LoRA target by default) and `other` (not)."""
  adapter: adapters.AdapterConfig

  @nn.compact
  def __call__(self, x):
    q = adapters.Dense(6, adapter=self.adapter, name="to_q")(x)
    v = adapters.Dense(6, adapter=self.adapter, name="to_v")(x)
    o = adapters.Dense(6, adapter=self.adapter, name="other")(x)
    return q, v, o


def test_lora_delta_matches_numpy():
  cfg = adapters.AdapterConfig("lora", rank=R, lora_alpha=16.0)
  model = _Pair(cfg)
  x = _x(12)
  params = nn.unbox(model.init(jax.random.key(13), x))["params"]
  assert set(params["to_q"]) == {"kernel", "bias", "lora_a", "lora_b"}
  assert set(params["other"]) == {"kernel", "bias"}
  params = _randomize(params, 14, ("lora_b", "bias"))
  q, _, o = model.apply({"params": params}, x)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  xn = np.asarray(x, np.float64)
  base = xn @ p["to_q"]["kernel"] + p["to_q"]["bias"]
  want = base + xn @ p["to_q"]["lora_a"] @ p["to_q"]["lora_b"] * (16.0 / R)
  np.testing.assert_allclose(np.asarray(q), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(o), xn @ p["other"]["kernel"] + p["other"]["bias"],
                             rtol=1e-5, atol=1e-5)
  ff = _ff(method="lora", rank=R)
  ff_params = nn.unbox(ff.init(jax.random.key(0), x))["params"]
  assert "lora_a" in ff_params["net_0"]["proj"] and "lora_a" in ff_params["net_2"]


# ---------------------------------------------------------------------------------------------
# SeLoRA.

def _selora(seed=15):
  model = _Pair(adapters.AdapterConfig("selora", rank=R))
  variables = nn.unbox(model.init(jax.random.key(seed), _x()))
  return model, variables


def test_selora_inactive_ranks_masked_and_get_zero_gradient():
  model, variables = _selora()
  np.testing.assert_array_equal(variables["selora"]["to_q"]["mask"], [1, 0, 0, 0])
  assert "other" not in variables["selora"]
  params = _randomize(variables["params"], 16, ("lora_b",))  # Inactive rows nonzero too.
  x = _x(17)

  def loss(p):
    q, v, o = model.apply({"params": p, "selora": variables["selora"]}, x)
    return jnp.sum(q ** 2) + jnp.sum(v ** 2) + jnp.sum(o ** 2)

  grads = jax.grad(loss)(params)
  for name in ("to_q", "to_v"):
    g = jax.tree.map(np.asarray, grads[name])
    assert np.all(g["lora_a"][:, 1:] == 0) and np.all(g["lora_b"][1:] == 0)
    assert np.any(g["lora_a"][:, 0] != 0) and np.any(g["lora_b"][0] != 0)
  q = model.apply({"params": params, "selora": variables["selora"]}, x)[0]
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["to_q"])
  xn = np.asarray(x, np.float64)
  want = xn @ p["kernel"] + p["bias"] + (xn @ p["lora_a"][:, :1]) @ p["lora_b"][:1]
  np.testing.assert_allclose(np.asarray(q), want, rtol=1e-5, atol=1e-5)


def test_selora_fisher_ratio_and_growth():
  model, variables = _selora(18)
  sv = variables["selora"]
  # A trained-looking state: the active rank's lora_b row nonzero, inactive rows still zero.
  params = jax.tree.map(lambda v: v, variables["params"])
  for name, scale in (("to_q", 1.0), ("to_v", 0.01)):
    b = params[name]["lora_b"]
    params[name]["lora_b"] = b.at[0].set(scale * jax.random.normal(jax.random.key(19), b[0].shape))
  target = jax.random.normal(jax.random.key(20), (B, N, 6))

  def loss(p, sel, x):
    q, v, _ = model.apply({"params": p, "selora": sel}, x)
    return jnp.sum((q - target) ** 2) + jnp.sum((v - target) ** 2)

  fisher = adapters.selora_fisher_init(params)
  sq = {n: {"a": 0.0, "b": 0.0} for n in ("to_q", "to_v")}
  for step in range(2):
    x = _x(21 + step)
    probed_loss, g_probe = jax.value_and_grad(loss)(params, adapters.selora_probe(sv), x)
    plain_loss, g_plain = jax.value_and_grad(loss)(params, sv, x)
    # The probe changes neither the loss nor, once masked, the training gradients.
    assert probed_loss == plain_loss
    jax.tree.map(np.testing.assert_array_equal, adapters.selora_mask_grads(g_probe, sv), g_plain)
    fisher = adapters.selora_fisher_update(fisher, g_probe)
    for n in sq:
      sq[n]["a"] += np.asarray(g_probe[n]["lora_a"], np.float64) ** 2
      sq[n]["b"] += np.asarray(g_probe[n]["lora_b"], np.float64) ** 2
  ratios = adapters.selora_fi_ratios(sv, fisher)
  want = {}
  for n in sq:
    current = sq[n]["a"][:, 0].sum() + sq[n]["b"][0].sum()
    want[n] = (current + sq[n]["a"][:, 1].sum() + sq[n]["b"][1].sum()) / current
    np.testing.assert_allclose(float(ratios[(n,)]), want[n], rtol=1e-5)
  lo, hi = sorted(want.values())
  assert hi > 1.0 and hi - lo > 1e-3, want
  threshold = (lo + hi) / 2  # One layer above lambda, one below.
  x = _x(30)
  before = model.apply({"params": params, "selora": sv}, x)
  new_params, new_sv, grown = adapters.selora_grow(params, sv, fisher, threshold)
  assert int(grown) == 1
  for n in sq:
    expect = [1, 1, 0, 0] if want[n] > threshold else [1, 0, 0, 0]
    np.testing.assert_array_equal(new_sv[n]["mask"], expect)
  after = model.apply({"params": new_params, "selora": new_sv}, x)
  jax.tree.map(np.testing.assert_array_equal, after, before)
  # Above every ratio: nothing grows. A full layer never grows.
  assert int(adapters.selora_grow(params, sv, fisher, hi + 1e-3)[2]) == 0
  full = jax.tree.map(jnp.ones_like, sv)
  assert int(adapters.selora_grow(params, full, fisher, 0.0)[2]) == 0


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="method"):
    adapters.AdapterConfig("adapterz")
  with pytest.raises(ValueError, match="moe_mode"):
    adapters.AdapterConfig("moe", num_clusters=2, moe_mode="top3")
  with pytest.raises(ValueError, match="gather"):
    adapters.AdapterConfig("grasp", gather="scatter")
