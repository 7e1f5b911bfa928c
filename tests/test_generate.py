"""Sampling from an experiment: a numpy DDIM reference, sharded == unsharded, cluster routing,
prompt templates, and the PNG / TFDS writers read back.

The experiment is a stand-in with the trainer's interfaces (module with the UNet call
convention, partition, cached text conditioner, null condition, schedule), so every compile is
tiny.
"""
import dataclasses
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from configs import common
from grasp_jax.inference import generate
from grasp_jax.parallel import sharding
from grasp_jax.diffusion import schedules
from grasp_jax.partition import Partition

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
TABLE = (0, 1, 1, 2, 2, 2, 3, 3, 3, 3)  # class -> cluster
COUNTS = (600, 94, 41, 39, 26, 21, 21, 13, 11, 10)
SIZE, DIM, STEPS, SCALE = 6, 4, 4, 2.5


def embedding(prompt):
  """The stand-in text encoder: a fixed pseudo-random vector per prompt."""
  digest = np.frombuffer(hashlib.sha256(prompt.encode()).digest()[:DIM], np.uint8)
  return digest.astype(np.float32) / 255.0 - 0.5


class Conditioner:
  def lookup(self, prompts):
    pooled = np.stack([embedding(p) for p in prompts])
    return {"context": pooled[:, None, :], "pooled": pooled}


class EpsModel(nn.Module):
  """eps = s cos(t/1000) x + 0.3 mean(context) + 0.05 cluster (s a parameter)."""

  @nn.compact
  def __call__(self, x, t, context, cluster_ids=None):
    s = self.param("s", nn.initializers.ones, ())
    t = t.astype(jnp.float32)[:, None, None, None]
    return (s * jnp.cos(t / 1000) * x + 0.3 * context.mean(axis=(1, 2))[:, None, None, None]
            + 0.05 * cluster_ids[:, None, None, None])


class X0Model(nn.Module):
  """Predicts x0 = -0.6 + 0.3 cluster + 0.5 mean(context): the cluster shows in the image."""

  @nn.compact
  def __call__(self, x, t, context, cluster_ids=None):
    del t
    value = -0.6 + 0.3 * cluster_ids + 0.5 * context.mean(axis=(1, 2))
    return jnp.broadcast_to(value[:, None, None, None], x.shape)


@dataclasses.dataclass(eq=False)
class FakeExperiment:
  config: object
  module: nn.Module
  schedule: object
  partition: Partition = Partition(CLASSES, TABLE, ("healthy", "head", "medium", "tail"), COUNTS)
  conditioner: Conditioner = Conditioner()
  base_hash: str = "fake"

  def __post_init__(self):
    self.null_cond = {k: v[0] for k, v in Conditioner().lookup([""]).items()}


def make_config(batch_size=8):
  c = common.base_config()
  c.data.image_size, c.data.channels = SIZE, 1
  c.sample.sampler, c.sample.steps, c.sample.guidance_scale = "ddim", STEPS, SCALE
  c.sample.batch_size, c.sample.per_class = batch_size, 2
  return c


@pytest.fixture(scope="module")
def eps_exp():
  return FakeExperiment(make_config(), EpsModel(), schedules.ddpm_schedule("linear", 1000))


@pytest.fixture(scope="module")
def x0_exp():
  return FakeExperiment(make_config(), X0Model(),
                        schedules.ddpm_schedule("linear", 1000, prediction_type="sample"))


PARAMS = {"s": jnp.float32(0.9)}


def prompt(c):
  """The Fashion-MNIST builder's prompt template, written out."""
  name = CLASSES[c].lower()
  return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def reference_ddim(labels, rng):
  """DDIM (eta 0, 'leading' steps, alpha_bar_prev = 1 at the end) with CFG, per sample, numpy:
  each class's template prompt and cluster."""
  return reference_ddim_prompts([prompt(c) for c in labels], [TABLE[c] for c in labels], rng)


