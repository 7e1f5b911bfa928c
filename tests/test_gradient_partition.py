"""The gradient partition strategies against independent references.

The measured cosine matrix vs a per-class loop of `jax.grad` (no taps); clustering vs planted
groups (opposed gradients by construction, a planted block matrix); reliability vs
scipy.stats.pearsonr and its behaviour with and without noise.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import PIL.Image
import pytest
from scipy import stats

from configs import common
from grasp_jax import partition as partition_lib
from grasp_jax.partition import alignment
from grasp_jax.run import gradient_partition

D, H, F = 5, 6, 4
FILTER = r"ff_(in|out)/kernel"


class Toy(nn.Module):
  """Two Dense layers named like an FFN; the per-class targets set the gradient directions."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(H, name="ff_in")(x))
    return nn.Dense(F, name="ff_out")(h)


MODEL = Toy()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, D)))["params"]


def make_loss(targets, sigma):
  """-<y, t_label>: linear in the class target, so opposite targets give opposite gradients.
  Inputs x + sigma * noise(rng)."""
  targets = jnp.asarray(targets, jnp.float32)

  def loss_fn(params, extra, batch, rng):
    x = batch["x"] + sigma * jax.random.normal(rng, batch["x"].shape)
    y = MODEL.apply({"params": params, **extra}, x)
    return -jnp.sum(y * targets[batch["label"]], axis=-1), jnp.float32(0.0)

  return loss_fn


def make_batches(labels_per_batch, seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(0.5, 1.5, size=D)  # One shared input: the class shows only in the target.
  return [{"x": jnp.asarray(np.tile(x0, (len(l), 1)), jnp.float32),
           "label": jnp.asarray(l, jnp.int32)} for l in labels_per_batch]


def opposed_targets(signs, seed=0):
  """t_c = sign_c * v + small class-specific noise: two groups with opposite gradients."""
  rng = np.random.default_rng(seed)
  v = rng.uniform(0.5, 1.5, size=F)
  return np.asarray(signs)[:, None] * v + 0.1 * rng.normal(size=(len(signs), F))


def reference_cosines(loss_fn, batches, rng, num_classes, repeats, halves=(0, 1)):
  """Per-class mean-loss gradients by `jax.grad` of each class's masked loss, one class at a time."""
  def class_mean_loss(params, c):
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
      if i % 2 not in halves:
        continue
      mask = (batch["label"] == c).astype(jnp.float32)
      for j in range(repeats):
        per, _ = loss_fn(params, {}, batch, jax.random.fold_in(rng, i * repeats + j))
        total, count = total + jnp.sum(per * mask), count + jnp.sum(mask)
    return total / count

  grad = jax.jit(jax.grad(class_mean_loss))
  rows = []
  for c in range(num_classes):
    g = grad(PARAMS, c)
    rows.append(np.concatenate([np.ravel(g["ff_in"]["kernel"]), np.ravel(g["ff_out"]["kernel"])]))
  g = np.asarray(rows, np.float64)
  norm = np.linalg.norm(g, axis=1)
  return g @ g.T / np.outer(norm, norm)


def measure_toy(targets, sigma, labels_per_batch, repeats=2):
  loss_fn = make_loss(targets, sigma)
  batches = make_batches(labels_per_batch)
  raw = gradient_partition.accumulate(loss_fn, PARAMS, {}, batches, jax.random.key(3),
                                      num_classes=len(targets), repeats=repeats,
                                      param_filter=FILTER)
  return raw, loss_fn, batches


def balanced_labels(num_classes, num_batches, per_class=2, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.repeat(np.arange(num_classes), per_class))
          for _ in range(num_batches)]


def test_accumulate_matches_per_class_grad_loop():
  c = 4
  targets = np.random.default_rng(1).normal(size=(c, F))
  labels = balanced_labels(c, 4)
  raw, loss_fn, batches = measure_toy(targets, 0.5, labels)
  rng = jax.random.key(3)
  np.testing.assert_allclose(raw["cosine"], reference_cosines(loss_fn, batches, rng, c, 2),
                             atol=2e-5)
  for h in (0, 1):
    np.testing.assert_allclose(raw["halves"][h],
                               reference_cosines(loss_fn, batches, rng, c, 2, halves=(h,)),
                               atol=2e-5)
  # Samples x repeats per class and half: 2 batches per half, 2 per class per batch, 2 draws.
  np.testing.assert_array_equal(raw["counts"], np.full((2, c), 8))


