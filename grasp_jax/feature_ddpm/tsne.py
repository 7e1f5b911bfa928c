"""t-SNE plot of real vs synthetic features (scikit-learn TSNE, matplotlib Agg), as a PNG."""
import io

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import PIL.Image
from sklearn import manifold


def plot(path, real, real_labels, synthetic, synthetic_labels, class_names, *,
         max_per_class: int = 150, seed: int = 0) -> np.ndarray:
  """Embeds both sets jointly in 2-D, writes a PNG to `path` and returns it as uint8 [H, W, 3].

  Real features are dots, synthetic ones crosses, one colour per class; each set is subsampled
  to `max_per_class` points per class.
  """
  rng = np.random.default_rng(seed)

  def take(x, y):
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max_per_class]
                           for c in np.unique(y)]) if len(y) else np.zeros(0, int)
    return np.asarray(x)[keep], np.asarray(y)[keep]

  real, real_labels = take(real, np.asarray(real_labels))
  synthetic, synthetic_labels = take(synthetic, np.asarray(synthetic_labels))
  points = np.concatenate([real, synthetic]).astype(np.float64)
  if len(points) < 5:
    raise ValueError(f"t-SNE needs at least 5 points, got {len(points)}")
  perplexity = min(30.0, (len(points) - 1) / 3)
  xy = manifold.TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
  xy_real, xy_syn = xy[:len(real)], xy[len(real):]

  fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
  cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for c, name in enumerate(class_names):
    colour = cmap(c % cmap.N)
    r, s = xy_real[real_labels == c], xy_syn[synthetic_labels == c]
    if len(s):  # Crosses first, so the real points stay visible on top.
      ax.scatter(s[:, 0], s[:, 1], s=18, color=colour, marker="x", alpha=0.6, zorder=1,
                 label=f"{name} (synthetic)")
    if len(r):
      ax.scatter(r[:, 0], r[:, 1], s=6, color=colour, alpha=0.7, zorder=2, label=name)
  ax.set_title("t-SNE of encoder features: real (dots) vs synthetic (crosses)")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  fig.savefig(path)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
