"""fashion_mnist_lt: Fashion-MNIST subsampled to the class profile of NIH ChestX-ray14.

The embedded default dataset. The images are clothes, not X-rays: only the *shape* of the long
tail is medical. Source: the Fashion-MNIST IDX files of the Debian package
`dataset-fashion-mnist` (MIT, Zalando SE), found via $FMNIST_DIR, `dpkg -L` or
/usr/share/datasets/fashion-mnist.

Profile: the NIH ChestX-ray14 images carrying exactly one label (Data_Entry_2017_v2020.csv,
91,324 images) have these counts for the ten most frequent labels, each given to one
Fashion-MNIST class (`nih_profile_class` in the metadata):

  Fashion-MNIST class   NIH class            NIH count   train images (head_count 6000)
  T-shirt/top           No Finding              60361    6000
  Trouser               Infiltration             9547     948
  Pullover              Atelectasis              4215     418
  Dress                 Effusion                 3955     393
  Coat                  Nodule                   2705     268
  Sandal                Pneumothorax             2194     218
  Shirt                 Mass                     2139     212
  Sneaker               Consolidation            1310     130
  Bag                   Pleural_Thickening       1126     111
  Ankle boot            Cardiomegaly             1093     108

train count = max(1, floor(head_count * nih_count / 60361)), drawn without replacement from the
6,000 train images of the class with numpy's default_rng(seed). Splits:
  train  the long-tailed subsample (8,806 images in `default`)
  val    up to `val_per_class` images per class from the train images *not* drawn for train
         (held-out diagnostics during training). The head class keeps all its 6,000 images
         at head_count 6000, so in `default` val has 100 images of each of the other nine
         classes and none of T-shirt/top; `small` has a balanced val.
  test   the official t10k images (balanced, 1,000 per class), or `test_per_class` of them
The config `small` (head_count 600, 10 val and 50 test per class) builds in a few seconds.
"""
import dataclasses
import gzip
import os
import subprocess

import numpy as np
import tensorflow_datasets as tfds

