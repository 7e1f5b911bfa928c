"""fashion_mnist_lt: Fashion-MNIST subsampled to long-tailed class profiles, in two domains.

The embedded default dataset. The images are clothes, not X-rays: only the *shape* of the long
tail is medical. Source: the Fashion-MNIST IDX files of the Debian package
`dataset-fashion-mnist` (MIT, Zalando SE), found via $FMNIST_DIR, `dpkg -L` or
/usr/share/datasets/fashion-mnist.

Profile `nih` (configs `default`, `small`): the NIH ChestX-ray14 images carrying exactly one
label (Data_Entry_2017_v2020.csv, 91,324 images) have these counts for the ten most frequent
labels, each given to one Fashion-MNIST class (`nih_profile_class` in the metadata):

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

Source and target (GRASP's setting: a base pretrained on a broad source is adapted to a new,
long-tailed domain). Every class's 6,000 train images are split in two halves of 3,000 by
default_rng((seed, 1)); `source` draws only from one half, `target_*` only from the other, so
no image is in both.
  source      balanced: 2,900 train and 100 val images per class, original appearance, prompts
              "a photo of a trouser"; test: the t10k images.
  target_p0   long-tailed (profile `exponential`): the class of rank r (0 = most frequent) has
  target_p1   round(1000 * (8 / 1000) ** (r / 9)) train images: 1000 585 342 200 117 68 40 23
              14 8 (2,397 images); rank -> class by default_rng(permutation).permutation(10)
              (permutation 0 and 1), so the tail is not always the same (easy) classes. Every
              image in the radiograph domain (grasp_jax.data.domains.radiograph: inversion,
              blur, tone range, vignette, grain seeded by the image's file and index), prompts
              "an x-ray scan of a trouser". val: 100 per class of the half's unused images; test:
              the t10k images (balanced, 1,000 per class) in the radiograph domain; spare: the
              rest of the half's images (1,900 to 2,892 per class), which no generator trains
              on: they train the frozen evaluator (eval.evaluator_extra_splits).
  source_small, target_small   the same with 100 images per class (source) and 100 ... 5
              (target, permutation 0), 10 val and 20 test images per class, no spare split:
              for tests.
Metadata: `train_counts` and `val_counts` per class, `count_order` (classes head -> tail),
`permutation`, `half`, `appearance` and, for radiographs, `transform` (the parameters).
Picture of both domains: docs/domains.png, written by `domains_figure` (python -c "import
PIL.Image; from grasp_jax.data.builders import fashion_mnist_lt as f;
PIL.Image.fromarray(f.domains_figure()).save('docs/domains.png', optimize=True)").
"""
import dataclasses
import gzip
import os
import subprocess

import numpy as np
import PIL.Image
import PIL.ImageDraw
import tensorflow_datasets as tfds

from grasp_jax.data import domains
from grasp_jax.data import prompts
from grasp_jax.data.builders import base
from grasp_jax.data.builders import specs

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
_SOURCE_CODE = {"train": 0, "t10k": 1}  # Seeds each image's radiograph grain with its file.
PROFILES = ("nih", "balanced", "exponential")
RADIOGRAPH = domains.Radiograph()  # The target domain's appearance (in the metadata too).


