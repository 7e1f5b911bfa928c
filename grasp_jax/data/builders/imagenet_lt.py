"""imagenet_lt_t2i: ImageNet-LT (Liu et al. 2019) with class-name prompts, resized on build.

Registered as `imagenet_lt_t2i` because TFDS ships its own `imagenet_lt` builder, which is
imported lazily; sharing the name would make registration depend on import order.

Built from the user's ImageNet copy and the ImageNet-LT split files. Images: central square,
resized to `resolution` x `resolution`, RGB, stored as PNG. Prompt: "a photo of a <name>".
Class names come from a `<wnid> <name>[, synonyms]` file (classnames.txt, LOC_synset_mapping.txt
or synset_words.txt; the first comma-separated name is used, and names that occur twice, like
"crane", get their wnid appended); without one they are class_<i>. The names are in the
metadata (`class_names`), since the ClassLabel is declared before the manual files are read.
"""
import dataclasses
import os
import re
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from grasp_jax.data.builders import base
from grasp_jax.data.builders import specs
from grasp_jax.data.builders import manual_dir
from grasp_jax.data import prompts

_SPLITS = ("train", "val", "test")
_NAME_FILES = ("classnames.txt", "LOC_synset_mapping.txt", "synset_words.txt")
_WNID = re.compile(r"^n\d{8}$")


def read_split_file(path: epath.Path, num_classes: int) -> tuple[list[str], np.ndarray, list[int]]:
  """`<relative image path> <label>` lines -> paths, int64 labels, line numbers."""
  paths, labels, lines = [], [], []
  for n, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.rsplit(None, 1)
    if len(fields) != 2 or not re.fullmatch(r"\d+", fields[1]):
      raise ValueError(f"{path}:{n}: expected '<image path> <label>', got {line!r}")
    label = int(fields[1])
    if label >= num_classes:
      raise ValueError(f"{path}:{n}: label {label} outside 0..{num_classes - 1}")
    paths.append(fields[0])
    labels.append(label)
    lines.append(n)
  if not paths:
    raise ValueError(f"{path}: no rows")
  return paths, np.asarray(labels, np.int64), lines


def read_name_file(path: epath.Path) -> dict[str, str]:
  """`<wnid> <name>[, synonyms]` lines -> {wnid: name}."""
  names = {}
  for n, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split(None, 1)
    if len(fields) != 2 or not _WNID.match(fields[0]) or not fields[1].split(",")[0].strip():
      raise ValueError(f"{path}:{n}: expected '<wnid> <class name>', got {line!r}")
    names[fields[0]] = fields[1].split(",")[0].strip()
  return names


def class_names(wnids: list[str | None], names: dict[str, str] | None,
                name_file: str | None) -> list[str]:
  """Names per class; duplicates made unique by their wnid."""
  if names is None:
    return [f"class_{i}" for i in range(len(wnids))]
  out = []
  for i, w in enumerate(wnids):
    if w is None or w not in names:
      raise ValueError(f"{name_file}: no name for class {i} (wnid {w}, taken from the image "
                       "paths of the split files)")
    out.append(names[w])
  return [f"{n} ({w})" if out.count(n) > 1 else n for n, w in zip(out, wnids)]


@dataclasses.dataclass(eq=False)
class ImagenetLtConfig(base.ManualConfig):
  """base.ManualConfig's options and num_classes (fewer classes: tiny test copies)."""
  OPTIONS: ClassVar[tuple[str, ...]] = base.ManualConfig.OPTIONS + ("num_classes",)
  num_classes: int = 1000


