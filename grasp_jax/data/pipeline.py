"""grain input pipeline over the TFDS builders of grasp_jax.data.builders.

Batches are dicts of numpy arrays:
  image       float32 [B, H, W, C] in [-1, 1] (C as stored, or `channels`: 1 grey, 3 RGB),
              resized to image_size with PIL bicubic when the stored resolution differs
  label       int32 [B]     class (multi-label data: rarest positive class by train count)
  labels      float32 [B, C] multi-hot
  cluster_id  int32 [B]     partition.assign(labels); 0 when no partition is given
  prompt      str [B]       text condition
  id          str [B]       source identifier
  index       int64 [B]     record index in the split (a key for cached text/latent features)
From a precomputed cache (`cache=DIR`, data/precompute.py) instead of image and prompt:
  latent_mean, latent_logvar  float32 [B, h, w, c]  each image's VAE posterior (unscaled)
  context, pooled, ...        float32 [B, ...]      its prompt's condition (Conditioner.lookup)

Order. A single global stream of record indices is a function of (seed, split size) only:
shuffled per epoch (a fresh permutation each epoch), in file order (shuffle=False), or drawn
with replacement so that every class or cluster is equally likely (balance=). Process p of P
takes stream positions p, p + P, p + 2P, ...: within an epoch the hosts read disjoint records,
and the global batch does not depend on the number of hosts. With drop_remainder and a finite
stream, the stream is cut to a multiple of P * batch_size so every host yields the same number
of batches. Decoding is deterministic, so the iterator state (`get_state()` / `set_state()`,
just the next batch index) restores the exact batch sequence.

Records are read raw (array_record through the TFDS data source) and parsed with the
tf.Example proto bundled in TFDS: ~20x faster than TFDS' generic decoder, and no TensorFlow.
"""
import functools
import io
import logging
import os
import re
import sys
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

import grasp_jax.data.builders  # pylint: disable=unused-import  (registers the builders)
from grasp_jax.data import precompute
from grasp_jax.data.builders import base

BALANCE = (None, "class", "cluster")


OPTIONS_PATTERN = r"(\w+=[^,=\s]+(,\w+=[^,=\s]+)*)?"  # As checked by run/setup.py.


def parse_options(text: str) -> dict[str, str]:
  """"skip_bad_images=true,resolution=512" -> {"skip_bad_images": "true", "resolution": "512"}."""
  items = [item.split("=") for item in text.split(",")] if text else []
  if not re.fullmatch(OPTIONS_PATTERN, text) or len({k for k, _ in items}) < len(items):
    raise ValueError(f"builder options {text!r}: expected distinct key=value items separated "
                     "by commas, without spaces, e.g. 'skip_bad_images=true,resolution=512'")
  return dict(items)


def load_builder(name: str, data_dir: str | None, *, build: bool = False,
                 manual_dir: str | None = None,
                 options: Mapping[str, Any] | None = None) -> tfds.core.DatasetBuilder:
  """The builder `name` ("fashion_mnist_lt", "mimic_cxr_lt/cxr_lt_2023", ...), built if asked.

  `options` set fields of the builder config (builders.base.with_options: e.g.
  {"skip_bad_images": True}; strings such as "true" are parsed); the dataset then has its own
  config name and folder.
  """
  if options:
    builder_name, _, config_name = name.partition("/")
    config = base.with_options(tfds.builder_cls(builder_name), config_name or None, options)
    builder = tfds.builder(builder_name, config=config, data_dir=data_dir)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
  if build:
    download = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=download)
  elif not builder.is_prepared():
    given = f", options={dict(options)!r}" if options else ""
    raise FileNotFoundError(
        f"dataset {builder.name}/{builder.builder_config_name} is not built under "
        f"{builder.data_dir}; build it once with load_builder({name!r}, {data_dir!r}, "
        f"build=True[, manual_dir=...]{given})")
  return builder


def class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  """Class names from the metadata (ImageNet-LT learns them on build), else the ClassLabel."""
  meta = builder.info.metadata or {}
  return tuple(meta.get("class_names") or builder.info.features["label"].names)


