"""Gradient-conflict diagnostics against independent references.

Per-group gradients (one tapped backward pass) vs `jax.grad` of each class's masked mean loss in a
Python loop; cosines vs NumPy; head/tail and intra/inter means vs hand-picked entries.
"""
import functools
import json
import os
import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grasp_jax.evaluation import gradient_conflict
from grasp_jax import partition as partition_lib
from grasp_jax.models import adapters
from grasp_jax.models import attention
import writers

C, K, D, N = 5, 2, 8, 3
ADAPTER = adapters.AdapterConfig(method="grasp", num_clusters=K, rank=4)
FFN_PATHS = ("ff_context/net_0/proj/kernel", "ff_context/net_2/kernel",
             "transformer_blocks_0/ff/net_0/proj/kernel", "transformer_blocks_0/ff/net_2/kernel")
PART = partition_lib.Partition(class_names=("a", "b", "c", "d", "e"),
                               class_to_cluster=(0, 0, 1, 1, 1),
                               cluster_names=("head", "tail"), class_counts=(90, 40, 9, 5, 2))
# The diagnostics' head and tail classes are handed in (the data's frequency groups), not read
# from the partition's clusters: chosen here unlike PART's.
HEAD_TAIL = ([0], [3, 4])


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, cluster_ids):
    ff = attention.FeedForward(mult=2, activation="geglu", adapter=ADAPTER, name="ff")
    return x + ff(x, cluster_ids)


class Tiny(nn.Module):
  """Paths as in the backbones: a (rematerialised) transformer block's `ff` and an `ff_context`."""

  @nn.compact
  def __call__(self, x, cluster_ids):
    h = adapters.Dense(D, name="proj_in")(x)
    h = nn.remat(Block)(name="transformer_blocks_0")(h, cluster_ids)
    h = h + attention.FeedForward(mult=1, activation="gelu-approximate", adapter=ADAPTER,
                                  name="ff_context")(h, cluster_ids)
    return adapters.Dense(D, name="proj_out")(h)


MODEL = Tiny()


def _randomise(params, key):
  """Random values everywhere (adapter `up` included) so every path carries gradient."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      tree, [0.5 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def _make_loss(targets):
  """A denoising-like per-sample loss that calls the model twice (as CBDM does)."""
  targets = jnp.asarray(targets)

  def loss_fn(params, extra, batch, rng):
    x_t = batch["image"] + 0.3 * jax.random.normal(rng, batch["image"].shape)
    pred = MODEL.apply({"params": params, **extra}, x_t, batch["cluster_id"])
    pred2 = MODEL.apply({"params": params, **extra}, 0.5 * x_t, batch["cluster_id"])
    per = jnp.mean((pred - targets[batch["label"]][:, None]) ** 2, axis=(1, 2))
    return per + 0.1 * jnp.mean(pred2 ** 2, axis=(1, 2)), jnp.float32(0.0)

  return loss_fn


LOSS = _make_loss(np.random.default_rng(1).normal(size=(C, D)))


def _batch(seed, labels):
  labels = np.asarray(labels, np.int32)
  image = np.random.default_rng(seed).normal(size=(len(labels), N, D)).astype(np.float32)
  return {"image": image, "label": labels,
          "cluster_id": np.asarray(PART.class_to_cluster, np.int32)[labels]}


@functools.partial(jax.jit, static_argnames="loss_fn")
def _masked_grad(params, batch, rng, mask, denom, *, loss_fn):
  return jax.grad(lambda p: jnp.sum(loss_fn(p, {}, batch, rng)[0] * mask) / denom)(params)


def _reference(loss_fn, params, batch, rng, ids, num, pattern, *, mean=True):
  """Group g's gradient, one jax.grad per group: NaN rows for absent groups (sums: zeros)."""
  out = {}
  for g in range(num):
    mask = np.asarray(ids == g, np.float32)
    n = float(mask.sum())
    if n == 0:
      grads = jax.tree.map(lambda p: jnp.full(p.shape, np.nan if mean else 0.0), params)
    else:
      grads = _masked_grad(params, batch, rng, mask, n if mean else 1.0, loss_fn=loss_fn)
    for path, v in traverse_util.flatten_dict(grads, sep="/").items():
      if re.fullmatch(pattern, path):
        out.setdefault(path, []).append(np.asarray(v, np.float64))
  return {p: np.stack(v) for p, v in out.items()}