def test_gradient_strategy_recovers_opposed_groups():
  signs = np.array([1, -1, 1, -1, -1, 1])
  planted = ({0, 2, 5}, {1, 3, 4})
  raw, _, _ = measure_toy(opposed_targets(signs), 0.2, balanced_labels(6, 6))
  names = [f"c{i}" for i in range(6)]
  counts = [500, 300, 120, 60, 30, 10]
  result = gradient_partition.finish(raw, names, counts, min_images=5, repeats=2)
  cos = result["cosine"]
  assert (cos[np.ix_([0, 2, 5], [1, 3, 4])] < 0).all()  # Opposed by construction.
  part = partition_lib.build_partition(names, counts, strategy="gradient", k=2, cosine=cos)
  found = {frozenset(np.flatnonzero(np.asarray(part.class_to_cluster) == g))
           for g in range(2)}
  assert found == {frozenset(p) for p in planted}
  assert part.cluster_names == ("grad_0", "grad_1") and part.class_to_cluster[0] == 0  # Head first.
  assert result["reliability"]["split_half"] > 0.95


def test_reliability_is_one_without_noise_and_drops_with_noise():
  targets = np.random.default_rng(2).normal(size=(6, F))
  labels = balanced_labels(6, 8, per_class=1)
  rel = {}
  for sigma in (0.0, 2.0, 8.0):
    raw, _, _ = measure_toy(targets, sigma, labels, repeats=1)
    rel[sigma] = alignment.split_half_reliability(*raw["halves"])["split_half"]
  assert rel[0.0] > 0.9999
  assert rel[0.0] > rel[2.0] + 0.01 > rel[8.0] + 0.02, rel


def test_split_half_reliability_matches_pearsonr():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(-1, 1, (2, 5, 5))
  a, b = (a + a.T) / 2, (b + b.T) / 2
  a[3, :] = a[:, 3] = np.nan  # Class 3 unmeasured in one half: left out of both.
  rows, cols = zip(*[(i, j) for i in (0, 1, 2, 4) for j in (0, 1, 2, 4) if i < j])
  r = stats.pearsonr(a[rows, cols], b[rows, cols])[0]
  out = alignment.split_half_reliability(a, b)
  assert out["pairs"] == 6
  np.testing.assert_allclose(out["split_half"], r, rtol=1e-12)
  np.testing.assert_allclose(out["spearman_brown"], 2 * r / (1 + r), rtol=1e-12)


def test_cluster_cosine_recovers_planted_blocks():
  sizes = (4, 2, 3)
  block = np.repeat(np.arange(3), sizes)
  rng = np.random.default_rng(0)
  noise = rng.normal(scale=0.15, size=(9, 9))
  cos = np.where(block[:, None] == block[None, :], 0.7, -0.3) + (noise + noise.T) / 2
  np.fill_diagonal(cos, 1.0)
  perm = rng.permutation(9)
  labels = alignment.cluster_cosine(cos[np.ix_(perm, perm)], 3)
  found = {frozenset(perm[labels == g]) for g in range(3)}
  assert found == {frozenset(np.flatnonzero(block == g)) for g in range(3)}
  assert labels[0] == 0 and len(set(labels)) == 3


def _planted(c=6):
  """Two blocks {0, 1, 2} and {3, 4, 5} of a cosine matrix."""
  block = np.arange(c) >= c // 2
  cos = np.where(block[:, None] == block[None, :], 0.8, -0.5)
  np.fill_diagonal(cos, 1.0)
  return cos


def test_unmeasured_class_joins_the_cluster_of_the_rarest_measured_class():
  names = [f"c{i}" for i in range(6)]
  counts = [900, 20, 300, 400, 50, 3]  # c5 is too rare; the rarest measured class is c1.
  raw = {"cosine": _planted(), "halves": np.stack([_planted()] * 2),
         "counts": np.full((2, 6), 4)}
  result = gradient_partition.finish(raw, names, counts, min_images=5, repeats=2)
  assert result["measured"].tolist() == [True] * 5 + [False]
  assert np.isnan(result["cosine"][5]).all() and np.isnan(result["cosine"][:, 5]).all()
  part = partition_lib.build_partition(names, counts, strategy="gradient", k=2,
                                       cosine=result["cosine"])
  # c5's planted block is {3, 4, 5}, but it goes where the rarest measured class c1 is.
  assert part.classes_of(part.class_to_cluster[1]) == ("c0", "c1", "c2", "c5")
  assert part.class_to_cluster[0] == 0  # The cluster of the most frequent class first.


