"""grain pipeline: values against TFDS' own decoder, order, sharding, balancing, checkpointing."""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data as fx
from grasp_jax.data import pipeline
from grasp_jax.data.builders import mimic_cxr_lt
from grasp_jax.partition import Partition

FASHION = "fashion_mnist_lt/small"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """fashion_mnist_lt/small from fabricated IDX files and a tiny CXR-LT 2023 build."""
  root = tmp_path_factory.mktemp("pipeline")
  fx.make_fmnist_dir(root / "idx", [620] + [110] * 9, 60)
  old = os.environ.get("FMNIST_DIR")
  os.environ["FMNIST_DIR"] = os.fspath(root / "idx")
  try:
    pipeline.load_builder(FASHION, os.fspath(root / "data"), build=True)
  finally:
    if old is None:
      del os.environ["FMNIST_DIR"]
    else:
      os.environ["FMNIST_DIR"] = old
  fx.make_mimic_dir(root / "mimic")
  config = dataclasses.replace(mimic_cxr_lt.MimicCxrLt.builder_configs["cxr_lt_2023"],
                               name="cxr_lt_2023_r16", resolution=16)
  tfds.builder("mimic_cxr_lt", config=config, data_dir=os.fspath(root / "data")
               ).download_and_prepare(
                   download_config=tfds.download.DownloadConfig(manual_dir=root / "mimic"))
  return os.fspath(root / "data")


def fashion_partition():
  names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
  return Partition(class_names=names, class_to_cluster=(0, 1, 1, 1, 2, 2, 2, 2, 2, 2),
                   cluster_names=("head", "medium", "tail"),
                   class_counts=(600, 94, 41, 39, 26, 21, 21, 13, 11, 10))


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def reference_records(data_dir, name, split):
  """Every record through TFDS' generic decoder (an independent parse path)."""
  source = tfds.builder(name, data_dir=data_dir).as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def test_batches_match_tfds_decoding(data_dir):
  part = fashion_partition()
  ds = pipeline.make_dataset(FASHION, "train", data_dir, batch_size=8, partition=part, seed=3,
                             num_epochs=1)
  ref = reference_records(data_dir, FASHION, "train")
  batches = list(ds)
  assert len(batches) == len(ref) // 8
  b = batches[0]
  assert b["image"].dtype == np.float32 and b["image"].shape == (8, 28, 28, 1)
  assert b["labels"].shape == (8, 10) and b["label"].dtype == np.int32
  for batch in batches[:5]:
    for j, index in enumerate(batch["index"]):
      r = ref[index]
      np.testing.assert_array_equal(batch["image"][j], r["image"] / np.float32(127.5) - 1)
      assert batch["label"][j] == r["label"]
      np.testing.assert_array_equal(batch["labels"][j], r["labels"])
      assert batch["prompt"][j] == r["prompt"].decode()
      assert batch["id"][j] == r["id"].decode()
      assert batch["cluster_id"][j] == part.class_to_cluster[r["label"]]


def test_resize_and_channels(data_dir):
  (b,) = take(pipeline.make_dataset(FASHION, "test", data_dir, batch_size=4, image_size=56,
                                    shuffle=False), 1)
  ref = reference_records(data_dir, FASHION, "test")
  assert b["image"].shape == (4, 56, 56, 1)
  # A built builder works as well as a name; grey -> RGB repeats the channel.
  builder = pipeline.load_builder(FASHION, data_dir)
  (rgb,) = take(pipeline.make_dataset(builder, "test", batch_size=4, channels=3,
                                      shuffle=False), 1)
  for j, index in enumerate(rgb["index"]):
    grey = ref[index]["image"][..., 0] / np.float32(127.5) - 1
    for ch in range(3):
      np.testing.assert_array_equal(rgb["image"][j, ..., ch], grey)
  assert b["image"].min() >= -1.01 and b["image"].max() <= 1.01  # bicubic may overshoot a bit
  for j, index in enumerate(b["index"]):
    # 2x bicubic upsampling, then 2x2 block means: close to the original pixels.
    blocks = b["image"][j, :, :, 0].reshape(28, 2, 28, 2).mean(axis=(1, 3))
    original = ref[index]["image"][..., 0] / 127.5 - 1
    assert np.abs(blocks - original).mean() < 0.15