def _np_cos(a, b):
  with np.errstate(invalid="ignore"):
    return np.einsum("cp,dp->cd", a, b) / np.outer(np.linalg.norm(a, axis=1),
                                                   np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def setup():
  params = jax.jit(lambda k: _randomise(nn.unbox(MODEL.init(
      k, jnp.zeros((1, N, D)), jnp.zeros((1,), jnp.int32))["params"]), k))(jax.random.key(0))
  # Class 4 ('e') is absent; cluster ids follow the partition.
  batch = _batch(0, [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 1])
  rng = jax.random.key(2)
  fn = jax.jit(lambda p, b, r: gradient_conflict.group_gradient_sums(
      LOSS, p, {}, b, r, {"class": (b["label"], C), "cluster": (b["cluster_id"], K)}))
  sums, counts = fn(params, batch, rng)
  refs = {key: _reference(LOSS, params, batch, rng, batch[key], num, gradient_conflict.FFN_KERNELS)
          for key, num in (("label", C), ("cluster_id", K))}
  return dict(params=params, batch=batch, rng=rng, sums=sums, counts=counts, refs=refs)


def test_class_gradients_match_per_class_loop(setup):
  s = setup
  means = gradient_conflict.group_means(s["sums"]["class"], s["counts"]["class"])
  assert sorted(means) == sorted(FFN_PATHS)  # Adapters, proj_in/out and biases not selected.
  ref = s["refs"]["label"]
  np.testing.assert_array_equal(s["counts"]["class"], [6, 5, 3, 2, 0])
  for path in FFN_PATHS:
    got = np.asarray(means[path])
    assert np.isnan(got[4]).all() and np.isnan(ref[path][4]).all()
    scale = np.abs(ref[path][:4]).max()
    np.testing.assert_allclose(got[:4], ref[path][:4], atol=2e-5 * scale, rtol=2e-4)


def test_cluster_gradients_match_per_cluster_loop(setup):
  s = setup
  means = gradient_conflict.group_means(s["sums"]["cluster"], s["counts"]["cluster"])
  ref = s["refs"]["cluster_id"]
  np.testing.assert_array_equal(s["counts"]["cluster"], [11, 5])
  for path in FFN_PATHS:
    scale = np.abs(ref[path]).max()
    np.testing.assert_allclose(np.asarray(means[path]), ref[path], atol=2e-5 * scale, rtol=2e-4)


def test_wrappers_biases_and_other_dense_layers(setup):
  """class_gradients/cluster_gradients on biases and a non-FFN Dense as well."""
  s = setup
  pattern = r"(proj_in|transformer_blocks_0/ff/net_2)/(kernel|bias)"
  got, counts = jax.jit(functools.partial(gradient_conflict.class_gradients, LOSS, num_classes=C,
                                          param_filter=pattern))(
                                              s["params"], {}, s["batch"], s["rng"])
  ref = _reference(LOSS, s["params"], s["batch"], s["rng"], s["batch"]["label"], C, pattern)
  assert sorted(got) == sorted(ref) and len(got) == 4
  np.testing.assert_array_equal(counts, [6, 5, 3, 2, 0])
  for path in ref:
    scale = np.abs(ref[path][:4]).max()
    np.testing.assert_allclose(np.asarray(got[path])[:4], ref[path][:4], atol=2e-5 * scale,
                               rtol=2e-4)
  got, counts = jax.jit(functools.partial(gradient_conflict.cluster_gradients, LOSS, num_clusters=K,
                                          param_filter=pattern))(
                                              s["params"], {}, s["batch"], s["rng"])
  ref = _reference(LOSS, s["params"], s["batch"], s["rng"], s["batch"]["cluster_id"], K, pattern)
  for path in ref:
    np.testing.assert_allclose(np.asarray(got[path]), ref[path],
                               atol=2e-5 * np.abs(ref[path]).max(), rtol=2e-4)


def test_bad_param_filters_are_named(setup):
  s = setup
  with pytest.raises(ValueError, match="matches no parameter"):
    gradient_conflict.class_gradients(LOSS, s["params"], {}, s["batch"], s["rng"], num_classes=C,
                                param_filter=r"nothing/.*")
  with pytest.raises(ValueError, match="adapter/down"):
    gradient_conflict.class_gradients(LOSS, s["params"], {}, s["batch"], s["rng"], num_classes=C,
                                param_filter=r".*/adapter/down")


def test_cosine_matrix_matches_numpy(setup):
  s = setup
  means = gradient_conflict.group_means(s["sums"]["class"], s["counts"]["class"])
  cos = jax.device_get(gradient_conflict.cosine_matrix(means))
  ref = s["refs"]["label"]
  flat = {p: v.reshape(C, -1) for p, v in ref.items()}
  for path in FFN_PATHS:
    want = _np_cos(flat[path], flat[path])
    np.testing.assert_allclose(cos[path], want, atol=1e-4)  # NaN rows/cols compare equal.
  cat = np.concatenate([flat[p] for p in FFN_PATHS], axis=1)
  np.testing.assert_allclose(cos[gradient_conflict.ALL], _np_cos(cat, cat), atol=1e-4)
  assert np.isnan(cos[gradient_conflict.ALL][4]).all()
  np.testing.assert_allclose(np.diag(cos[gradient_conflict.ALL])[:4], 1.0, atol=1e-5)


def test_identical_targets_align_opposite_targets_oppose(setup):
  """Classes 0 and 1 share images and targets; class 2 has the same images, negated targets.

  Targets dwarf the model's outputs, so the MSE gradients J^T (f - t) are ~ -J^T t.
  """
  targets = np.zeros((C, D), np.float32)
  targets[0] = targets[1] = 1e4 * np.random.default_rng(3).normal(size=D)
  targets[2] = -targets[0]
  targets[3] = 1e4 * np.random.default_rng(4).normal(size=D)
  base = _batch(5, [0, 0, 0, 0])
  batch = {k: np.concatenate([v] * 4) for k, v in base.items()}
  batch["label"] = np.repeat(np.arange(4, dtype=np.int32), 4)
  batch["cluster_id"] = np.zeros(16, np.int32)  # One adapter for all: identical forward passes.

  def loss_fn(params, extra, b, rng):
    del rng  # Same noise for every sample: x_t only depends on the image.
    pred = MODEL.apply({"params": params, **extra}, b["image"], b["cluster_id"])
    return jnp.mean((pred - jnp.asarray(targets)[b["label"]][:, None]) ** 2, axis=(1, 2)), 0.0

  grads, _ = gradient_conflict.class_gradients(loss_fn, setup["params"], {}, batch, None,
                                         num_classes=C)
  cos = jax.device_get(gradient_conflict.cosine_matrix(grads))
  for m in cos.values():
    assert m[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert m[0, 2] == pytest.approx(-1.0, abs=1e-3) and m[1, 2] == pytest.approx(-1.0, abs=1e-3)
    assert abs(m[0, 3]) < 0.99


def _hand_matrix():
  m = np.array([[1.0, 0.8, 0.1, -0.2, 0.3],
                [0.8, 1.0, 0.0, -0.4, np.nan],
                [0.1, 0.0, 1.0, 0.6, 0.5],
                [-0.2, -0.4, 0.6, 1.0, 0.7],
                [0.3, np.nan, 0.5, 0.7, 1.0]])
  return m


def test_head_tail_and_group_alignment_by_hand():
  m = _hand_matrix()
  # head = {a, b}, tail = {c, d, e}; (b, e) is NaN and skipped.
  assert gradient_conflict.head_tail_cosine(m, ([0, 1], [2, 3, 4])) == pytest.approx(
      np.mean([0.1, -0.2, 0.3, 0.0, -0.4]))
  assert gradient_conflict.head_tail_cosine({"x": m, "y": -m}, ([0], [2, 3])) == pytest.approx(
      {"x": np.mean([0.1, -0.2]), "y": -np.mean([0.1, -0.2])})
  al = gradient_conflict.group_alignment(m, PART)
  assert al["intra"] == pytest.approx([0.8, np.mean([0.6, 0.5, 0.7])])
  assert al["intra_pooled"] == pytest.approx(np.mean([0.8, 0.6, 0.5, 0.7]))
  assert al["inter"] == pytest.approx(np.mean([0.1, -0.2, 0.3, 0.0, -0.4]))
  # Explicit groups: class 1 in no group is left out; a one-class group has no pairs.
  al = gradient_conflict.group_alignment(m, [[0, 4], [2, 3]])
  assert al["intra"] == pytest.approx([0.3, 0.6])
  assert al["inter"] == pytest.approx(np.mean([0.1, -0.2, 0.5, 0.7]))
  al = gradient_conflict.group_alignment(m, [[0, 4], [2, 3], [1]])
  assert np.isnan(al["intra"][2])


def test_heatmap_image_is_rgb():
  names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
  img = gradient_conflict.heatmap_image(_hand_matrix(), names, title="t")
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert min(img.shape[:2]) > 100 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20
  with pytest.raises(ValueError, match="does not match"):
    gradient_conflict.heatmap_image(_hand_matrix(), names[:3])



class FakeExp:
  partition = PART
  loss_fn = staticmethod(LOSS)


def _exact_cos_over_batches(params, batches, rng, ids_key, num):
  """Reference: per-batch per-group *sums* (jax.grad loop), added, divided by total counts."""
  sums, counts = None, np.zeros(num)
  for i, b in enumerate(batches):
    r = _reference(LOSS, params, b, jax.random.fold_in(rng, i), b[ids_key], num,
                   gradient_conflict.FFN_KERNELS, mean=False)
    sums = r if sums is None else {p: sums[p] + r[p] for p in r}
    counts += np.bincount(b[ids_key], minlength=num)
  with np.errstate(invalid="ignore", divide="ignore"):
    cat = np.concatenate([sums[p].reshape(num, -1) for p in FFN_PATHS], axis=1)
    cat = cat / np.where(counts > 0, counts, np.nan)[:, None]
  return _np_cos(cat, cat)


def test_run_diagnostics_exact_over_batches_and_summaries(setup):
  s = setup
  batches = [_batch(10, [0, 0, 0, 1, 1, 2, 0, 3]), _batch(11, [4, 0, 1, 1, 2, 2, 2, 0])]
  rng = jax.random.key(7)
  writer = writers.MemoryWriter()
  out = gradient_conflict.run_diagnostics(FakeExp(), s["params"], {}, batches, rng, writer, 3,
                                           HEAD_TAIL)
  json.dumps(out, allow_nan=False)  # JSON-able, NaN mapped to None.
  want = _exact_cos_over_batches(s["params"], batches, rng, "label", C)
  np.testing.assert_allclose(np.array(out["class_cos"]["all"], float), want, atol=1e-4)
  want_k = _exact_cos_over_batches(s["params"], batches, rng, "cluster_id", K)
  np.testing.assert_allclose(np.array(out["cluster_cos"]["all"], float), want_k, atol=1e-4)
  assert out["class_counts"] == [6, 4, 4, 1, 1] and out["cluster_counts"] == [10, 6]
  assert out["head_classes"] == ["a"] and out["tail_classes"] == ["d", "e"]
  head_tail = np.mean([want[0, j] for j in (3, 4)])
  assert out["head_tail"]["all"] == pytest.approx(head_tail, abs=1e-4)
  scalars = writer.scalars[3]
  assert scalars["grad_cos/head_tail/all"] == pytest.approx(head_tail, abs=1e-4)
  assert scalars["grad_cos/intra/head"] == pytest.approx(want[0, 1], abs=1e-4)
  inter = np.mean([want[i, j] for i in (0, 1) for j in (2, 3, 4)])  # PART's two clusters.
  assert scalars["grad_cos/inter"] == pytest.approx(inter, abs=1e-4)
  assert {f"grad_cos/head_tail/{p}" for p in FFN_PATHS} <= set(scalars)
  for name in ("grad_cos/classes", "grad_cos/clusters"):
    img = writer.images[3][name]
    assert img.dtype == np.uint8 and img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3


def test_run_diagnostics_sharded_batches_and_clu_writer(setup, tmp_path):
  """Batches sharded over the 8 fake devices give the unsharded result; a real CLU writer works."""
  from clu import metric_writers
  s = setup
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batches = [_batch(12, [0, 1, 2, 3, 0, 1, 2, 3]), _batch(13, [0, 0, 1, 1, 2, 2, 3, 4])]
  rng = jax.random.key(8)
  plain = gradient_conflict.run_diagnostics(FakeExp(), s["params"], {}, batches, rng,
                                             writers.MemoryWriter(), 1, HEAD_TAIL)
  sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  out = gradient_conflict.run_diagnostics(FakeExp(), s["params"], {}, sharded, rng, writer, 1,
                                         HEAD_TAIL)
  writer.flush()
  np.testing.assert_allclose(np.array(out["class_cos"]["all"], float),
                             np.array(plain["class_cos"]["all"], float), atol=1e-5)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
