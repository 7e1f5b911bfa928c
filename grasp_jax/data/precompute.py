"""The precomputed-input cache: each train example's VAE posterior and prompt embedding, stored once.

Training on it (`config.data.cache=DIR`) skips image decoding, the VAE encoder and the text
encoder, while still drawing a fresh latent from each example's posterior at every step. The
encoders live above this layer: `python -m grasp_jax.task.precompute` writes the cache with the
functions here, and `pipeline.make_dataset(cache=DIR)` reads it through `CacheReader`.

A cache folder holds a split of N records cut into chunks of `chunk_size` records:
  spec.json                      what is encoded: `IDENTITY` (dataset, split, N, VAE sha256, text
                                 encoder, image size, channels), chunk_size, latent_shape;
                                 written first, checked again on resume
  examples-KKKKK.array_record    chunk K, one msgpack record per example in record order:
                                 mean, logvar  float32 [h, w, c]  the VAE posterior (unscaled)
                                 text          int  its prompt's row in texts-KKKKK
                                 label int, labels uint8 [C], id str
  texts-KKKKK.array_record       chunk K's distinct prompts: the arrays Conditioner.lookup gives
                                 (context, pooled, ...), each float16 when that is exact
  manifest.json                  spec + each chunk's count of texts; written last, so a cache
                                 without it is incomplete and never read
Each chunk is written under temporary names and renamed, texts before examples: an examples file
exists only for a finished chunk, and a rerun encodes only the missing ones. Chunk K belongs to
process K mod P, so each host encodes its own slice and a resume may use another host count.
Cluster ids are not stored: the partition assigns them when training reads the cache.
"""
import os
from typing import Any, Mapping, Sequence

from array_record.python import array_record_data_source
from array_record.python import array_record_module
from flax import serialization
import numpy as np

from grasp_jax import files

# Spec key -> the config field it follows from (named when a cache does not fit a run).
IDENTITY = {
    "dataset": "config.data.name/config/builder_options",
    "split": "config.data.train_split",
    "count": "config.data.train_split (its number of records)",
    "vae": "config.model.vae (sha256 of the VAE folder)",
    "vae_dtype": "config.model.frozen_dtype (the VAE's stored weights)",
    "text_encoder": "config.text.encoder",
    "image_size": "config.data.image_size",
    "channels": "config.data.channels",
}
_WRITER_OPTIONS = "group_size:1"  # Random access, as grain reads (zstd: SD3's padding is free).


def _path(cache_dir, kind, chunk):
  return os.path.join(cache_dir, f"{kind}-{chunk:05d}.array_record")