from grasp_jax.data.builders import base
from grasp_jax.data.builders import features

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
# NIH ChestX-ray14 single-label image counts (public facts; see the module docstring).
NIH_PROFILE = (("No Finding", 60361), ("Infiltration", 9547), ("Atelectasis", 4215),
               ("Effusion", 3955), ("Nodule", 2705), ("Pneumothorax", 2194), ("Mass", 2139),
               ("Consolidation", 1310), ("Pleural_Thickening", 1126), ("Cardiomegaly", 1093))
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def profile_counts(head_count: int) -> list[int]:
  """Train images per class: the NIH profile scaled so the head class keeps `head_count`."""
  top = max(n for _, n in NIH_PROFILE)
  return [max(1, head_count * n // top) for _, n in NIH_PROFILE]


def fmnist_dir() -> str:
  """The folder holding the Fashion-MNIST IDX files ($FMNIST_DIR, dpkg, or the default path)."""
  if os.environ.get("FMNIST_DIR"):
    return os.environ["FMNIST_DIR"]
  try:
    listed = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True,
                            check=True).stdout.split()
    found = [f for f in listed if f.endswith(_FILES["train"][0])]
    if found:
      return os.path.dirname(found[0])
  except (OSError, subprocess.CalledProcessError):
    pass
  if os.path.exists(os.path.join(DEFAULT_DIR, _FILES["train"][0])):
    return DEFAULT_DIR
  raise FileNotFoundError(
      f"Fashion-MNIST IDX files not found: install them with `apt-get install {DEBIAN_PACKAGE}` "
      f"or set FMNIST_DIR to a folder holding {sorted(f for p in _FILES.values() for f in p)}")


def read_idx(path: str, magic: int) -> np.ndarray:
  """An IDX (gzipped) uint8 array; `magic` 2051 for images [N, 28, 28], 2049 for labels [N]."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot read gzipped IDX file: {e}") from None
  found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
  if found != magic:
    raise ValueError(f"{path}: IDX magic number {found}, expected {magic}")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(dims)):
    raise ValueError(f"{path}: {len(data) - offset} data bytes for shape {dims}")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def load_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  image_file, label_file = (os.path.join(directory, f) for f in _FILES[split])
  for f in (image_file, label_file):
    if not os.path.exists(f):
      raise FileNotFoundError(f"{f} does not exist (Fashion-MNIST dir {directory}; install "
                              f"`{DEBIAN_PACKAGE}` or set FMNIST_DIR)")
  images, labels = read_idx(image_file, 2051), read_idx(label_file, 2049)
  if len(images) != len(labels):
    raise ValueError(f"{image_file} has {len(images)} images but {label_file} has "
                     f"{len(labels)} labels")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"{label_file}: label {labels.max()} outside 0..{len(CLASS_NAMES) - 1}")
  return images, labels


def subsample(labels: np.ndarray, counts, seed: int, spare_per_class: int):
  """Per class k: `counts[k]` indices, then up to `spare_per_class` of the remaining ones."""
  rng = np.random.default_rng(seed)
  chosen, spare = [], []
  for k, n in enumerate(counts):
    pool = np.flatnonzero(labels == k)
    if n > len(pool):
      raise ValueError(f"class {CLASS_NAMES[k]!r} has {len(pool)} images, needs {n}")
    drawn = rng.permutation(pool)
    chosen.append(np.sort(drawn[:n]))
    spare.append(np.sort(drawn[n:n + spare_per_class]))
  return np.concatenate(chosen), np.concatenate(spare)


@dataclasses.dataclass(eq=False)
class FashionMnistLtConfig(tfds.core.BuilderConfig):
  head_count: int = 6000
  seed: int = 0
  val_per_class: int = 100
  test_per_class: int | None = None  # None: the whole t10k split


class FashionMnistLt(base.Builder):
  """Fashion-MNIST with the NIH ChestX-ray14 long-tail profile."""

  name = "fashion_mnist_lt"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      FashionMnistLtConfig(name="default", description="Full profile, head class 6000 images."),
      FashionMnistLtConfig(name="small", description="Head class 600 images; for tests and CI.",
                           head_count=600, val_per_class=10, test_per_class=50),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    counts = profile_counts(cfg.head_count)
    table = "\n".join(f"  {c:<12} <- {nih:<19} {n_nih:>6} -> {n:>5}"
                      for c, (nih, n_nih), n in zip(CLASS_NAMES, NIH_PROFILE, counts))
    description = (
        f"{__doc__.splitlines()[0]}\nNot medical images. Train counts (seed {cfg.seed}, "
        f"head_count {cfg.head_count}):\n{table}\nval: up to {cfg.val_per_class} per class from "
        f"unused train images (none for a class whose train images are all used); test: "
        f"{cfg.test_per_class or 'all'} t10k images per class.")
    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=features.example_features(CLASS_NAMES, (28, 28, 1)),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        metadata=tfds.core.MetadataDict(
            class_names=list(CLASS_NAMES),
            nih_profile_class=dict(zip(CLASS_NAMES, (n for n, _ in NIH_PROFILE))),
            nih_profile_count=dict(zip(CLASS_NAMES, (c for _, c in NIH_PROFILE))),
            train_counts=dict(zip(CLASS_NAMES, counts)),
            head_count=cfg.head_count, seed=cfg.seed, val_per_class=cfg.val_per_class,
            test_per_class=cfg.test_per_class, multi_label=False),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    cfg = self.builder_config
    directory = fmnist_dir()
    train_images, train_labels = load_split(directory, "train")
    test_images, test_labels = load_split(directory, "test")
    train_idx, val_idx = subsample(train_labels, profile_counts(cfg.head_count), cfg.seed,
                                   cfg.val_per_class)
    if cfg.test_per_class is None:
      test_idx = np.arange(len(test_labels))
    else:
      test_idx, _ = subsample(test_labels, [cfg.test_per_class] * len(CLASS_NAMES), cfg.seed, 0)
    self.info.metadata["source_dir"] = directory
    self.info.metadata["val_counts"] = dict(zip(
        CLASS_NAMES, np.bincount(train_labels[val_idx], minlength=len(CLASS_NAMES)).tolist()))
    return {
        "train": self._generate_examples(train_images, train_labels, train_idx, "train"),
        "val": self._generate_examples(train_images, train_labels, val_idx, "train"),
        "test": self._generate_examples(test_images, test_labels, test_idx, "t10k"),
    }

  def _generate_examples(self, images, labels, indices, source):
    eye = np.eye(len(CLASS_NAMES), dtype=np.uint8)
    for i in indices:
      k = int(labels[i])
      key = f"{source}_{i:05d}"  # the image's index in the original IDX file
      yield key, features.make_example(features.encode_png(images[i]), eye[k], k, CLASS_NAMES,
                                       features.photo_prompt(CLASS_NAMES[k]), key)
