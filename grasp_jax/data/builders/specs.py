"""The example layout shared by every builder, and the image helpers that fill it.

Every dataset yields the same features so that downstream code never branches on the dataset:
  image       PNG, uint8 [H, W, C] (C = 1 grey or 3 RGB), already at the config's resolution
  label       ClassLabel: the class (single-label) or the rarest positive class by training
              count (multi-label; ties go to the lower class index, as in grasp_jax.partition)
  labels      uint8 [num_classes] multi-hot (one-hot for single-label data)
  class_name  the positive class names joined by "|"
  prompt      text condition
  id          source identifier (file name, dicom_id, ...)
Images are handed to TFDS as PNG bytes so that building never needs TensorFlow.
"""
import concurrent.futures
import io
import itertools
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

T = TypeVar("T")
S = TypeVar("S")

CLASS_NAME_SEPARATOR = "|"


class BadImageError(ValueError):
  """An image file that is missing or cannot be decoded."""


def example_features(class_names: Sequence[str], image_shape: tuple[int, int, int],
                     ) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=image_shape, encoding_format="png"),
      "label": tfds.features.ClassLabel(names=list(class_names)),
      "labels": tfds.features.Tensor(shape=(len(class_names),), dtype=np.uint8),
      "class_name": tfds.features.Text(),
      "prompt": tfds.features.Text(),
      "id": tfds.features.Text(),
  })


def make_example(image_png: bytes, labels: np.ndarray, label: int,
                 class_names: Sequence[str], prompt: str, example_id: str) -> dict:
  positives = [class_names[i] for i in np.flatnonzero(labels)]
  return {"image": image_png, "label": int(label), "labels": labels.astype(np.uint8),
          "class_name": CLASS_NAME_SEPARATOR.join(positives), "prompt": prompt,
          "id": example_id}


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W] or [H, W, C] -> PNG bytes (fixed settings, so builds are reproducible)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format="png", compress_level=6)
  return buf.getvalue()


def load_image(path: str, *, size: int, mode: str, center_crop: bool) -> np.ndarray:
  """Reads an image file, converts it to `mode` ("L" or "RGB") and resizes it to size x size.

  center_crop=False squashes the whole image to a square (the LongTailCXR protocol for chest
  X-rays, which are close to square); True takes the central square first (ImageNet).
  Raises BadImageError naming the file when it is missing or cannot be decoded.
  """
  try:
    with PIL.Image.open(path) as img:
      # JPEG: let libjpeg decode at a reduced scale (still >= 2x the target), ~10x faster on
      # 3000 px radiographs; the final resize does the rest.
      img.draft(mode, (2 * size, 2 * size))
      img = _to_mode(img, mode)
      if center_crop:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
      img = img.resize((size, size), PIL.Image.Resampling.BICUBIC)
      array = np.asarray(img, np.uint8)
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise BadImageError(f"cannot read image {path}: {e}") from None
  return array[..., None] if array.ndim == 2 else array


def _to_mode(img: PIL.Image.Image, mode: str) -> PIL.Image.Image:
  if img.mode in ("I;16", "I;16B", "I;16L"):  # 16-bit greyscale: keep the top 8 bits.
    img = PIL.Image.fromarray((np.asarray(img, np.uint16) >> 8).astype(np.uint8))
  elif img.mode in ("I", "F"):
    raise ValueError(f"unsupported {img.mode} (32-bit) image")
  return img if img.mode == mode else img.convert(mode)


def thread_map(fn: Callable[[T], S], items: Iterable[T], num_threads: int,
               chunk: int = 256) -> Iterator[S]:
  """Ordered `map(fn, items)` on a thread pool (PIL releases the GIL while decoding).

  Works chunk by chunk so that at most `chunk` results are held in memory.
  """
  if num_threads <= 1:
    yield from map(fn, items)
    return
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    while block := list(itertools.islice(items, chunk)):
      yield from pool.map(fn, block)