def _raw_source(builder, split):
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name} has no split {split!r}; splits are "
                     f"{sorted(builder.info.splits)}")
  return builder.as_data_source(split=split,
                                deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def _feature_map(raw: bytes, keys: Sequence[str]):
  feats = tf_example_pb2.Example.FromString(raw).features.feature
  missing = [k for k in keys if k not in feats]
  if missing:
    raise ValueError(f"record lacks features {missing} (has {sorted(feats)}); was it built by "
                     "grasp_jax.data.builders?")
  return feats


def dataset_labels(builder: tfds.core.DatasetBuilder, split: str = "train",
                   chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(label int64[N], labels uint8[N, C]) of every record of `split`, in record order.

  The first call reads every record, images included, and caches the arrays as
  labels-<split>.npz in the dataset folder when it is writable; later calls load that file.
  """
  source = _raw_source(builder, split)
  n, c = len(source), len(class_names(builder))
  cache = epath.Path(builder.data_dir) / f"labels-{split}.npz"
  if cache.exists():
    with np.load(io.BytesIO(cache.read_bytes())) as z:
      if z["labels"].shape == (n, c):
        return z["label"], z["labels"]
    logging.warning("ignoring %s: it does not match the %d x %d split", cache, n, c)
  label, labels = [], []
  for start in range(0, n, chunk):
    for raw in source.__getitems__(list(range(start, min(start + chunk, n)))):
      feats = _feature_map(raw, ("label", "labels"))
      label.append(feats["label"].int64_list.value[0])
      labels.append(feats["labels"].int64_list.value)
  label, labels = np.asarray(label, np.int64), np.asarray(labels, np.uint8).reshape(n, c)
  buf = io.BytesIO()
  np.savez(buf, label=label, labels=labels)
  tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
  try:
    tmp.write_bytes(buf.getvalue())
    tmp.replace(cache)  # atomic: hosts may write it at the same time
  except OSError as e:
    logging.info("not caching the labels of %s: %s", builder.name, e)
  return label, labels


def dataset_class_counts(builder: tfds.core.DatasetBuilder, split: str = "train",
                         ) -> tuple[tuple[str, ...], np.ndarray]:
  """(class names, int64[C] positives per class in `split`): the input of build_partition."""
  _, labels = dataset_labels(builder, split)
  return class_names(builder), labels.sum(axis=0, dtype=np.int64)


def _seed32(*entropy: int) -> int:
  """A 32-bit seed; consecutive user seeds give unrelated streams (grain reseeds with +epoch)."""
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class BalancedIndices:
  """Global stream position -> record index, each group (class or cluster) equally likely.

  Per epoch of `len(groups)` draws: a group uniformly among the groups present, then a record
  uniformly within it (so record weight ∝ 1 / group size); drawn with numpy from (seed, epoch).
  """

  def __init__(self, groups: np.ndarray, seed: int):
    self._n = len(groups)
    self._order = np.argsort(groups, kind="stable")
    _, self._starts, self._sizes = np.unique(groups[self._order], return_index=True,
                                             return_counts=True)
    self._seed = seed

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    g = rng.integers(len(self._sizes), size=self._n)
    offset = np.floor(rng.random(self._n) * self._sizes[g]).astype(np.int64)
    return self._order[self._starts[g] + offset]

  def __call__(self, position: int) -> int:
    epoch, i = divmod(int(position), self._n)
    return int(self._epoch(epoch)[i])


_MODES = {None: None, 1: "L", 3: "RGB"}


def decode_image(png: bytes, image_size: int | None, channels: int | None = None) -> np.ndarray:
  """PNG/JPEG bytes -> float32 [H, W, C] in [-1, 1], resized (bicubic) to image_size.

  channels=1 or 3 converts with PIL (RGB -> L is ITU-R 601 luma; L -> RGB repeats).
  """
  with PIL.Image.open(io.BytesIO(png)) as img:
    mode = _MODES[channels]
    if mode is not None and img.mode != mode:
      img = img.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
      img = img.resize((image_size, image_size), PIL.Image.Resampling.BICUBIC)
    array = np.asarray(img, np.float32)
  if array.ndim == 2:
    array = array[..., None]
  return array / 127.5 - 1.0


class LoadExample:
  """Record index -> example dict (see the module docstring)."""

  def __init__(self, source, clusters: np.ndarray, image_size: int | None,
               channels: int | None = None):
    self._source, self._clusters = source, clusters
    self._image_size, self._channels = image_size, channels

  def __call__(self, index: int) -> dict[str, Any]:
    feats = _feature_map(self._source[index], ("image", "label", "labels", "prompt", "id"))
    return {
        "image": decode_image(feats["image"].bytes_list.value[0], self._image_size,
                              self._channels),
        "label": np.int32(feats["label"].int64_list.value[0]),
        "labels": np.asarray(feats["labels"].int64_list.value, np.float32),
        "cluster_id": np.int32(self._clusters[index]),
        "prompt": feats["prompt"].bytes_list.value[0].decode(),
        "id": feats["id"].bytes_list.value[0].decode(),
        "index": np.int64(index),
    }


class LoadCached:
  """Record index -> the cached example (precompute.CacheReader) with its cluster id."""

  def __init__(self, reader: precompute.CacheReader, clusters: np.ndarray):
    self._reader, self._clusters = reader, clusters

  def __call__(self, index: int) -> dict[str, Any]:
    return {**self._reader[index], "cluster_id": np.int32(self._clusters[index]),
            "index": np.int64(index)}


def read_examples(builder: tfds.core.DatasetBuilder, split: str, start: int, stop: int, *,
                  batch_size: int, image_size: int | None = None, channels: int | None = None,
                  num_threads: int = 8, prefetch_batches: int = 8) -> grain.IterDataset:
  """Batches of the records [start, stop) of `split` in order (the last one partial), cluster
  ids 0: what the precompute command encodes."""
  source = _raw_source(builder, split)
  load = LoadExample(source, np.zeros(len(source), np.int32), image_size, channels)
  batches = grain.MapDataset.range(start, stop).map(load).batch(batch_size)
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch_batches))


def make_dataset(builder: str | tfds.core.DatasetBuilder, split: str,
                 data_dir: str | None = None, *, batch_size: int,
                 image_size: int | None = None, channels: int | None = None,
                 partition=None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, balance: str | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 drop_remainder: bool = True, num_threads: int = 8,
                 prefetch_batches: int = 8, cache: str | None = None) -> grain.IterDataset:
  """A grain IterDataset of batches (module docstring); `iter()` it for a checkpointable iterator.

  Args:
    builder: a built DatasetBuilder, or a registered TFDS name, optionally with config
      ("mimic_cxr_lt/cxr_lt_2023"), read from `data_dir`.
    split: e.g. "train", "test", "balanced_test".
    data_dir: TFDS data dir holding the built dataset (with a name; None: TFDS' default).
    batch_size: per-process batch size.
    image_size: output resolution (None: as stored).
    channels: 1 or 3 to convert the images (None: as stored).
    partition: a grasp_jax.partition.Partition over this dataset's classes (for cluster_id).
    seed: determines shuffling / balanced sampling.
    shuffle: a fresh permutation per epoch (ignored when `balance` is set).
    num_epochs: passes over the split (balanced: draws of the split's size); None = forever.
    balance: None, "class" (each class equally likely) or "cluster" (each cluster).
    shard_index, shard_count: this process and the number of processes (default: JAX's).
    drop_remainder: drop a last partial batch (and cut the stream evenly across processes).
    num_threads, prefetch_batches: grain read options.
    cache: a precomputed cache of `split` (data/precompute.py): its rows replace image and
      prompt (module docstring); the order and the cluster ids are as without it.
  """
  if balance not in BALANCE:
    raise ValueError(f"balance must be one of {BALANCE}, got {balance!r}")
  if batch_size < 1 or (image_size is not None and image_size < 1):
    raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, "
                     f"{image_size}")
  if channels not in _MODES:
    raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} outside 0..{shard_count - 1}")

  if isinstance(builder, str):
    builder = load_builder(builder, data_dir)
  source = _raw_source(builder, split)
  n = len(source)
  label, labels = dataset_labels(builder, split)
  if partition is not None:
    if tuple(partition.class_names) != class_names(builder):
      raise ValueError(f"partition classes {list(partition.class_names)} differ from the "
                       f"classes of {builder.name} {list(class_names(builder))}")
    clusters = np.asarray(partition.assign(labels), np.int32)
  elif balance == "cluster":
    raise ValueError("balance='cluster' needs a partition")
  else:
    clusters = np.zeros(n, np.int32)

  if balance is not None:
    total = sys.maxsize if num_epochs is None else n * num_epochs
    sampler = BalancedIndices(label if balance == "class" else clusters, _seed32(seed, 1))
    stream = grain.MapDataset.range(total).map(sampler)
  else:
    stream = grain.MapDataset.range(n)
    if shuffle:
      stream = stream.shuffle(seed=_seed32(seed, 0))
    stream = stream.repeat(num_epochs)
  if drop_remainder and len(stream) < sys.maxsize:
    stream = stream[:len(stream) // (batch_size * shard_count) * batch_size * shard_count]
  stream = stream[shard_index::shard_count]
  if cache:
    reader = precompute.CacheReader(cache)
    if len(reader) != n:
      raise ValueError(f"cache {cache} holds {len(reader)} examples, split {split!r} of "
                       f"{builder.name} has {n}")
    load = LoadCached(reader, clusters)
  else:
    load = LoadExample(source, clusters, image_size, channels)
  batches = stream.map(load).batch(batch_size, drop_remainder=drop_remainder)
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch_batches))
