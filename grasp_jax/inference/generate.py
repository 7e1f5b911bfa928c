"""Sampling from a trained experiment: images per class, per-cluster grids, synthetic datasets.

Every sample is conditioned on its class's prompt in the template of the run's builder config
(`class_prompts.class_prompt`: "an x-ray scan of a trouser" on the demo's target, "chest x-ray
showing cardiomegaly"; for MIMIC-CXR-LT, which trains on report impressions where it has them,
the template its builder writes for studies without one), embedded by the experiment's cached
text encoder. Its adapter row is the partition's cluster of that class (`exp.partition`, the one
source of cluster ids), in the conditional and the unconditional (classifier-free guidance) pass
alike. Sampler, steps and guidance come from `config.sample`.

Free prompts go through `sample_prompts` (texts with their cluster ids; `python -m
grasp_jax.sample` routes them, inference/sampling.py). `exp` is anything with the sampling side of
a task.experiment.Experiment: the trainer's, or an inference.generator.Generator built from a
workdir or an export without the dataset.

Sample i of a call starts from the noise `normal(fold_in(rng, i))`, so the images do not depend on
the batch size, the padding of the last batch, or the number of devices. One jitted function per
(experiment, batch size, mesh) is compiled once and reused by later calls (training evaluations).

  images, labels = generate.sample_classes(exp, params, extra, None, 16, jax.random.key(0))
  generate.write_class_folders(images, labels, exp.partition.class_names, "out/samples")
  generate.write_tfds(images, labels, exp.partition.class_names, "out/tfds")
"""
import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import PIL.Image
import tensorflow_datasets as tfds

from grasp_jax.parallel import sharding
from grasp_jax.data.builders import base as builder_base
from grasp_jax.data.builders import class_prompts
from grasp_jax.data.builders import specs
from grasp_jax.diffusion import samplers
from grasp_jax.evaluation import plots
from grasp_jax.models import backbone

# config.sample.sampler -> grasp_jax.diffusion.samplers name.
SAMPLERS = {"ddim": "ddim", "dpmpp2m": "dpmsolver++", "euler": "euler"}
SYNTHETIC_NAME = "grasp_synthetic"
# Parameters the loss trains besides the backbone's (CORAL's projection head); not model inputs.
NOT_MODEL = ("coral_head",)


# ---------------------------------------------------------------------------------------------
# Classes, prompts, parameters.

def resolve_classes(exp, classes=None):
  """Class indices from None/'' (config.sample.classes, else all), a comma-separated string
  of names or indices, or a sequence of class names / indices."""
  names = exp.partition.class_names
  if classes is None or classes == "":
    classes = exp.config.sample.classes or list(range(len(names)))
  if isinstance(classes, str):
    classes = [int(c) if c.strip().isdigit() else c.strip() for c in classes.split(",")
               if c.strip()]
  out = []
  for c in classes:
    if isinstance(c, str):
      if c not in names:
        raise ValueError(f"unknown class {c!r} (config.sample.classes or --classes); classes "
                         f"are {list(names)}")
      out.append(names.index(c))
    elif 0 <= int(c) < len(names):
      out.append(int(c))
    else:
      raise ValueError(f"class index {c} outside 0..{len(names) - 1}")
  if not out:
    raise ValueError("no classes to sample")
  return out


def to_uint8(images):
  """[-1, 1] floats -> uint8 (clipped, rounded)."""
  return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
                  ).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The compiled sampler.

def _model_space(exp):
  """(sample shape, decode to [-1, 1] images). The latent-diffusion hook: an experiment with a
  VAE provides `latent_shape` and `decode_latents(latents) -> images`, a jitted call of its own
  (the VAE parameters are its argument), applied to the sampler's output."""
  c = exp.config
  if hasattr(exp, "decode_latents"):
    return tuple(exp.latent_shape), exp.decode_latents
  if c.model.vae:
    raise NotImplementedError(f"config.model.vae={c.model.vae!r}: latent sampling needs the "
                              "experiment to provide latent_shape and decode_latents")
  return (c.data.image_size, c.data.image_size, c.data.channels), lambda x: x


_COMPILED = {}  # (id(exp), batch size, mesh) -> (exp, fn); exp is kept so its id stays unique.


def _sampler(exp, batch_size, mesh):
  key = (id(exp), batch_size, mesh)
  if key in _COMPILED:
    return _COMPILED[key][1]
  c = exp.config
  if c.sample.sampler not in SAMPLERS:
    raise ValueError(f"config.sample.sampler={c.sample.sampler!r}; expected one of "
                     f"{sorted(SAMPLERS)}")
  apply = backbone.model_fn_for(exp.module, c.model.backbone)
  shape, decode = _model_space(exp)
  # Self-guided minority guidance (diffusion/minority.py); run configs older than the option
  # lack the field.
  minority = float(c.sample.get("minority_guidance", 0.0))

  def run(variables, cond, cluster_ids, indices, null_cond, rng):
    x_init = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), shape))(indices)
    model_fn = lambda x, t, cnd, ids: apply(variables, x, t, cnd, ids)
    x0 = samplers.sample(model_fn, exp.schedule, (batch_size,) + shape, cond, cluster_ids, rng,
                         null_cond=null_cond, guidance_scale=float(c.sample.guidance_scale),
                         num_steps=int(c.sample.steps), sampler=SAMPLERS[c.sample.sampler],
                         x_init=x_init, minority_guidance=minority)
    return x0

  out = sharding.replicated(mesh) if mesh is not None else None
  sample = jax.jit(run, out_shardings=out)
  fn = lambda *args: decode(sample(*args))
  _COMPILED[key] = (exp, fn)
  return fn


