r"""FID (and optionally KID, PRDC) between two image folders, with the FID Inception in JAX.

  python -m grasp_jax.evaluation.fid DIR_A DIR_B [--mode=ours|clean] [--kid] [--prdc] \
      [--batch_size=50] [--max_images=0]

--mode=clean preprocesses as clean-fid's "clean" mode (PIL bicubic in float32), so the FID
compares with published clean-fid numbers; the default 'ours' is the project's own (bilinear,
antialiased), which results.json uses unless config.eval.fid_mode says otherwise.

Folders are searched recursively for PNG/JPEG files (sorted paths; `--max_images` keeps the first
ones). Images may have any size and be grey or RGB (8-bit). Prints N per folder, the feature
network's weights sha1, the input resolution and resize method with the numbers: an FID is
only comparable to another computed with the same N, resolution, resize and weights.
"""
import collections.abc
import pathlib

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from grasp_jax.evaluation import inception
from grasp_jax.evaluation import metrics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_MODE = flags.DEFINE_enum("mode", "ours", ["ours", "clean"], "Inception preprocessing: the "
                          "project's ('ours') or clean-fid's 'clean'.")
_KID = flags.DEFINE_bool("kid", False, "Also print KID (mean and std over subsets).")
_PRDC = flags.DEFINE_bool("prdc", False, "Also print precision/recall/density/coverage (k=5), "
                          "DIR_A being the real set.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 50, "Images per Inception forward pass.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Use at most this many images per folder "
                                   "(first in sorted path order); 0 = all.")


def list_images(directory, max_images=0):
  """Sorted PNG/JPEG paths under `directory` (recursive); the first `max_images` if > 0."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise ValueError(f"{directory} is not a directory")
  paths = sorted(p for p in directory.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise ValueError(f"{directory} holds no {'/'.join(IMAGE_SUFFIXES)} files")
  return paths[:max_images] if max_images > 0 else paths


def load_image(path):
  """8-bit image file -> uint8 [H, W, 1] (grey) or [H, W, 3]."""
  try:
    with Image.open(path) as image:
      if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(f"{path}: {image.mode} pixels are not 8-bit; convert the image first")
      if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))[..., None]
      return np.asarray(image.convert("RGB"))
  except OSError as e:
    raise ValueError(f"{path}: cannot read image ({e})") from e


class ImageFolder(collections.abc.Sequence):
  """The images of a folder, read from disk only when indexed (feature extraction is batched)."""

  def __init__(self, directory, max_images=0):
    self.paths = list_images(directory, max_images)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return load_image(self.paths[i])


def compare_folders(dir_a, dir_b, kid=False, prdc=False, batch_size=50, max_images=0,
                    mode="ours"):
  """Returns the metrics and their provenance (N, resolution, resize, mode, weights sha1) as a
  dict; "warnings" lists what makes the numbers unreliable (N below the feature dimension)."""
  folders = ImageFolder(dir_a, max_images), ImageFolder(dir_b, max_images)
  for directory, folder in zip((dir_a, dir_b), folders):
    if len(folder) < 2:
      raise ValueError(f"{directory} holds {len(folder)} image; FID needs at least 2 per folder "
                       f"(a covariance)")
  extractor = inception.load_inception(batch_size, mode=mode)
  feats_a, feats_b = (extractor(folder) for folder in folders)
  dim = feats_a.shape[1]
  warnings = [f"{d}: N = {len(f)} < {dim} feature dims: the covariance is rank deficient, FID "
              f"and KID are strongly biased in N; compare only numbers with the same N"
              for d, f in ((dir_a, feats_a), (dir_b, feats_b)) if len(f) < dim]
  for w in warnings:
    logging.warning(w)
  result = {"n_a": len(feats_a), "n_b": len(feats_b), **extractor.info(),
            "fid": metrics.fid(feats_a, feats_b), "warnings": warnings}
  if kid:
    result["kid"], result["kid_std"] = metrics.kid(feats_a, feats_b)
  if prdc:
    result.update(metrics.prdc(feats_a, feats_b))
  return result


def main(argv):
  if len(argv) != 3:
    raise app.UsageError(f"expected two folders, DIR_A DIR_B; got {argv[1:]}")
  result = compare_folders(argv[1], argv[2], kid=_KID.value, prdc=_PRDC.value,
                           batch_size=_BATCH_SIZE.value, max_images=_MAX_IMAGES.value,
                           mode=_MODE.value)
  print(f"dir_a: {argv[1]}\nn_a: {result['n_a']}\ndir_b: {argv[2]}\nn_b: {result['n_b']}")
  for key in ("features", "weights_sha1", "resolution", "resize", "mode"):
    print(f"{key}: {result[key]}")
  for warning in result["warnings"]:
    print(f"warning: {warning}")
  for key in ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage"):
    if key in result:
      print(f"{key}: {result[key]:.6g}")


if __name__ == "__main__":
  app.run(main)