def reference_ddim_prompts(texts, clusters, rng):
  """`reference_ddim` for free prompts with their clusters."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  abar = np.cumprod(1.0 - betas)
  ts = np.arange(STEPS)[::-1] * (1000 // STEPS)
  null = embedding("").mean()
  out = []
  for i, (text, k) in enumerate(zip(texts, clusters)):
    x = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), (SIZE, SIZE, 1)), np.float64)
    cond = embedding(text).mean()
    for t in ts:
      base = 0.9 * np.cos(t / 1000) * x + 0.05 * k
      eps_c, eps_u = base + 0.3 * cond, base + 0.3 * null
      eps = eps_u + SCALE * (eps_c - eps_u)
      x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
      prev = abar[t - 1000 // STEPS] if t >= 1000 // STEPS else 1.0
      x = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
    out.append(x)
  return np.stack(out)


def test_matches_numpy_ddim_with_guidance(eps_exp):
  labels = np.array([0, 3, 9, 1, 6, 6, 2, 8, 5, 4, 7])  # 11: one full and one padded batch
  rng = jax.random.key(3)
  got = generate.sample_labels(eps_exp, PARAMS, {}, labels, rng)
  expected = reference_ddim(labels, rng)
  assert got.shape == (11, SIZE, SIZE, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_free_prompts_with_their_clusters(eps_exp):
  texts, clusters = ["a cat", "a photo of a bag", "", "a cat"], [3, 0, 2, 1]
  rng = jax.random.key(4)
  seen = []
  got = generate.sample_prompts(eps_exp, PARAMS, {}, texts, clusters, rng, batch_size=3,
                                progress=lambda done, n: seen.append((done, n)))
  np.testing.assert_allclose(got, reference_ddim_prompts(texts, clusters, rng), rtol=1e-4,
                             atol=1e-4)
  assert seen == [(3, 4), (4, 4)]
  with pytest.raises(ValueError, match="4 prompts but 3 cluster ids"):
    generate.sample_prompts(eps_exp, PARAMS, {}, texts, clusters[:3], rng)


def test_sharded_equals_unsharded_and_any_batch_size(eps_exp):
  labels = np.arange(10).repeat(2)[:19]
  rng = jax.random.key(5)
  mesh = sharding.make_mesh(eps_exp.config.mesh)
  assert mesh.devices.size == 8
  params = jax.device_put(PARAMS, sharding.replicated(mesh))
  with jax.set_mesh(mesh):  # As in the training loop, which evaluates periodically.
    sharded = generate.sample_labels(eps_exp, params, {}, labels, rng, mesh=mesh)
  single = generate.sample_labels(eps_exp, PARAMS, {}, labels, rng, batch_size=5)
  np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


def test_cluster_of_each_prompt_comes_from_the_partition(x0_exp):
  classes = ["Ankle boot", "Trouser", "T-shirt/top", "Shirt", "Coat"]
  images, labels = generate.sample_classes(x0_exp, {}, {}, classes, 2, jax.random.key(0))
  assert labels.tolist() == [9, 9, 1, 1, 0, 0, 6, 6, 4, 4]
  null = embedding("").mean()
  for image, c in zip(images, labels):
    cond = embedding(prompt(c)).mean()
    value = -0.6 + 0.3 * TABLE[c] + 0.5 * (null + SCALE * (cond - null))
    expected = np.round((np.clip(value, -1, 1) + 1) * 127.5)
    assert np.abs(image.astype(int) - expected).max() <= 1, (CLASSES[c], image[0, 0], expected)


def test_cluster_grids(x0_exp):
  grids = generate.cluster_grids(x0_exp, {}, {}, jax.random.key(0), 4)
  assert list(grids) == [f"samples/{n}" for n in ("healthy", "head", "medium", "tail")]
  null = embedding("").mean()
  for k, grid in enumerate(grids.values()):
    assert grid.shape == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2, 1) and grid.dtype == np.uint8
    # The cluster's classes from most to least frequent, cycled over the 4 cells.
    members = sorted((i for i in range(10) if TABLE[i] == k), key=lambda i: -COUNTS[i])
    for cell in range(4):
      c = members[cell % len(members)]
      r, q = divmod(cell, 2)
      pixel = grid[2 + r * (SIZE + 2), 2 + q * (SIZE + 2), 0]
      cond = embedding(prompt(c)).mean()
      value = -0.6 + 0.3 * k + 0.5 * (null + SCALE * (cond - null))
      assert abs(int(pixel) - np.round((np.clip(value, -1, 1) + 1) * 127.5)) <= 1


def test_class_selection(x0_exp):
  assert generate.resolve_classes(x0_exp, "Bag, 2,Trouser") == [8, 2, 1]
  assert generate.resolve_classes(x0_exp, None) == list(range(10))
  with pytest.raises(ValueError, match="unknown class 'Hat'"):
    generate.sample_classes(x0_exp, {}, {}, "Trouser,Hat", 1, jax.random.key(0))


def test_writers_round_trip(tmp_path, x0_exp):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 5, 5, 1), dtype=np.uint8)
  labels = np.array([0, 3, 0, 9, 3, 3, 0])
  folders = generate.write_class_folders(images, labels, CLASSES, tmp_path / "png")
  assert set(folders) == {"T-shirt/top", "Dress", "Ankle boot"}
  with open(tmp_path / "png" / "classes.json") as f:
    assert json.load(f)["T-shirt_top"] == "T-shirt/top"
  for c in (0, 3, 9):
    folder = folders[CLASSES[c]]
    read = [np.asarray(PIL.Image.open(os.path.join(folder, f"{i}.png")))
            for i in range(len(os.listdir(folder)))]
    np.testing.assert_array_equal(np.stack(read)[..., None], images[labels == c])

  prompts = [f"p{i}" for i in range(7)]
  path = generate.write_tfds(images, labels, CLASSES, os.fspath(tmp_path / "tfds"),
                             prompts=prompts)
  path = generate.write_tfds(images, labels, CLASSES, os.fspath(tmp_path / "tfds"),
                             prompts=prompts)  # A rerun replaces the set.
  builder = tfds.builder_from_directory(path)
  source = builder.as_data_source(split="train")
  assert len(source) == 7 and builder.info.features["label"].names == list(CLASSES)
  for i in range(7):
    record = source[i]
    np.testing.assert_array_equal(record["image"], images[i])
    assert record["label"] == labels[i] and record["prompt"].decode() == prompts[i]
    np.testing.assert_array_equal(record["labels"], np.eye(10, dtype=np.uint8)[labels[i]])

  out = generate.run_sample(x0_exp, {}, {}, os.fspath(tmp_path / "work"),
                            classes="Bag,Coat", per_class=3)
  assert out.labels.tolist() == [8, 8, 8, 4, 4, 4]
  assert sorted(os.listdir(tmp_path / "work" / "samples" / "Bag")) == ["0.png", "1.png", "2.png"]
  records = tfds.builder_from_directory(out.tfds_dir).as_data_source(split="train")
  assert [r["prompt"].decode() for r in records] == [prompt(8)] * 3 + [prompt(4)] * 3
