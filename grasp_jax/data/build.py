r"""`python -m grasp_jax.data.build NAME`: builds one of the project's TFDS datasets, once.

  python -m grasp_jax.data.build mimic_cxr_lt/cxr_lt_2022 --manual_dir=/data/mimic \
      --data_dir=/data/tfds --image_size=512

NAME is a builder of grasp_jax.data.builders, optionally with one of its configs:
fashion_mnist_lt[/small|/source|...], mimic_cxr_lt[/cxr_lt_2022|/cxr_lt_2023], nih_cxr_lt,
imagenet_lt_t2i. --manual_dir is the user's raw copy (the builder's MANUAL_DOWNLOAD_INSTRUCTIONS;
not needed for fashion_mnist_lt). --image_size builds a builder whose resolution is a config field
(all but fashion_mnist_lt, whose 28 px images are fixed) at another size, as the config
`<config>_r<size>` (`r<size>` for `default`): training reads it under that name
(config.data.config) and refuses to train on it at another size (`check_resolution`).

TFDS shows a progress bar per split; a built dataset is reused, not rebuilt. The summary lists per
split the examples and skipped images (with --skip_bad_images, unreadable images are skipped and
counted instead of stopping the build), the counts per class and the config fields to train on it.
"""
import os
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from grasp_jax.data.builders import base as builders_base

from grasp_jax.data import pipeline

import grasp_jax.data.builders  # pylint: disable=unused-import  (registers the builders)


def builder_config(name: str, image_size: int | None = None, *,
                   skip_bad_images: bool = False) -> tuple[str, tfds.core.BuilderConfig]:
  """(dataset name, builder config) for NAME ("nih_cxr_lt", "mimic_cxr_lt/cxr_lt_2023", ...).

  The registered config, or a copy with the options set (builders.base.with_options: named
  after them, e.g. `cxr_lt_2023_r128_skip_bad_images`, so it never replaces the strict build).
  """
  dataset, _, config_name = name.partition("/")
  cls = tfds.builder_cls(dataset)
  base = cls.builder_configs.get(config_name or None) or cls.BUILDER_CONFIGS[0]
  if config_name and config_name not in cls.builder_configs:
    raise ValueError(f"{dataset} has no config {config_name!r}; its configs are "
                     f"{sorted(cls.builder_configs)}")
  options = {}
  if image_size is not None:
    if "resolution" not in getattr(base, "OPTIONS", ()):
      raise ValueError(f"{dataset}/{base.name} has a fixed image size; --image_size is for "
                       "builders with a `resolution` option (config.data.image_size resizes its "
                       "images when loading)")
    if image_size < 1:
      raise ValueError(f"--image_size must be positive, got {image_size}")
    options["resolution"] = image_size
  if skip_bad_images:
    if "skip_bad_images" not in getattr(base, "OPTIONS", ()):
      raise ValueError(f"{dataset} reads no image files; --skip_bad_images does not apply")
    options["skip_bad_images"] = True
  return dataset, builders_base.with_options(cls, base.name, options)