class ImagenetLtT2i(base.Builder):
  """ImageNet-LT for class-conditional text-to-image fine-tuning."""

  name = "imagenet_lt_t2i"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [ImagenetLtConfig(name="default", description="256 x 256 RGB.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put (or symlink) into manual_dir:
    ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt (in manual_dir or
      manual_dir/ImageNet_LT/; lines `<path> <label>`, paths relative to manual_dir, e.g.
      train/n01440764/n01440764_190.JPEG 0 and val/n01440764/ILSVRC2012_val_00006697.JPEG 0)
    train/ and val/ of ImageNet-1k (ILSVRC2012) in one-folder-per-wnid layout
    optional: classnames.txt (or LOC_synset_mapping.txt / synset_words.txt), lines
      `<wnid> <class name>`; without it the classes are named class_<i>
  Options (resolution, skip_bad_images, drop_overlapping_images, num_classes; see
  base.ManualConfig): pipeline.load_builder("imagenet_lt_t2i", ..., options={"resolution": 64}).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    r = cfg.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{__doc__}\nResolution {r}.",
        features=specs.example_features([str(i) for i in range(cfg.num_classes)],
                                            (r, r, 3)),
        homepage="https://github.com/zhmiao/OpenLongTailRecognition-OLTR",
        metadata=tfds.core.MetadataDict(multi_label=False, resolution=r, splits={}),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    root = dl_manager.manual_dir
    rows = {}
    for split in _SPLITS:
      file = f"ImageNet_LT_{split}.txt"
      path = manual_dir.find_file(root, (file, f"ImageNet_LT/{file}"), f"split file {file}")
      rows[split] = (path, *read_split_file(path, cfg.num_classes))
    # The same image may be written "train/x.JPEG" or "./train/x.JPEG".
    keep = manual_dir.disjoint_splits(
        {split: (os.fspath(path), [os.path.normpath(p) for p in paths], lines)
         for split, (path, paths, _, lines) in rows.items()},
        drop_overlapping=cfg.drop_overlapping_images, stats=self.info.metadata["splits"])
    rows = {split: (path, [p for p, k in zip(paths, keep[split]) if k], labels[keep[split]],
                    [n for n, k in zip(lines, keep[split]) if k])
            for split, (path, paths, labels, lines) in rows.items()}
    wnids = self._wnids(rows)
    name_file = next((root / f for f in _NAME_FILES if (root / f).exists()), None)
    names = class_names(wnids, read_name_file(name_file) if name_file else None,
                        os.fspath(name_file) if name_file else None)
    train_counts = np.bincount(rows["train"][2], minlength=cfg.num_classes)
    self.info.metadata.update(class_names=names, wnids=wnids,
                              train_class_counts=dict(zip(names, train_counts.tolist())))
    eye = np.eye(cfg.num_classes, dtype=np.uint8)
    return {
        split: self._generate_examples(split, names, [
            manual_dir.Item(key=p, image_path=os.fspath(root / p), labels=eye[k], label=int(k),
                            origin=f"{path}:{n}") for p, k, n in zip(paths, labels, lines)])
        for split, (path, paths, labels, lines) in rows.items()}

  def _wnids(self, rows) -> list[str | None]:
    """The wnid folder of each class, from the image paths (None if the paths have none)."""
    wnids = [None] * self.builder_config.num_classes
    for path, paths, labels, lines in rows.values():
      for p, k, n in zip(paths, labels, lines):
        w = next((part for part in reversed(p.split("/")[:-1]) if _WNID.match(part)), None)
        if w is None:
          continue
        if wnids[k] is not None and wnids[k] != w:
          raise ValueError(f"{path}:{n}: label {k} is in folder {w}, elsewhere in {wnids[k]}")
        wnids[k] = w
    return wnids

  def _make(self, item: manual_dir.Item, names) -> dict:
    image = specs.load_image(item.image_path, size=self.builder_config.resolution,
                                mode="RGB", center_crop=True)
    return specs.make_example(specs.encode_png(image), item.labels, item.label, names,
                                 prompts.photo_prompt(names[item.label]), item.key)

  def _generate_examples(self, split, names, items):
    stats = self.info.metadata["splits"].setdefault(split, {})
    yield from manual_dir.generate_examples(
        items, lambda item: self._make(item, names),
        skip_bad_images=self.builder_config.skip_bad_images, split_stats=stats)
