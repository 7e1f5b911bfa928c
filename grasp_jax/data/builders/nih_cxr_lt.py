"""nih_cxr_lt: NIH-CXR-LT (Holste et al. 2022), 20 classes, single-label.

Built from the user's NIH ChestX-ray14 copy and the NIH-CXR-LT label files. Images are resized
to `resolution` x `resolution` (squashed, as in the LongTailCXR benchmark) and stored greyscale
as PNG. NIH has no reports, so the prompt is the label template ("chest x-ray showing
effusion"; No Finding: "normal chest x-ray").
"""
import dataclasses
import os

import tensorflow_datasets as tfds
from etils import epath

from grasp_jax.data import classes as class_lists
from grasp_jax.data import labels as label_tables
from grasp_jax.data.builders import base
from grasp_jax.data.builders import specs
from grasp_jax.data.builders import manual_dir
from grasp_jax.data import prompts

_SPLITS = (("train", "train"), ("balanced_val", "balanced-val"),
           ("balanced_test", "balanced-test"), ("test", "test"))


def index_images(root: epath.Path) -> dict[str, str]:
  """File name -> path for `images/*` and the official `images_NNN/images/*` folders."""
  folders = [root / "images"] + sorted(root.glob("images_*/images"))
  index = {}
  for folder in folders:
    if not folder.is_dir():
      continue
    with os.scandir(folder) as entries:
      for e in entries:
        if e.name in index:
          raise ValueError(f"image {e.name} is in two folders: {index[e.name]} and {e.path}")
        index[e.name] = e.path
  if not index:
    raise FileNotFoundError(f"no NIH ChestX-ray14 images found: expected {root / 'images'}/ or "
                            f"{root}/images_001/images/ ... with the PNG files")
  return index


@dataclasses.dataclass(eq=False)
class NihCxrLtConfig(base.ManualConfig):
  """The options of base.ManualConfig."""


class NihCxrLt(base.Builder):
  """NIH ChestX-ray14 with the NIH-CXR-LT long-tailed labels."""

  name = "nih_cxr_lt"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [NihCxrLtConfig(name="default", description="256 x 256 greyscale.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put (or symlink) into manual_dir:
    images/<Image Index>.png, or the official images_001/images/ ... images_012/images/ folders
                           (NIH ChestX-ray14)
    in manual_dir or manual_dir/labels/ (NIH-CXR-LT labels, from the authors):
      nih-lt_single-label_train.csv, nih-lt_single-label_balanced-val.csv,
      nih-lt_single-label_balanced-test.csv, nih-lt_single-label_test.csv
      (columns: id = image file name, then one 0/1 column per class;
      splits train, balanced_val, balanced_test, test)
  Options (resolution, skip_bad_images, drop_overlapping_images; see base.ManualConfig):
  pipeline.load_builder("nih_cxr_lt", ..., options={"resolution": 512}).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{__doc__}\nResolution {r}.",
        features=specs.example_features(class_lists.NIH_CXR_LT_CLASSES, (r, r, 1)),
        homepage="https://github.com/VITA-Group/LongTailCXR",
        metadata=tfds.core.MetadataDict(class_names=list(class_lists.NIH_CXR_LT_CLASSES),
                                        multi_label=False, resolution=r, splits={}),
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    tables = {}
    for split, name in _SPLITS:
      file = f"nih-lt_single-label_{name}.csv"
      path = manual_dir.find_file(root, (file, f"labels/{file}"), f"label file for {split!r}")
      tables[split] = manual_dir.read_labels(
          path, class_lists.NIH_CXR_LT_CLASSES, required_columns=("id",),
          metadata_columns=("id",), single_label=True)
    keep = manual_dir.disjoint_splits(
        {split: (t.path, t.columns["id"], t.lines) for split, t in tables.items()},
        drop_overlapping=self.builder_config.drop_overlapping_images,
        stats=self.info.metadata["splits"])
    tables = {split: t.take(keep[split]) for split, t in tables.items()}
    images = index_images(root)
    self.info.metadata["train_class_counts"] = dict(zip(
        class_lists.NIH_CXR_LT_CLASSES, tables["train"].class_counts.tolist()))
    return {split: self._generate_examples(split, self._items(t, images))
            for split, t in tables.items()}

  def _items(self, table: label_tables.LabelTable, images: dict[str, str]):
    items = []
    for r, name in enumerate(table.columns["id"]):
      items.append(manual_dir.Item(key=name, image_path=images.get(name), labels=table.labels[r],
                                   label=int(table.labels[r].argmax()),
                                   origin=f"{table.path}:{table.lines[r]}"))
    return items

  def _make(self, item: manual_dir.Item) -> dict:
    if item.image_path is None:
      raise specs.BadImageError(f"image {item.key} not found under images/ or "
                                   "images_*/images/ in manual_dir")
    image = specs.load_image(item.image_path, size=self.builder_config.resolution, mode="L",
                                center_crop=False)
    classes = class_lists.NIH_CXR_LT_CLASSES
    prompt = prompts.findings_prompt([classes[item.label]])
    return specs.make_example(specs.encode_png(image), item.labels, item.label, classes,
                                 prompt, item.key)

  def _generate_examples(self, split, items):
    stats = self.info.metadata["splits"].setdefault(split, {})
    yield from manual_dir.generate_examples(
        items, self._make, skip_bad_images=self.builder_config.skip_bad_images,
        split_stats=stats)