def test_healthy_gradient_keeps_healthy_apart():
  names = ["healthy_one", "a", "b", "c", "d", "e", "f"]
  cos = np.full((7, 7), 0.1)
  cos[1:, 1:] = _planted()
  np.fill_diagonal(cos, 1.0)
  counts = [1000, 10, 20, 30, 400, 500, 600]
  part = partition_lib.build_partition(names, counts, strategy="healthy+gradient", k=3,
                                       healthy="healthy_one", cosine=cos)
  assert part.cluster_names == ("healthy", "grad_0", "grad_1")
  assert part.classes_of(0) == ("healthy_one",)
  assert part.classes_of(1) == ("d", "e", "f") and part.classes_of(2) == ("a", "b", "c")


def test_gradient_strategy_errors():
  names, counts, cos = [f"c{i}" for i in range(6)], [5] * 6, _planted()
  with pytest.raises(ValueError, match="cosine matrix is needed"):
    partition_lib.build_partition(names, counts, strategy="gradient", k=2)
  with pytest.raises(ValueError, match="cosine matrix is needed"):
    partition_lib.build_partition(names, counts, strategy="frequency", k=2, cosine=cos)
  with pytest.raises(ValueError, match="need k"):
    partition_lib.build_partition(names, counts, strategy="gradient", cosine=cos)
  half = cos.copy()
  half[2:, :] = half[:, 2:] = np.nan
  with pytest.raises(ValueError, match="only 2 of 6 classes were measured"):
    partition_lib.build_partition(names, counts, strategy="gradient", k=3, cosine=half)
  bad = cos.copy()
  bad[0, 1] = np.nan
  with pytest.raises(ValueError, match="NaN entries between measured"):
    partition_lib.build_partition(names, counts, strategy="gradient", k=2, cosine=bad)


def test_save_alignment_writes_json_and_heatmap_ordered_by_cluster(tmp_path):
  names, counts = [f"c{i}" for i in range(6)], [10, 600, 20, 500, 30, 400]
  cos = _planted()[np.ix_([0, 3, 1, 4, 2, 5], [0, 3, 1, 4, 2, 5])]  # Blocks interleaved.
  part = partition_lib.build_partition(names, counts, strategy="gradient", k=2, cosine=cos)
  result = {"class_names": names, "cosine": cos, "reliability": {"split_half": 0.9}}
  paths = gradient_partition.save_alignment(str(tmp_path), part, result)
  with open(paths["json"]) as f:
    saved = json.load(f)
  assert saved["order"] == ["c1", "c3", "c5", "c4", "c2", "c0"]  # By cluster, head -> tail.
  np.testing.assert_allclose(saved["cosine"], cos)
  assert saved["alignment"]["intra_pooled"] == pytest.approx(0.8)
  assert saved["alignment"]["inter"] == pytest.approx(-0.5)
  assert partition_lib.Partition.from_json(saved["partition"]) == part
  with PIL.Image.open(paths["png"]) as img:
    assert img.mode == "RGB" and min(img.size) > 100


def test_ensure_does_nothing_for_prior_strategies_or_an_existing_file(tmp_path):
  config = mlc.ConfigDict({"partition": {"strategy": "healthy+frequency"}})
  assert gradient_partition.ensure(config, str(tmp_path)) is None
  config.partition.strategy = "gradient"
  (tmp_path / "partition.json").write_text("{}")
  assert gradient_partition.ensure(config, str(tmp_path)) is None
  assert not os.path.exists(tmp_path / gradient_partition.SCRATCH)


def test_measurement_config_measures_the_frozen_base_without_a_partition(tmp_path):
  config = common.base_config()
  config.partition.strategy = "healthy+gradient"
  config.diffusion.cbdm_weight = 0.5
  cfg = gradient_partition.measurement_config(config, str(tmp_path), "train", 7)
  assert (cfg.partition.strategy, cfg.partition.k, cfg.method.adapter) == ("single", 1, "none")
  assert tuple(cfg.method.trainable) == (r".*",)  # A GRASP run's patterns would match nothing.
  assert cfg.diffusion.cfg_dropout == 0 and cfg.diffusion.cbdm_weight == 0
  assert cfg.model.pretrained == os.path.join(str(tmp_path), "base")  # The demo's own base.
  assert (cfg.data.eval_split, cfg.train.diagnostics_batches) == ("train", 7)
  assert config.partition.strategy == "healthy+gradient"  # The run's config is untouched.