def _put(x, mesh):
  """Host array (identical on every process) -> batch-sharded global array (or as is)."""
  if mesh is None:
    return x
  spec = NamedSharding(mesh, P(sharding.MESH_AXES, *([None] * (x.ndim - 1))))
  return jax.make_array_from_callback(x.shape, spec, lambda idx: x[idx])


def sample_prompts(exp, params, extra, texts, cluster_ids, rng, *, batch_size=None, mesh=None,
                   progress=None):
  """Images [N, H, W, C] float32 in model space (~[-1, 1]): sample i conditioned on `texts[i]`
  with adapter row `cluster_ids[i]`, from the noise normal(fold_in(rng, i)).

  params: the full parameter tree (frozen base + trainables), as they are sharded;
  extra: the other variable collections (TrainState.extra). batch_size: samples per device call
  (default config.sample.batch_size; rounded up to a multiple of the mesh size); the last batch
  is padded, so every call has one shape. mesh: shard the batch over its ('data', 'fsdp') axes.
  progress: called as progress(done, total) after each batch.
  """
  texts = list(texts)
  cluster_ids = np.asarray(cluster_ids, np.int32).reshape(-1)
  n = len(texts)
  if not n:
    raise ValueError("sample_prompts: no prompts")
  if cluster_ids.shape != (n,):
    raise ValueError(f"{n} prompts but {cluster_ids.size} cluster ids")
  devices = mesh.devices.size if mesh is not None else 1
  batch = batch_size or exp.config.sample.batch_size
  batch = -(-batch // devices) * devices
  fn = _sampler(exp, batch, mesh)
  variables = {"params": {k: v for k, v in params.items() if k not in NOT_MODEL}, **extra}
  null_cond = jax.tree.map(jnp.asarray, exp.null_cond)
  outputs = []
  for start in range(0, n, batch):
    k = min(batch, n - start)
    pad = batch - k  # Padded with the last real prompt.
    cond = exp.conditioner.lookup(texts[start:start + k] + texts[start + k - 1:start + k] * pad)
    ids = np.concatenate([cluster_ids[start:start + k], np.repeat(cluster_ids[start + k - 1], pad)])
    indices = np.arange(start, start + batch, dtype=np.int32)
    args = jax.tree.map(lambda x: _put(np.asarray(x), mesh), (cond, ids, indices))
    outputs.append(np.asarray(fn(variables, *args, null_cond, rng))[:k])
    if progress is not None:
      progress(start + k, n)
  return np.concatenate(outputs).astype(np.float32)


def sample_labels(exp, params, extra, labels, rng, *, batch_size=None, mesh=None):
  """`sample_prompts` for class indices `labels` [N]: each class's template prompt, its
  partition cluster."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  names = exp.partition.class_names
  if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
    raise ValueError(f"labels must lie in 0..{len(names) - 1}, got {labels.min()}..{labels.max()}")
  d = exp.config.data
  texts = [class_prompts.class_prompt(d.name, d.config, names[c]) for c in labels]
  return sample_prompts(exp, params, extra, texts, exp.partition.assign(labels), rng,
                        batch_size=batch_size, mesh=mesh)


def sample_classes(exp, params, extra, classes, per_class, rng, *, batch_size=None, mesh=None):
  """`per_class` samples of each class: (uint8 images [N, H, W, C], int labels [N]), grouped by
  class in the order of `classes` (see `resolve_classes`; None: config.sample.classes or all).
  """
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  labels = np.repeat(np.asarray(resolve_classes(exp, classes), np.int64), per_class)
  images = sample_labels(exp, params, extra, labels, rng, batch_size=batch_size, mesh=mesh)
  return to_uint8(images), labels


def cluster_grids(exp, params, extra, rng, n_per_cluster, *, batch_size=None, mesh=None):
  """{'samples/<cluster>': uint8 grid [H, W, C]}: n_per_cluster samples per cluster, cycling
  through the cluster's classes from most to least frequent. One sampling call for all clusters.

  For CLU: `writer.write_images(step, {k: g[None] for k, g in grids.items()})`.
  """
  part = exp.partition
  counts = np.asarray(part.class_counts)
  labels, owners = [], []
  for k in range(part.num_clusters):
    members = sorted((part.class_names.index(c) for c in part.classes_of(k)),
                     key=lambda i: (-counts[i], i))
    labels += [members[j % len(members)] for j in range(n_per_cluster)]
    owners += [k] * n_per_cluster
  images = to_uint8(sample_labels(exp, params, extra, labels, rng, batch_size=batch_size,
                                  mesh=mesh))
  owners = np.asarray(owners)
  cols = int(np.ceil(np.sqrt(n_per_cluster)))
  return {f"samples/{name}": plots.image_grid(images[owners == k], cols)
          for k, name in enumerate(part.cluster_names)}


# ---------------------------------------------------------------------------------------------
# Writers.

def folder_name(class_name):
  """A file-system-safe folder name for a class ('T-shirt/top' -> 'T-shirt_top')."""
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", class_name).strip("_") or "class"


def write_class_folders(images, labels, class_names, out_dir):
  """PNG files out_dir/<class folder>/<i>.png (i counts within the class) and out_dir/classes.json
  ({folder: class name}). Returns the folders written."""
  images, labels = np.asarray(images), np.asarray(labels)
  _check_set(images, labels, class_names)
  folders = {}
  for c in sorted(set(labels.tolist())):
    name = folder_name(class_names[c])
    while name in folders:  # Two names that sanitise alike.
      name += "_"
    folders[name] = c
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    for i, image in enumerate(images[labels == c]):
      PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
          os.path.join(path, f"{i}.png"))
  with open(os.path.join(out_dir, "classes.json"), "w") as f:
    json.dump({name: class_names[c] for name, c in folders.items()}, f, indent=1)
  return {class_names[c]: os.path.join(out_dir, name) for name, c in folders.items()}


class _SyntheticSet(builder_base.Builder, skip_registration=True):
  """A generated set in the project's example layout (so grasp_jax.data.pipeline reads it)."""
  name = SYNTHETIC_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Samples of a trained GRASP experiment."}

  def __init__(self, *, examples, class_names, image_shape, description, **kwargs):
    self._examples, self._class_names = examples, list(class_names)
    self._image_shape, self._description = image_shape, description
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self._description, disable_shuffling=True,
        features=specs.example_features(self._class_names, self._image_shape),
        metadata=tfds.core.MetadataDict(class_names=self._class_names, synthetic=True))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield from self._examples


