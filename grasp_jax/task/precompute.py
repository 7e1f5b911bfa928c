r"""`python -m grasp_jax.task.precompute`: a run's VAE posteriors and text embeddings, once.

  python -m grasp_jax.task.precompute --config=configs/mimic.py:backbone=unet \
      --config.model.pretrained=/data/weights/sd2-base --config.data.data_dir=/data/tfds \
      --cache_dir=/data/cache/mimic_sd2_512
  python -m grasp_jax.main --config=configs/mimic.py:backbone=unet ... \
      --config.data.cache=/data/cache/mimic_sd2_512 --workdir=DIR

Encodes the built dataset of the config (config.data.*) — every record of its train split — with
the run's VAE (config.model.vae, else <pretrained>/vae) and text conditioner (config.text) into
the cache of grasp_jax/data/precompute.py: each image's posterior mean and log-variance, its
prompt's condition arrays, label and id. Training with config.data.cache=DIR reads these rows and
draws a fresh latent from the posterior at each step, as it does from the VAE; it refuses a cache
made with another dataset, VAE, text encoder or resolution. The partition is not in the cache:
one cache serves every partition and method of the same model and data.

Each process (grasp_jax/parallel/distributed.py) encodes its own chunks on its local devices into
DIR, which every host must see (as training reads every record from every host); a killed run
leaves finished chunks behind and no manifest, and the same command resumes it.
"""
import types

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np
import tqdm

from grasp_jax.data import pipeline
from grasp_jax.data import precompute as cache_lib
from grasp_jax.inference import conditioning
from grasp_jax.inference import latents
from grasp_jax.parallel import distributed
from grasp_jax.parallel import sharding
from grasp_jax.task import experiment


def posterior_fn(codec, devices, batch_size):
  """images [B, H, W, C] (numpy, B <= batch_size) -> (mean, logvar) numpy [B, h, w, c] of the
  VAE posterior, jitted over `devices` for one shape: B padded to batch_size rounded up to a
  multiple of their number."""
  mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1), devices)
  size = -(-batch_size // mesh.size) * mesh.size
  params = codec.params_on(mesh)
  encode = jax.jit(lambda p, x: codec.module.apply({"params": p}, x, method=codec.module.encode),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.batch_sharding(mesh))

  def posterior(images):
    n = len(images)
    padded = np.concatenate([images, np.zeros((size - n,) + images.shape[1:], images.dtype)])
    dist = encode(params, padded)
    return np.asarray(dist.mean)[:n], np.asarray(dist.logvar)[:n]

  return posterior


def encode_chunk(batches, posterior, conditioner, progress=lambda n: None):
  """(example records, text rows) of one chunk's batches (pipeline.read_examples); calls
  `progress(n)` after each batch of n images."""
  examples, prompts = [], {}  # Distinct prompt -> its row, in order of appearance.
  for batch in batches:
    mean, logvar = posterior(batch["image"])
    for i, prompt in enumerate(batch["prompt"]):
      examples.append({"mean": mean[i], "logvar": logvar[i],
                       "text": prompts.setdefault(str(prompt), len(prompts)),
                       "label": int(batch["label"][i]),
                       "labels": batch["labels"][i].astype(np.uint8), "id": str(batch["id"][i])})
    progress(len(batch["prompt"]))
  cond = conditioner.lookup(list(prompts))
  return examples, [{k: v[j] for k, v in cond.items()} for j in range(len(prompts))]


def encode_split(config, cache_dir, *, chunk_size=4096, batch_size=32):
  """Encodes the train split of `config` into `cache_dir` (module docstring), resuming what is
  there; returns the manifest. batch_size: images per VAE call on each host."""
  d = config.data
  builder = experiment.prepare_data(config)
  folder = latents.vae_folder(config)
  if folder is None:
    raise ValueError("the cache holds VAE latents, but the config has no VAE (config.model.vae "
                     "or <config.model.pretrained>/vae): a pixel-space run reads its images")
  # As model.load_codec loads the run's VAE (its weights rounded to model.frozen_dtype).
  codec = latents.load_codec(folder, param_dtype=config.model.frozen_dtype)
  conditioner = conditioning.load_conditioner(config, None)
  spec = {**experiment.cache_identity(config, builder), "chunk_size": chunk_size,
          "latent_shape": codec.latent_shape((d.image_size, d.image_size, d.channels))}
  if distributed.is_primary():
    cache_lib.open_spec(cache_dir, spec)
  distributed.barrier("precompute_spec")
  cache_lib.open_spec(cache_dir, spec)  # Every process checks what it resumes.
  todo = cache_lib.pending_chunks(cache_dir, spec, jax.process_index(), jax.process_count())
  posterior = posterior_fn(codec, jax.local_devices(), batch_size)
  total = sum(stop - start for start, stop in (cache_lib.chunk_range(spec, k) for k in todo))
  with tqdm.tqdm(total=total, unit="img", disable=not distributed.is_primary()) as bar:
    for k in todo:
      start, stop = cache_lib.chunk_range(spec, k)
      batches = pipeline.read_examples(builder, d.train_split, start, stop,
                                       batch_size=batch_size, image_size=d.image_size,
                                       channels=d.channels)
      cache_lib.write_chunk(cache_dir, k, *encode_chunk(batches, posterior, conditioner,
                                                        bar.update))
      logging.info("cache chunk %d (records %d..%d) written", k, start, stop - 1)
  distributed.barrier("precompute_chunks")
  if distributed.is_primary():
    cache_lib.finish(cache_dir)
  distributed.barrier("precompute_manifest")
  return cache_lib.load_manifest(cache_dir)


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()
  manifest = encode_split(FLAGS.config, FLAGS.cache_dir, chunk_size=FLAGS.chunk_size,
                          batch_size=FLAGS.batch_size)
  if distributed.is_primary():
    print(f"{FLAGS.cache_dir}: {manifest['count']} examples of {manifest['dataset']} "
          f"{manifest['split']}, latents {tuple(manifest['latent_shape'])}; train on it with "
          f"--config.data.cache={FLAGS.cache_dir}", flush=True)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
  flags.DEFINE_string("cache_dir", None, "Folder of the cache (created; resumed when partial).")
  flags.DEFINE_integer("chunk_size", 4096, "Examples per cache file (the unit of resuming).")
  flags.DEFINE_integer("batch_size", 32, "Images per VAE call on each host.")
  flags.mark_flags_as_required(["config", "cache_dir"])
  app.run(main)
