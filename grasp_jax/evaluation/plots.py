"""Images for files and TensorBoard: sample grids and per-class metric charts (uint8 arrays).

Everything returns uint8 [H, W, C] arrays, so the same picture goes to a PNG file (`save_png`)
and to a CLU writer (`writer.write_images(step, {name: image[None]})`). Charts draw with
matplotlib's Agg backend only (no display, safe in threads).
"""
import os

import numpy as np
import PIL.Image


def image_grid(images, cols, pad=2, pad_value=255):
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image, row-major;
  missing cells stay `pad_value`."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"image_grid needs uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  cols = max(1, min(cols, n))
  rows = max(1, -(-n // cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def class_rows(images, labels, classes, per_row):
  """A grid with one row per class of `classes` (in that order), up to `per_row` samples each.

  Returns (grid, rows): `rows` are the classes actually drawn (those with samples).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  cells, rows = [], []
  for c in classes:
    chosen = images[labels == c][:per_row]
    if not len(chosen):
      continue
    blank = np.full((per_row - len(chosen),) + images.shape[1:], 255, np.uint8)
    cells.append(np.concatenate([chosen, blank]))
    rows.append(c)
  if not cells:
    raise ValueError("class_rows: none of the classes has a sample")
  return image_grid(np.concatenate(cells), per_row), rows


def _figure(width, height):
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(width, height), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _to_array(fig):
  fig.tight_layout()
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def labelled_class_grid(images, labels, classes, names, per_row=8, title=None):
  """`class_rows` with the class names written left of the rows (RGB uint8)."""
  grid, rows = class_rows(images, labels, classes, per_row)
  h = np.asarray(images).shape[1] + 2
  fig = _figure(2.0 + 0.3 * grid.shape[1] / h, 0.6 + 0.3 * len(rows))
  ax = fig.add_subplot()
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
            interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([2 + h * i + h / 2 - 1 for i in range(len(rows))], [names[c] for c in rows],
                fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  return _to_array(fig)


def per_class_bars(series, names, title, ylabel):
  """Grouped bar chart of per-class values: `series` {legend: [values in `names` order]}.

  Order `names` head -> tail before calling. NaN bars are left out (N too small).
  """
  fig = _figure(2.0 + 0.45 * len(names) * max(1, len(series)) ** 0.5, 3.2)
  ax = fig.add_subplot()
  width = 0.8 / max(1, len(series))
  x = np.arange(len(names))
  for i, (label, values) in enumerate(series.items()):
    values = np.asarray(values, np.float64)
    ax.bar(x + (i - (len(series) - 1) / 2) * width, np.where(np.isfinite(values), values, 0.0),
           width, label=label)
  ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel(ylabel, fontsize=8)
  ax.set_title(title, fontsize=9)
  if len(series) > 1:
    ax.legend(fontsize=7)
  return _to_array(fig)


def save_png(path, image):
  """Writes uint8 [H, W, 1|3] as PNG (creating the folder)."""
  image = np.asarray(image)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