def test_class_counts_and_labels(data_dir):
  builder = pipeline.load_builder(FASHION, data_dir)
  names, counts = pipeline.dataset_class_counts(builder, "train")
  ref = reference_records(data_dir, FASHION, "train")
  np.testing.assert_array_equal(counts, np.bincount([r["label"] for r in ref], minlength=10))
  assert names == tuple(builder.info.features["label"].names)
  label, labels = pipeline.dataset_labels(builder, "train")
  np.testing.assert_array_equal(label, [r["label"] for r in ref])
  np.testing.assert_array_equal(labels, [r["labels"] for r in ref])


def test_epochs_cover_every_record_in_new_orders(data_dir):
  ds = pipeline.make_dataset(FASHION, "val", data_dir, batch_size=7, seed=0, num_epochs=2,
                             drop_remainder=False)
  order = np.concatenate([b["index"] for b in ds])
  n = 100  # val: 10 per class
  assert len(order) == 2 * n
  np.testing.assert_array_equal(np.sort(order[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(order[n:]), np.arange(n))
  assert not np.array_equal(order[:n], order[n:])
  again = np.concatenate([b["index"] for b in pipeline.make_dataset(
      FASHION, "val", data_dir, batch_size=7, seed=0, num_epochs=2, drop_remainder=False)])
  np.testing.assert_array_equal(order, again)
  other = np.concatenate([b["index"] for b in pipeline.make_dataset(
      FASHION, "val", data_dir, batch_size=7, seed=1, num_epochs=2, drop_remainder=False)])
  assert not np.array_equal(order, other)
  plain = np.concatenate([b["index"] for b in pipeline.make_dataset(
      FASHION, "val", data_dir, batch_size=7, shuffle=False, num_epochs=1,
      drop_remainder=False)])
  np.testing.assert_array_equal(plain, np.arange(n))


@pytest.mark.parametrize("balance", [None, "class"])
def test_hosts_split_the_global_stream(data_dir, balance):
  kwargs = dict(seed=5, num_epochs=1, balance=balance, partition=fashion_partition())
  glob = np.concatenate([b["index"] for b in pipeline.make_dataset(
      FASHION, "val", data_dir, batch_size=1, shard_index=0, shard_count=1,
      drop_remainder=False, **kwargs)])
  hosts = [[b["index"] for b in pipeline.make_dataset(
      FASHION, "val", data_dir, batch_size=4, shard_index=p, shard_count=3, **kwargs)]
           for p in range(3)]
  usable = len(glob) // 12 * 12  # cut to a multiple of hosts * batch size
  assert {len(h) for h in hosts} == {usable // 12}
  for p, h in enumerate(hosts):
    np.testing.assert_array_equal(np.concatenate(h), glob[:usable][p::3])
  if balance is None:  # one epoch: the hosts read disjoint records
    flat = [set(np.concatenate(h).tolist()) for h in hosts]
    assert not (flat[0] & flat[1] or flat[0] & flat[2] or flat[1] & flat[2])


def test_balanced_sampling_frequencies(data_dir):
  part = fashion_partition()
  ds = pipeline.make_dataset(FASHION, "train", data_dir, batch_size=100, seed=0, balance="class",
                             partition=part, num_threads=2, prefetch_batches=2)
  labels = np.concatenate([b["label"] for b in take(ds, 40)])
  counts = np.bincount(labels, minlength=10)  # 4000 draws, expected 400 each (sd ~19)
  assert np.all(np.abs(counts - 400) < 80), counts
  ds = pipeline.make_dataset(FASHION, "train", data_dir, batch_size=100, seed=0,
                             balance="cluster", partition=part, num_threads=2,
                             prefetch_batches=2)
  batches = take(ds, 30)
  clusters = np.concatenate([b["cluster_id"] for b in batches])
  assert np.all(np.abs(np.bincount(clusters, minlength=3) - 1000) < 100)
  # Within the tail cluster, records are uniform, so classes follow their counts.
  tail = np.concatenate([b["label"][b["cluster_id"] == 2] for b in batches])
  share = np.bincount(tail, minlength=10)[4:] / len(tail)
  expected = np.array([26, 21, 21, 13, 11, 10]) / 102
  assert np.all(np.abs(share - expected) < 0.05), share


def test_balanced_indices_match_per_sample_reference():
  groups = np.array([2, 0, 2, 2, 1, 0, 2])
  sampler = pipeline.BalancedIndices(groups, seed=11)
  got = [sampler(i) for i in range(2 * len(groups))]
  # Per-sample reference: same draws, explicit loops over groups and members.
  want = []
  for epoch in range(2):
    rng = np.random.default_rng([11, epoch])
    present = sorted(set(groups.tolist()))
    g = rng.integers(len(present), size=len(groups))
    u = rng.random(len(groups))
    for gi, ui in zip(g, u):
      members = [r for r in range(len(groups)) if groups[r] == present[gi]]
      want.append(members[int(ui * len(members))])
  assert got == want


@pytest.mark.parametrize("balance", [None, "cluster"])
def test_iterator_state_restores_the_sequence(data_dir, balance):
  kwargs = dict(batch_size=6, seed=2, balance=balance, partition=fashion_partition(),
                num_threads=2, prefetch_batches=2)
  it = iter(pipeline.make_dataset(FASHION, "train", data_dir, **kwargs))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = iter(pipeline.make_dataset(FASHION, "train", data_dir, **kwargs))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_multi_label_cluster_is_rarest_positive(data_dir):
  name = "mimic_cxr_lt/cxr_lt_2023_r16"
  builder = pipeline.load_builder(name, data_dir)
  names, counts = pipeline.dataset_class_counts(builder, "train")
  clusters = [i % 4 for i in range(len(names))]
  part = Partition(class_names=names, class_to_cluster=clusters,
                   cluster_names=("a", "b", "c", "d"), class_counts=counts)
  ds = pipeline.make_dataset(name, "train", data_dir, batch_size=3, partition=part,
                             num_epochs=1, image_size=8)
  ref = reference_records(data_dir, name, "train")
  seen = 0
  for b in ds:
    assert b["image"].shape == (3, 8, 8, 1)
    for j, index in enumerate(b["index"]):
      positives = np.flatnonzero(ref[index]["labels"])
      rarest = min(positives, key=lambda c: (counts[c], c))
      assert b["cluster_id"][j] == clusters[rarest]
      assert b["label"][j] == rarest
      seen += 1
  assert seen == len(ref) // 3 * 3


def test_errors(data_dir, tmp_path):
  part = fashion_partition()
  with pytest.raises(ValueError, match="partition classes"):
    pipeline.make_dataset(FASHION, "train", data_dir, batch_size=2,
                          partition=dataclasses.replace(part, class_names=tuple("abcdefghij")))
  with pytest.raises(ValueError, match="needs a partition"):
    pipeline.make_dataset(FASHION, "train", data_dir, batch_size=2, balance="cluster")
  with pytest.raises(ValueError, match="balance must be one of"):
    pipeline.make_dataset(FASHION, "train", data_dir, batch_size=2, balance="classes")
  with pytest.raises(ValueError, match=r"no split 'validation'; splits are \['test', 'train'"):
    pipeline.make_dataset(FASHION, "validation", data_dir, batch_size=2)
  with pytest.raises(FileNotFoundError, match="is not built under"):
    pipeline.make_dataset(FASHION, "train", os.fspath(tmp_path), batch_size=2)
  with pytest.raises(ValueError, match="shard_index 3 outside 0..2"):
    pipeline.make_dataset(FASHION, "train", data_dir, batch_size=2, shard_index=3,
                          shard_count=3)


def test_label_cache(data_dir):
  builder = pipeline.load_builder(FASHION, data_dir)
  cache = os.path.join(builder.data_dir, "labels-val.npz")
  if os.path.exists(cache):
    os.remove(cache)
  fresh = pipeline.dataset_labels(builder, "val")
  assert os.path.exists(cache)
  cached = pipeline.dataset_labels(builder, "val")
  for a, b in zip(fresh, cached):
    np.testing.assert_array_equal(a, b)
  np.savez(cache, label=np.zeros(3, np.int64), labels=np.zeros((3, 10), np.uint8))
  again = pipeline.dataset_labels(builder, "val")  # stale file: ignored and rewritten
  np.testing.assert_array_equal(again[1], fresh[1])
  assert np.load(cache)["labels"].shape == fresh[1].shape