def build(name: str, *, data_dir: str | None, manual_dir: str | None = None,
          image_size: int | None = None, skip_bad_images: bool = False,
          ) -> tfds.core.DatasetBuilder:
  """Builds NAME (see `builder_config`) into data_dir unless it is built there; its builder."""
  dataset, config = builder_config(name, image_size, skip_bad_images=skip_bad_images)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"--manual_dir {manual_dir} is not a directory")
  builder = tfds.builder(dataset, config=config, data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return builder


def check_resolution(builder: tfds.core.DatasetBuilder, image_size: int | None) -> None:
  """Raises if `builder` stores its images at a resolution other than `image_size`.

  Only builders whose resolution is a build parameter record it (metadata `resolution`); the
  others' native size is resized on loading as before. Works on an unbuilt builder too (its
  config's resolution), so a run can fail before an implicit build at the wrong size.
  """
  stored = (builder.info.metadata or {}).get("resolution")
  if stored is None or image_size is None or int(stored) == int(image_size):
    return
  dataset, config = builder.name, builder.builder_config.name
  if config in tfds.builder_cls(dataset).builder_configs:  # Not a resized copy already.
    source = f"{dataset}/{config}"
    target = builder_config(source, image_size)[1].name
  else:
    source, target = f"{dataset}/<config>", "<the name it prints>"
  raise ValueError(
      f"{builder.info.full_name} in {builder.data_dir} stores {stored} x {stored} images, but "
      f"config.data.image_size is {image_size}: build it at {image_size} px with `python -m "
      f"grasp_jax.data.build {source} --image_size={image_size} --manual_dir=... --data_dir=...` "
      f"and train with --config.data.config={target}, or set --config.data.image_size={stored}")


def _split_stats(builder, split) -> tuple[np.ndarray, dict]:
  """(count per class, the builder's own stats) of a split: the counts the builder recorded on
  build, else read from the records."""
  stats = (builder.info.metadata or {}).get("splits", {}).get(split) or {}
  if "class_counts" in stats:
    return np.asarray(stats["class_counts"], np.int64), stats
  return pipeline.dataset_class_counts(builder, split)[1], stats


def summary(builder: tfds.core.DatasetBuilder) -> str:
  """What was built: where, image shape, per split examples and skipped images, counts per class
  (a class x split table) and how to train on it."""
  info = builder.info
  splits = list(info.splits)  # In the builder's order.
  names = pipeline.class_names(builder)
  shape = "x".join(str(d) for d in info.features["image"].shape)
  lines = [f"{builder.data_dir}: {shape} images, {len(names)} classes, {info.dataset_size}",
           f"{'split':<16}{'examples':>10}{'skipped':>9}"]
  counts = {}
  for split in splits:
    counts[split], stats = _split_stats(builder, split)
    notes = []
    if stats.get("skipped_ids"):
      notes.append("skipped ids: " + ", ".join(stats["skipped_ids"]))
    if stats.get("prompt_sources"):
      notes.append("prompts: " + ", ".join(
          f"{k} {v}" for k, v in sorted(stats["prompt_sources"].items())))
    skipped = stats.get("skipped_images", "-")
    lines.append(f"{split:<16}{info.splits[split].num_examples:>10}{skipped:>9}  "
                 f"{'; '.join(notes)}".rstrip())
  width = max(12, *(len(s) + 2 for s in splits))
  name_width = max(len(n) for n in names) + 2
  lines.append(f"{'class':<{name_width}}" + "".join(f"{s:>{width}}" for s in splits))
  for k, n in enumerate(names):
    lines.append(f"{n:<{name_width}}" + "".join(f"{int(counts[s][k]):>{width}}" for s in splits))
  config_name = builder.builder_config.name if builder.builder_config else ""
  data_dir = os.fspath(builder.data_dir)[:-len(info.full_name)].rstrip("/")
  train = [f"--config.data.name={builder.name}", f"--config.data.config={config_name}",
           f"--config.data.data_dir={data_dir}"]
  resolution = (info.metadata or {}).get("resolution")
  if resolution is not None:
    train.append(f"--config.data.image_size={resolution}")
  lines.append("train on it with: " + " ".join(train))
  return "\n".join(lines)


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m grasp_jax.data.build NAME [--manual_dir=DIR] "
                         "[--data_dir=DIR] [--image_size=N] [--skip_bad_images]")
  builder = build(argv[1], data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                  image_size=FLAGS.image_size, skip_bad_images=FLAGS.skip_bad_images)
  print(summary(builder), flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("manual_dir", None, "The raw copy of the dataset (see the builder's "
                      "MANUAL_DOWNLOAD_INSTRUCTIONS); not needed for fashion_mnist_lt.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir to build into (default: $TFDS_DATA_DIR "
                      "or ~/tensorflow_datasets); training reads config.data.data_dir.")
  flags.DEFINE_integer("image_size", None, "Build at this resolution (builders with a "
                       "`resolution` config field); default: the config's own.")
  flags.DEFINE_bool("skip_bad_images", False, "Skip and count unreadable or missing images "
                    "instead of stopping the build.")
  app.run(main)