def num_chunks(spec: Mapping[str, Any]) -> int:
  return -(-spec["count"] // spec["chunk_size"])


def chunk_range(spec: Mapping[str, Any], chunk: int) -> tuple[int, int]:
  """[start, stop) record indices of `chunk`."""
  start = chunk * spec["chunk_size"]
  return start, min(start + spec["chunk_size"], spec["count"])


def check_identity(recorded: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Raises unless `recorded` (a spec or manifest) has the `IDENTITY` values of `expected`."""
  for key, field in IDENTITY.items():
    if recorded.get(key) != expected[key]:
      raise ValueError(
          f"{where} was made with {key}={recorded.get(key)!r}, but this run has "
          f"{key}={expected[key]!r} (from {field}): point config.data.cache at a cache made for "
          "this run, or make one with `python -m grasp_jax.task.precompute --config=... "
          "--cache_dir=NEW_DIR`")


def open_spec(cache_dir: str, spec: Mapping[str, Any]) -> None:
  """Writes spec.json into a new cache; checks an existing one (a resume) against `spec`."""
  path = os.path.join(cache_dir, "spec.json")
  if not os.path.exists(path):
    files.write_json(path, spec)
    return
  recorded = files.read_json(path)
  check_identity(recorded, spec, cache_dir)
  for key in ("chunk_size", "latent_shape"):
    if recorded.get(key) != files.jsonable(spec[key]):
      raise ValueError(f"{cache_dir} is being written with {key}={recorded.get(key)!r}, not "
                       f"{spec[key]!r}: resume it with the same settings or use a new folder")


def pending_chunks(cache_dir: str, spec: Mapping[str, Any], process_index: int = 0,
                   process_count: int = 1) -> list[int]:
  """This process's chunks that are not written yet."""
  return [k for k in range(process_index, num_chunks(spec), process_count)
          if not os.path.exists(_path(cache_dir, "examples", k))]


def _write_records(path, records):
  tmp = f"{path}.tmp{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  for record in records:
    writer.write(serialization.msgpack_serialize(record))
  writer.close()
  os.replace(tmp, path)


def _compact(array):
  """float16 when that loses nothing (a float16 text cache's rows), else the array as is."""
  array = np.asarray(array)
  if array.dtype == np.float32:
    half = array.astype(np.float16)
    if np.array_equal(half.astype(np.float32), array):
      return half
  return array


def write_chunk(cache_dir: str, chunk: int, examples: Sequence[Mapping[str, Any]],
                texts: Sequence[Mapping[str, np.ndarray]]) -> None:
  """Writes chunk `chunk`: its examples (dicts as in the module docstring) and text rows."""
  _write_records(_path(cache_dir, "texts", chunk),
                 [{k: _compact(v) for k, v in row.items()} for row in texts])
  _write_records(_path(cache_dir, "examples", chunk), examples)  # Last: marks it finished.


def finish(cache_dir: str) -> dict[str, Any]:
  """Writes manifest.json once every chunk is written; returns it."""
  spec = files.read_json(os.path.join(cache_dir, "spec.json"))
  missing = pending_chunks(cache_dir, spec)
  if missing:
    raise FileNotFoundError(f"{cache_dir}: chunks {missing} of {num_chunks(spec)} are not "
                            "written; run the precompute command again to finish them")
  texts = []
  for k in range(num_chunks(spec)):
    start, stop = chunk_range(spec, k)
    count = array_record_module.ArrayRecordReader(_path(cache_dir, "examples", k)).num_records()
    if count != stop - start:
      raise ValueError(f"{_path(cache_dir, 'examples', k)} holds {count} records, expected "
                       f"{stop - start}")
    texts.append(
        array_record_module.ArrayRecordReader(_path(cache_dir, "texts", k)).num_records())
  manifest = {**spec, "texts_per_chunk": texts}
  files.write_json(os.path.join(cache_dir, "manifest.json"), manifest)
  return manifest


def load_manifest(cache_dir: str) -> dict[str, Any]:
  """The manifest of a complete cache; an incomplete or missing one is an error naming it."""
  path = os.path.join(cache_dir, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.data.cache={cache_dir!r} is not a complete cache (no manifest.json): make or "
        "finish it with `python -m grasp_jax.task.precompute --config=... "
        f"--cache_dir={cache_dir}`")
  return files.read_json(path)


class CacheReader:
  """Record index -> the cached example: latent_mean, latent_logvar (float32 [h, w, c]), the
  text arrays (float32), label (int32), labels (float32 [C]) and id, as the pipeline yields."""

  def __init__(self, cache_dir: str):
    self.manifest = load_manifest(cache_dir)
    chunks = range(num_chunks(self.manifest))
    self._examples = array_record_data_source.ArrayRecordDataSource(
        [_path(cache_dir, "examples", k) for k in chunks])
    self._texts = array_record_data_source.ArrayRecordDataSource(
        [_path(cache_dir, "texts", k) for k in chunks])
    self._text_offsets = np.cumsum([0] + self.manifest["texts_per_chunk"])

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = serialization.msgpack_restore(self._examples[index])
    chunk = index // self.manifest["chunk_size"]
    text = serialization.msgpack_restore(self._texts[int(self._text_offsets[chunk] + ex["text"])])
    return {"latent_mean": ex["mean"], "latent_logvar": ex["logvar"],
            **{k: np.asarray(v, np.float32) for k, v in text.items()},
            "label": np.int32(ex["label"]), "labels": np.asarray(ex["labels"], np.float32),
            "id": ex["id"]}