def profile_counts(head_count: int) -> list[int]:
  """Train images per class: the NIH profile scaled so the head class keeps `head_count`."""
  top = max(n for _, n in NIH_PROFILE)
  return [max(1, head_count * n // top) for _, n in NIH_PROFILE]


def exponential_counts(head_count: int, tail_count: int, n: int) -> list[int]:
  """Counts by rank r = 0..n-1: round(head * (tail / head) ** (r / (n - 1)))."""
  return [round(head_count * (tail_count / head_count) ** (r / (n - 1))) for r in range(n)]


def count_order(permutation: int | None, n: int = len(CLASS_NAMES)) -> np.ndarray:
  """The classes by count rank (most frequent first): class order, or a seeded permutation."""
  if permutation is None:
    return np.arange(n)
  return np.random.default_rng(permutation).permutation(n)


def train_counts(cfg) -> list[int]:
  """Train images per class (class index order) of a FashionMnistLtConfig."""
  n = len(CLASS_NAMES)
  if cfg.profile == "nih":
    by_rank = profile_counts(cfg.head_count)
  elif cfg.profile == "balanced":
    by_rank = [cfg.head_count] * n
  elif cfg.profile == "exponential":
    by_rank = exponential_counts(cfg.head_count, cfg.tail_count, n)
  else:
    raise ValueError(f"unknown profile {cfg.profile!r}; known: {PROFILES}")
  counts = [0] * n
  for rank, k in enumerate(count_order(cfg.permutation, n)):
    counts[k] = by_rank[rank]
  return counts


def head_class(cfg) -> str:
  """The most frequent class of a config (the healthy group's stand-in)."""
  counts = train_counts(cfg)
  return CLASS_NAMES[int(np.argmax(counts))]


def split_halves(labels: np.ndarray, seed: int) -> np.ndarray:
  """bool [N]: True for the target half: of each class's n images, the last n // 2 of a seeded
  permutation. The source half is the rest."""
  rng = np.random.default_rng((seed, 1))
  in_target = np.zeros(len(labels), bool)
  for k in range(len(CLASS_NAMES)):
    pool = rng.permutation(np.flatnonzero(labels == k))
    in_target[pool[len(pool) - len(pool) // 2:]] = True
  return in_target


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
  head_count: int = 6000  # The most frequent class's train images.
  seed: int = 0
  val_per_class: int = 100
  test_per_class: int | None = None  # None: the whole t10k split
  profile: str = "nih"  # 'nih', 'balanced' or 'exponential' (down to `tail_count`)
  tail_count: int = 0
  permutation: int | None = None  # Seed of the rank -> class assignment; None: class order.
  half: str = ""  # '' every train image, or only the 'source' or the 'target' half.
  appearance: str = "photo"  # 'photo' or 'radiograph' (grasp_jax.data.domains)
  spare: bool = False  # A `spare` split: the half's images in neither train nor val.


TARGET = dict(profile="exponential", head_count=1000, tail_count=8, half="target",
              appearance="radiograph", spare=True)


class FashionMnistLt(base.Builder):
  """Fashion-MNIST with long-tailed class profiles, in the photo or the radiograph domain."""

  name = "fashion_mnist_lt"
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Configs source, target_p0 and target_p1 (radiograph domain).",
                   "1.2.0": "The target configs' `spare` split (the frozen evaluator's data)."}
  BUILDER_CONFIGS = [
      FashionMnistLtConfig(name="default", description="Full profile, head class 6000 images."),
      FashionMnistLtConfig(name="small", description="Head class 600 images; for tests and CI.",
                           head_count=600, val_per_class=10, test_per_class=50),
      FashionMnistLtConfig(name="source", description="Balanced source half, photo domain.",
                           profile="balanced", head_count=2900, half="source"),
      FashionMnistLtConfig(name="target_p0", description="Long-tailed target half, radiograph "
                           "domain, class ranks by permutation 0.", permutation=0, **TARGET),
      FashionMnistLtConfig(name="target_p1", description="Long-tailed target half, radiograph "
                           "domain, class ranks by permutation 1.", permutation=1, **TARGET),
      FashionMnistLtConfig(name="source_small", description="source with 100 images per class; "
                           "for tests.", profile="balanced", head_count=100, half="source",
                           val_per_class=10, test_per_class=20),
      FashionMnistLtConfig(name="target_small", description="target_p0 from 100 down to 5 "
                           "images per class; for tests.", permutation=0, val_per_class=10,
                           test_per_class=20, **{**TARGET, "head_count": 100, "tail_count": 5,
                                                 "spare": False}),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if cfg.half not in ("", "source", "target") or cfg.appearance not in prompts.TEMPLATES:
      raise ValueError(f"half {cfg.half!r} (known: '', 'source', 'target'), appearance "
                       f"{cfg.appearance!r} (known: {sorted(prompts.TEMPLATES)})")
    counts = train_counts(cfg)
    order = count_order(cfg.permutation)
    table = "\n".join(f"  {CLASS_NAMES[k]:<12} {counts[k]:>5}" for k in order)
    example = prompts.TEMPLATES[cfg.appearance](CLASS_NAMES[1])
    description = (
        f"{__doc__.splitlines()[0]}\nNot medical images. Train counts ({cfg.profile} profile, "
        f"seed {cfg.seed}, head_count {cfg.head_count}, half {cfg.half or 'all'}, "
        f"{cfg.appearance} domain, prompts like {example!r}):\n"
        f"{table}\nval: up to {cfg.val_per_class} per class from unused train images (none for a "
        f"class whose train images are all used); test: {cfg.test_per_class or 'all'} t10k "
        f"images per class, {cfg.appearance} domain.")
    metadata = dict(
        class_names=list(CLASS_NAMES), train_counts=dict(zip(CLASS_NAMES, counts)),
        count_order=[CLASS_NAMES[k] for k in order], profile=cfg.profile,
        permutation=cfg.permutation, half=cfg.half, appearance=cfg.appearance,
        head_count=cfg.head_count, tail_count=cfg.tail_count, seed=cfg.seed,
        val_per_class=cfg.val_per_class, test_per_class=cfg.test_per_class, multi_label=False)
    if cfg.profile == "nih":
      metadata.update(nih_profile_class=dict(zip(CLASS_NAMES, (n for n, _ in NIH_PROFILE))),
                      nih_profile_count=dict(zip(CLASS_NAMES, (c for _, c in NIH_PROFILE))))
    if cfg.appearance == "radiograph":
      metadata["transform"] = dataclasses.asdict(RADIOGRAPH)
    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=specs.example_features(CLASS_NAMES, (28, 28, 1)),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        metadata=tfds.core.MetadataDict(metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    cfg = self.builder_config
    directory = fmnist_dir()
    train_images, train_labels = load_split(directory, "train")
    test_images, test_labels = load_split(directory, "test")
    pool = train_labels.astype(np.int64)
    if cfg.half:  # The other half's images are out of reach (label -1).
      in_target = split_halves(train_labels, cfg.seed)
      pool = np.where(in_target == (cfg.half == "target"), pool, -1)
    train_idx, val_idx = subsample(pool, train_counts(cfg), cfg.seed, cfg.val_per_class)
    if cfg.test_per_class is None:
      test_idx = np.arange(len(test_labels))
    else:
      test_idx, _ = subsample(test_labels, [cfg.test_per_class] * len(CLASS_NAMES), cfg.seed, 0)
    self.info.metadata["source_dir"] = directory
    self.info.metadata["val_counts"] = dict(zip(
        CLASS_NAMES, np.bincount(train_labels[val_idx], minlength=len(CLASS_NAMES)).tolist()))
    splits = {
        "train": self._generate_examples(train_images, train_labels, train_idx, "train"),
        "val": self._generate_examples(train_images, train_labels, val_idx, "train"),
        "test": self._generate_examples(test_images, test_labels, test_idx, "t10k"),
    }
    if cfg.spare:
      spare_idx = np.setdiff1d(np.flatnonzero(pool >= 0), np.concatenate([train_idx, val_idx]))
      splits["spare"] = self._generate_examples(train_images, train_labels, spare_idx, "train")
    return splits

  def _generate_examples(self, images, labels, indices, source):
    cfg = self.builder_config
    eye = np.eye(len(CLASS_NAMES), dtype=np.uint8)
    pixels = images[indices]
    if cfg.appearance == "radiograph":
      pixels = domains.radiograph(pixels, _SOURCE_CODE[source], indices, RADIOGRAPH)
    prompt = prompts.TEMPLATES[cfg.appearance]
    for i, image in zip(indices, pixels):
      k = int(labels[i])
      key = f"{source}_{i:05d}"  # the image's index in the original IDX file
      yield key, specs.make_example(specs.encode_png(image), eye[k], k, CLASS_NAMES,
                                    prompt(CLASS_NAMES[k]), key)


def domains_figure(per_class: int = 3, scale: int = 3, seed: int = 0) -> np.ndarray:
  """uint8 [H, W] picture (docs/domains.png): per class (columns), `per_class` train images of
  the source half as photos above `per_class` of the target half as radiographs, headed by the
  class's train count in target_p0 and target_p1."""
  images, labels = load_split(fmnist_dir(), "train")
  in_target = split_halves(labels, seed)
  counts = [train_counts(c) for c in FashionMnistLt.BUILDER_CONFIGS if c.name in ("target_p0",
                                                                                 "target_p1")]
  rng = np.random.default_rng(seed)
  size, gap, top, left = 28 * scale, 4, 40, 60
  canvas = PIL.Image.new("L", (left + len(CLASS_NAMES) * (size + gap),
                               top + 2 * per_class * (size + gap) + gap), 255)
  draw = PIL.ImageDraw.Draw(canvas)
  for k, name in enumerate(CLASS_NAMES):
    x = left + k * (size + gap)
    draw.text((x + 2, 4), name, fill=0)
    draw.text((x + 2, 20), f"p0 {counts[0][k]}  p1 {counts[1][k]}", fill=90)
    for half, row0 in ((False, 0), (True, per_class)):
      idx = rng.choice(np.flatnonzero((labels == k) & (in_target == half)), per_class, False)
      pixels = domains.radiograph(images[idx], 0, idx, RADIOGRAPH) if half else images[idx]
      for j, image in enumerate(pixels):
        tile = PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.NEAREST)
        canvas.paste(tile, (x, top + (row0 + j) * (size + gap) + (gap if half else 0)))
  for label, row0 in (("source", 0), ("target", per_class)):
    draw.text((6, top + row0 * (size + gap) + size // 2), label, fill=0)
  return np.asarray(canvas)
