"""The source/target setting: the radiograph transform, the target's long tail, disjoint halves."""
import dataclasses
import os

import numpy as np
import pytest
import scipy.ndimage
import tensorflow_datasets as tfds

import fixtures_data as fx
from grasp_jax.data import domains
from grasp_jax.data.builders import class_prompts
from grasp_jax.data.builders import fashion_mnist_lt as fm

FMNIST_REAL_DIR = os.environ.get("FMNIST_DIR") or "/usr/share/datasets/fashion-mnist"
CONFIGS = fm.FashionMnistLt.builder_configs


def reference_radiograph(image, source, index, p):
  """One image, written from the formulas: scipy's Gaussian filter, a per-pixel vignette loop."""
  x = image.astype(np.float64) / 255.0
  x = 1.0 - x if p.invert else x
  x = scipy.ndimage.gaussian_filter(x, p.blur_sigma, mode="reflect", truncate=p.truncate)
  x = p.low + (p.high - p.low) * x
  h, w = x.shape
  corner = ((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2
  for i in range(h):
    for j in range(w):
      x[i, j] *= 1 - p.vignette * ((i - (h - 1) / 2) ** 2 + (j - (w - 1) / 2) ** 2) / corner
  x += p.grain * np.random.default_rng((p.seed, source, index)).standard_normal((h, w))
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("params", [domains.Radiograph(), domains.Radiograph(
    invert=False, blur_sigma=1.3, low=0.2, high=0.7, vignette=0.8, grain=0.1, seed=3)])
def test_radiograph_matches_reference(params):
  images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
  indices = np.array([0, 7, 7, 59999])
  out = domains.radiograph(images, 1, indices, params)
  assert out.dtype == np.uint8 and out.shape == images.shape
  for image, index, got in zip(images, indices, out):
    want = reference_radiograph(image, 1, index, params)
    assert np.abs(got.astype(int) - want).max() <= 1  # Float summation order at .5 boundaries.
    assert (got == want).mean() > 0.99


def test_radiograph_is_deterministic_per_image():
  images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
  out = domains.radiograph(images, 0, np.array([5, 6, 7]))
  np.testing.assert_array_equal(out, domains.radiograph(images, 0, np.array([5, 6, 7])))
  # An image's look depends on its own identity only, not on the batch it is built in.
  np.testing.assert_array_equal(out[1:2], domains.radiograph(images[1:2], 0, np.array([6])))
  assert not np.array_equal(out[1], domains.radiograph(images[1:2], 1, np.array([6]))[0])
  assert not np.array_equal(out[1], domains.radiograph(images[1:2], 0, np.array([5]))[0])
  # Inversion: a black background becomes bright, a white garment dark.
  flat = domains.radiograph(np.zeros((1, 28, 28), np.uint8), 0, np.array([0]))
  assert flat[0, 14, 14] > 200 and flat[0, 0, 0] < flat[0, 14, 14]
  with pytest.raises(ValueError, match="uint8"):
    domains.radiograph(images.astype(np.float32), 0, np.arange(3))


@pytest.mark.parametrize("name", ["target_p0", "target_p1"])
def test_target_counts_follow_the_permutation(name):
  cfg = CONFIGS[name]
  order = np.random.default_rng(cfg.permutation).permutation(10)
  counts = fm.train_counts(cfg)
  by_rank = [counts[k] for k in order]
  assert by_rank == [1000, 585, 342, 200, 117, 68, 40, 23, 14, 8]
  assert all(5 <= n <= 30 for n in by_rank[-3:])  # The tail group of the demo's partition.
  assert all(200 <= n <= 1000 for n in by_rank[:4])
  assert fm.head_class(cfg) == fm.CLASS_NAMES[order[0]]
  assert [fm.CLASS_NAMES[k] for k in fm.count_order(cfg.permutation)] == [
      fm.CLASS_NAMES[k] for k in order]
  assert fm.train_counts(CONFIGS["source"]) == [2900] * 10


def test_permutations_differ_and_tail_is_not_just_the_easy_classes():
  tails = [set(fm.count_order(CONFIGS[n].permutation)[-3:]) for n in ("target_p0", "target_p1")]
  assert tails[0] != tails[1]
  hard = {fm.CLASS_NAMES.index(n) for n in ("T-shirt/top", "Pullover", "Coat", "Shirt")}
  assert all(t & hard for t in tails)


def small(name, **kwargs):
  return dataclasses.replace(CONFIGS[name], name=f"{name}_test", **kwargs)


def build(config, data_dir):
  builder = tfds.builder("fashion_mnist_lt", config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  return builder


def read(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def index_of(example):
  return int(example["id"].decode().split("_")[1])


def test_source_and_target_builds_from_fabricated_idx(tmp_path, monkeypatch):
  raw = fx.make_fmnist_dir(tmp_path / "idx", [60] * 10, 6)  # 30 images per class and half.
  monkeypatch.setenv("FMNIST_DIR", os.fspath(tmp_path / "idx"))
  source = build(small("source", head_count=20, val_per_class=5), tmp_path / "data")
  target = build(small("target_p1", head_count=25, tail_count=5, val_per_class=3), tmp_path / "data")
  src = {s: read(source, s) for s in ("train", "val", "test")}
  tgt = {s: read(target, s) for s in ("train", "val", "test", "spare")}

  train_images, train_labels = raw["train"]
  in_target = fm.split_halves(train_labels, 0)
  np.testing.assert_array_equal(np.bincount(train_labels[in_target], minlength=10), [30] * 10)
  src_ids = {e["id"] for s in ("train", "val") for e in src[s]}
  tgt_ids = {e["id"] for s in ("train", "val") for e in tgt[s]}
  assert not src_ids & tgt_ids and len(src_ids) == 250 and len(tgt_ids) == len(tgt["train"]) + 30
  assert all(not in_target[index_of(e)] for e in src["train"] + src["val"])
  assert all(in_target[index_of(e)] for e in tgt["train"] + tgt["val"])
  # spare: the rest of the target half, which no generator trains on (the evaluator's images).
  spare_ids = {e["id"] for e in tgt["spare"]}
  assert not spare_ids & tgt_ids and len(spare_ids | tgt_ids) == 300
  assert all(in_target[index_of(e)] for e in tgt["spare"]) and "spare" not in source.info.splits

  counts = np.bincount([e["label"] for e in tgt["train"]], minlength=10)
  order = np.random.default_rng(1).permutation(10)
  np.testing.assert_array_equal(counts[order], fm.exponential_counts(25, 5, 10))
  assert counts[order[0]] == 25 and counts[order[-1]] == 5
  assert target.info.metadata["count_order"] == [fm.CLASS_NAMES[k] for k in order]
  assert target.info.metadata["transform"] == dataclasses.asdict(domains.Radiograph())
  assert target.info.metadata["permutation"] == 1
  np.testing.assert_array_equal(np.bincount([e["label"] for e in src["train"]]), [20] * 10)

  # Source: original pixels, photo prompts. Target: the radiograph of the same file's image.
  for e in src["train"][:20]:
    np.testing.assert_array_equal(e["image"][..., 0], train_images[index_of(e)])
    assert e["prompt"].decode() == "a photo of " + ("an " if e["label"] == 9 else "a ") + \
        fm.CLASS_NAMES[e["label"]].lower()
  for e in tgt["train"][:20]:
    i = index_of(e)
    want = reference_radiograph(train_images[i], 0, i, domains.Radiograph())
    assert np.abs(e["image"][..., 0].astype(int) - want).max() <= 1
    assert e["prompt"].decode().startswith("an x-ray scan of a")
  # Sampling conditions on the prompts each config's examples carry (never the source's on the
  # target): class_prompts is the one rule for both.
  for config, split in (("source", src["train"]), ("target_p1", tgt["train"])):
    for e in split:
      name = e["class_name"].decode()
      assert e["prompt"].decode() == class_prompts.class_prompt("fashion_mnist_lt", config, name)
  # The target's test split is the whole t10k set (balanced), in the radiograph domain.
  test_images, test_labels = raw["test"]
  assert sorted(index_of(e) for e in tgt["test"]) == list(range(len(test_labels)))
  for e in tgt["test"]:
    i = index_of(e)
    assert e["id"].decode().startswith("t10k_") and e["label"] == test_labels[i]
    np.testing.assert_array_equal(e["image"][..., 0], domains.radiograph(
        test_images[i:i + 1], 1, np.array([i]))[0])


@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST_REAL_DIR, "train-images-idx3-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_target_counts_and_disjoint_halves(tmp_path):
  target = build(small("target_p0", val_per_class=1, test_per_class=1, spare=False), tmp_path)
  source = build(small("source", head_count=50, val_per_class=1, test_per_class=1), tmp_path)
  ids = {}
  for name, builder in (("target", target), ("source", source)):
    data = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    ids[name] = {e["id"] for e in data.__getitems__(list(range(len(data))))}
    labels = [e["label"] for e in data.__getitems__(list(range(len(data))))]
    assert np.bincount(labels, minlength=10).tolist() == fm.train_counts(builder.builder_config)
  assert len(ids["target"]) == 2397 and not ids["target"] & ids["source"]
  _, labels = fm.load_split(FMNIST_REAL_DIR, "train")
  np.testing.assert_array_equal(np.bincount(labels[fm.split_halves(labels, 0)]), [3000] * 10)


def test_domains_figure_shows_both_domains(tmp_path, monkeypatch):
  raw = fx.make_fmnist_dir(tmp_path, [8] * 10, 1)
  monkeypatch.setenv("FMNIST_DIR", os.fspath(tmp_path))
  picture = fm.domains_figure(per_class=2, scale=1)
  assert picture.dtype == np.uint8 and picture.shape == (40 + 4 * 32 + 4, 60 + 10 * 32)
  # The first source tile is one of the class-0 photos of the source half, unchanged.
  labels = raw["train"][1]
  photos = raw["train"][0][(labels == 0) & ~fm.split_halves(labels, 0)]
  assert any(np.array_equal(picture[40:68, 60:88], p) for p in photos)
