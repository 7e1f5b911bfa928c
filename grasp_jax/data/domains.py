"""Appearance transforms that turn an image set into a different domain, deterministically.

GRASP adapts a base pretrained on a broad source to a new, long-tailed target domain (chest
X-rays in the paper). On the embedded Fashion-MNIST data the target is made by `radiograph`: a
fixed transform suggesting a radiograph, applied per image with a seed derived from the image's
identity, so a build is reproducible bit for bit:

  1. intensity inversion        x -> 1 - x (dark garment on a bright field)
  2. Gaussian blur              sigma `blur_sigma` px (separable, half-sample symmetric borders,
                                radius round(truncate * sigma) as scipy.ndimage)
  3. tone range                 [0, 1] -> [low, high] (a film never reaches pure black or white)
  4. vignette                   times 1 - vignette * (r / r_corner)^2, r from the image centre
  5. grain                      + N(0, grain^2), from numpy default_rng((seed, source, index))
  then clipped to [0, 1] and rounded to uint8.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Radiograph:
  """The target domain's appearance (values in units of the [0, 1] intensity range)."""
  invert: bool = True
  blur_sigma: float = 0.6
  truncate: float = 3.0
  low: float = 0.1
  high: float = 0.9
  vignette: float = 0.4
  grain: float = 0.025
  seed: int = 0


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def _blur(x: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
  """Separable Gaussian blur of [N, H, W] along H and W."""
  if sigma <= 0:
    return x
  k = gaussian_kernel(sigma, truncate)
  r = len(k) // 2
  for axis in (1, 2):
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    x = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return x


def vignette_mask(height: int, width: int, strength: float) -> np.ndarray:
  """1 - strength * (r / r_corner)^2 over pixel centres; 1 at the centre, 1 - strength at corners."""
  y = np.arange(height) - (height - 1) / 2
  x = np.arange(width) - (width - 1) / 2
  r2 = y[:, None] ** 2 + x[None, :] ** 2
  return 1.0 - strength * r2 / r2.max()


def radiograph(images: np.ndarray, source: int, indices: np.ndarray,
               params: Radiograph = Radiograph()) -> np.ndarray:
  """uint8 [N, H, W] -> uint8 [N, H, W] in the target domain.

  source, indices: the images' identity (e.g. 0 for the train file, 1 for the test file, and the
  index in it), which seeds each image's grain: an image looks the same in every build and split.
  """
  images = np.asarray(images)
  indices = np.asarray(indices)
  if images.ndim != 3 or images.dtype != np.uint8 or indices.shape != images.shape[:1]:
    raise ValueError(f"radiograph: expected uint8 [N, H, W] and [N] indices, got {images.dtype} "
                     f"{images.shape} and {indices.shape}")
  p = params
  x = images.astype(np.float64) / 255.0
  if p.invert:
    x = 1.0 - x
  x = _blur(x, p.blur_sigma, p.truncate)
  x = p.low + (p.high - p.low) * x
  x = x * vignette_mask(*images.shape[1:], p.vignette)
  if p.grain > 0:
    noise = np.stack([np.random.default_rng((p.seed, source, int(i))).standard_normal(
        images.shape[1:]) for i in indices]) if len(indices) else 0.0
    x = x + p.grain * noise
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
