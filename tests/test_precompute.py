"""The precomputed latent/text cache (data/precompute.py, task/precompute.py) on a miniature
MIMIC-CXR-LT built at 32 px and the tiny SD pipeline: the stored posterior is diffusers' own,
training on the cache gives the loss of encoding on the fly, a killed run resumes, and a cache
made for another VAE or resolution is refused.
"""
import dataclasses
import json
import os
import shutil

from array_record.python import array_record_module
from flax import serialization
import jax
import numpy as np
import pytest

import fixtures_data as fx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import test_conditioning  # noqa: E402  (its tiny pipeline fabricator)

from configs import mimic  # noqa: E402
from grasp_jax import files  # noqa: E402
from grasp_jax.data import pipeline  # noqa: E402
from grasp_jax.data import precompute as cache_lib  # noqa: E402
from grasp_jax.parallel import sharding  # noqa: E402
from grasp_jax.task import experiment  # noqa: E402
from grasp_jax.task import precompute  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("precompute")
  fx.make_mimic_dir(str(root / "manual"))
  pipe = test_conditioning.save_tiny_pipeline(root / "sd", "sd")
  config = mimic.get_config("backbone=unet,method=grasp,resolution=32")
  config.model.pretrained = str(root / "sd")
  config.data.manual_dir = str(root / "manual")
  config.data.data_dir = str(root / "tfds")
  config.data.batch_size = 8
  config.model.dtype = "float32"
  config.model.remat = False
  cache = str(root / "cache")
  manifest = precompute.encode_split(config, cache, chunk_size=8, batch_size=4)
  return config, cache, manifest, root, pipe