def write_tfds(images, labels, class_names, out_dir, *, prompts=None,
               description="Synthetic images generated by grasp_jax."):
  """Writes the set as TFDS array_record dataset (split 'train', the project's example layout);
  replaces an earlier one. Returns its folder, for `tfds.builder_from_directory`.

  prompts: the prompt of each image (default: none recorded).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  _check_set(images, labels, class_names)
  eye = np.eye(len(class_names), dtype=np.uint8)
  examples = [(f"synthetic_{i:06d}", specs.make_example(
      specs.encode_png(image), eye[c], int(c), class_names,
      prompts[i] if prompts is not None else "", f"synthetic_{i:06d}"))
              for i, (image, c) in enumerate(zip(images, labels))]
  folder = os.path.join(out_dir, SYNTHETIC_NAME, str(_SyntheticSet.VERSION))
  if os.path.exists(folder):  # Before the builder exists: it would read the old metadata.
    shutil.rmtree(folder)
  builder = _SyntheticSet(examples=examples, class_names=class_names,
                          image_shape=images.shape[1:], description=description,
                          data_dir=out_dir)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def _check_set(images, labels, class_names):
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 [N, H, W, 1|3], got {images.dtype} {images.shape}")
  if labels.shape != (len(images),):
    raise ValueError(f"labels {labels.shape} do not match {len(images)} images")
  if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(f"labels must lie in 0..{len(class_names) - 1}")


# ---------------------------------------------------------------------------------------------
# --mode=sample.

@dataclasses.dataclass
class SampleOutput:
  images: np.ndarray
  labels: np.ndarray
  folders: dict
  tfds_dir: str


def run_sample(exp, params, extra, workdir, *, classes=None, per_class=None, mesh=None,
               seed=None):
  """Samples `per_class` (default config.sample.per_class) images of each class and writes
  WORKDIR/samples/<class>/<i>.png and the TFDS set WORKDIR/samples/tfds/grasp_synthetic/1.0.0."""
  c = exp.config
  per_class = per_class or c.sample.per_class
  rng = jax.random.key(c.seed if seed is None else seed)
  images, labels = sample_classes(exp, params, extra, classes, per_class, rng, mesh=mesh)
  out = os.path.join(workdir, "samples")
  folders, tfds_dir = {}, ""
  if jax.process_index() == 0:
    names = exp.partition.class_names
    folders = write_class_folders(images, labels, names, out)
    texts = [class_prompts.class_prompt(c.data.name, c.data.config, names[k]) for k in labels]
    tfds_dir = write_tfds(images, labels, names, os.path.join(out, "tfds"), prompts=texts)
  return SampleOutput(images, labels, folders, tfds_dir)