def _with(config, overrides):
  """A copy of `config` with {"section.field": value} set."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_cache_holds_diffusers_posterior(run):
  config, cache, manifest, _, pipe = run
  builder = experiment.prepare_data(config)
  n = builder.info.splits["train"].num_examples
  images = next(iter(pipeline.read_examples(builder, "train", 0, n, batch_size=n,
                                            image_size=32, channels=3)))
  assert manifest["count"] == n > 8 and manifest["latent_shape"] == [4, 4, 4]
  # Each chunk of 8 stores its distinct prompts once.
  assert manifest["texts_per_chunk"] == [len(set(images["prompt"][s:s + 8]))
                                         for s in range(0, n, 8)]
  reader = cache_lib.CacheReader(cache)
  with torch.no_grad():
    dist = pipe.vae.encode(torch.from_numpy(images["image"]).permute(0, 3, 1, 2)).latent_dist
  for i in (0, 9, n - 1):
    row = reader[i]
    assert row["id"] == images["id"][i] and row["label"] == images["label"][i]
    np.testing.assert_array_equal(row["labels"], images["labels"][i])
    np.testing.assert_allclose(row["latent_mean"], dist.mean[i].permute(1, 2, 0).numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(row["latent_logvar"], dist.logvar[i].permute(1, 2, 0).numpy(),
                               atol=1e-4)


def test_cached_loss_equals_on_the_fly(run):
  config, cache, manifest, root, _ = run
  exp = experiment.build(config, str(root / "work"))
  cached_config = _with(config, {"data.cache": cache})
  cache_lib.check_identity(manifest, experiment.cache_identity(cached_config, exp.builder), cache)
  cached = dataclasses.replace(exp, config=cached_config)  # What build() makes, minus the loads.
  host, host_cached = next(exp.train_iterator()), next(cached.train_iterator())
  # The same balanced stream of records and cluster ids, but latents and text instead of images.
  np.testing.assert_array_equal(host_cached["index"], host["index"])
  np.testing.assert_array_equal(host_cached["cluster_id"], host["cluster_id"])
  assert "image" not in host_cached and "prompt" not in host_cached
  mesh = sharding.make_mesh(config.mesh)
  variables = exp.init_variables(jax.random.key(0), base=exp.base_params)
  params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  loss = jax.jit(exp.loss_fn)
  losses = {}
  for name, e, h in (("fly", exp, host), ("cached", cached, host_cached)):
    for seed in (1, 2):
      batch = e.encode_batch(sharding.put_batch(e.device_batch(h), mesh), jax.random.key(seed))
      losses[name, "batch"] = batch
      # The loss reads its keys by name: without image_logvar one compiled loss serves both.
      batch = {k: v for k, v in batch.items() if k != "image_logvar"}
      losses[name, seed] = np.asarray(loss(params, extra, batch, jax.random.key(7))[0])
  fly, hit = losses["fly", "batch"], losses["cached", "batch"]  # Of the encode rng 2.
  assert set(hit) == set(fly) | {"image_logvar"}
  np.testing.assert_allclose(hit["image"], fly["image"], rtol=0, atol=1e-5)
  for k in exp.null_cond:
    np.testing.assert_allclose(hit[k], fly[k], rtol=0, atol=1e-6)
  np.testing.assert_allclose(losses["cached", 1], losses["fly", 1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses["cached", 2], losses["fly", 2], rtol=1e-4, atol=1e-6)
  # A fresh posterior sample per step: another encode rng changes the latents and the loss.
  assert np.abs(losses["cached", 1] - losses["cached", 2]).max() > 1e-4


def test_killed_run_resumes_only_missing_chunks(run):
  config, cache, manifest, root, _ = run
  partial = str(root / "partial")
  shutil.copytree(cache, partial)
  os.remove(os.path.join(partial, "manifest.json"))
  os.remove(os.path.join(partial, "examples-00001.array_record"))
  first = os.path.join(partial, "examples-00000.array_record")
  os.utime(first, (0, 0))
  with pytest.raises(FileNotFoundError, match="not a complete cache"):
    cache_lib.CacheReader(partial)
  with pytest.raises(ValueError, match="chunk_size=8"):
    precompute.encode_split(config, partial, chunk_size=4)
  assert precompute.encode_split(config, partial, chunk_size=8, batch_size=4) == manifest
  assert os.stat(first).st_mtime == 0  # Not re-encoded.
  before, after = cache_lib.CacheReader(cache), cache_lib.CacheReader(partial)
  for i in range(len(before)):
    a, b = before[i], after[i]
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_other_vae_or_resolution_refused(run):
  config, cache, manifest, root, _ = run
  other = str(root / "other_vae")
  shutil.copytree(os.path.join(config.model.pretrained, "vae"), other)
  with open(os.path.join(other, "config.json")) as f:
    vae_config = json.load(f)
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump({**vae_config, "scaling_factor": 0.25}, f)
  with pytest.raises(ValueError, match=r"config\.model\.vae") as e:
    experiment.build(_with(config, {"data.cache": cache, "model.vae": other}), str(root / "w2"))
  assert manifest["vae"] in str(e.value) and files.folder_hash(other) in str(e.value)
  # A run at 64 px (its dataset rebuilt at 64) does not fit latents of 32 px images.
  builder = experiment.prepare_data(config)
  identity = experiment.cache_identity(_with(config, {"data.image_size": 64}), builder)
  with pytest.raises(ValueError, match=r"image_size=32, .*image_size=64 .*config\.data\.image_size"):
    cache_lib.check_identity(cache_lib.load_manifest(cache), identity, cache)


def test_text_rows_stored_half_only_when_exact(tmp_path):
  spec = {"dataset": "d", "split": "train", "count": 3, "vae": "v", "text_encoder": "t",
          "image_size": 8, "channels": 3, "chunk_size": 2, "latent_shape": [1, 1, 2]}
  cache = str(tmp_path)
  cache_lib.open_spec(cache, spec)
  rng = np.random.default_rng(0)
  half = rng.normal(size=(2, 5)).astype(np.float16).astype(np.float32)  # A float16 text cache.
  full = rng.normal(size=(2, 5)).astype(np.float32)
  example = lambda i, t: {"mean": np.full((1, 1, 2), i, np.float32),
                          "logvar": np.zeros((1, 1, 2), np.float32), "text": t, "label": i,
                          "labels": np.eye(3, dtype=np.uint8)[i], "id": f"x{i}"}
  assert cache_lib.pending_chunks(cache, spec) == [0, 1]
  cache_lib.write_chunk(cache, 0, [example(0, 1), example(1, 0)],
                        [{"context": half[0]}, {"context": full[0]}])
  assert cache_lib.pending_chunks(cache, spec, 1, 2) == [1]
  with pytest.raises(FileNotFoundError, match=r"chunks \[1\] of 2"):
    cache_lib.finish(cache)
  cache_lib.write_chunk(cache, 1, [example(2, 0)], [{"context": full[1]}])
  assert cache_lib.finish(cache)["texts_per_chunk"] == [2, 1]
  reader = cache_lib.CacheReader(cache)
  for i, context in enumerate((full[0], half[0], full[1])):
    np.testing.assert_array_equal(reader[i]["context"], context)
    assert reader[i]["context"].dtype == np.float32 and reader[i]["label"] == i
  stored = array_record_module.ArrayRecordReader(os.path.join(cache, "texts-00000.array_record"))
  assert [serialization.msgpack_restore(r)["context"].dtype for r in stored.read_all()] == [
      np.float16, np.float32]
