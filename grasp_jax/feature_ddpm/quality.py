"""How synthetic features compare with real ones: diversity, Gaussian KL and RBF-kernel MMD.

All functions take numpy feature sets [N, D] and compute in float64.
"""
import numpy as np


def _check(x, name, min_n=1):
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) < min_n:
    raise ValueError(f"{name}: expected features [N, D] with N >= {min_n}, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}: features contain NaN or inf")
  return x


def _sq_distances(x, y):
  d = np.sum(x**2, 1)[:, None] + np.sum(y**2, 1)[None] - 2 * x @ y.T
  return np.maximum(d, 0.0)


def mean_pairwise_distance(x) -> float:
  """Mean Euclidean distance over all pairs i != j."""
  x = _check(x, "features", 2)
  d = np.sqrt(_sq_distances(x, x))
  n = len(x)
  return float((d.sum() - np.trace(d)) / (n * (n - 1)))


def spread(x) -> float:
  """Mean Euclidean distance to the centroid."""
  x = _check(x, "features")
  return float(np.mean(np.linalg.norm(x - x.mean(0), axis=1)))


def gaussian_kl(p, q, ridge: float = 1e-3) -> float:
  """KL(N_p || N_q) of Gaussians fitted to two feature sets.

  Both covariances get `ridge` times their mean variance added to the diagonal, so the KL is
  finite when N <= D or a dimension is constant.
  """
  p, q = _check(p, "p", 2), _check(q, "q", 2)
  if p.shape[1] != q.shape[1]:
    raise ValueError(f"feature dims differ: {p.shape[1]} vs {q.shape[1]}")
  d = p.shape[1]

  def fit(x):
    cov = np.cov(x, rowvar=False).reshape(d, d)
    return x.mean(0), cov + ridge * max(np.trace(cov) / d, 1e-12) * np.eye(d)

  (m0, s0), (m1, s1) = fit(p), fit(q)
  s1_inv = np.linalg.inv(s1)
  diff = m1 - m0
  _, logdet0 = np.linalg.slogdet(s0)
  _, logdet1 = np.linalg.slogdet(s1)
  return float(0.5 * (np.trace(s1_inv @ s0) + diff @ s1_inv @ diff - d + logdet1 - logdet0))


def median_bandwidth(x, y) -> float:
  """The median heuristic: median Euclidean distance between distinct points of x and y pooled."""
  z = np.concatenate([_check(x, "x"), _check(y, "y")])
  d = np.sqrt(_sq_distances(z, z))
  return float(np.median(d[np.triu_indices(len(z), 1)]))


def mmd2_rbf(x, y, bandwidth: float | None = None) -> float:
  """Unbiased MMD^2 with k(a, b) = exp(-||a - b||^2 / (2 sigma^2)); sigma by median heuristic."""
  x, y = _check(x, "x", 2), _check(y, "y", 2)
  sigma = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
  if sigma <= 0:
    raise ValueError(f"RBF bandwidth must be positive, got {sigma}")
  k = lambda a, b: np.exp(-_sq_distances(a, b) / (2 * sigma**2))
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  n, m = len(x), len(y)
  return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
               + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def per_class_report(real, real_labels, synthetic, synthetic_labels, classes, class_names,
                     max_points: int = 500, seed: int = 0) -> dict:
  """For each synthetic class: diversity (synthetic vs real), KL and MMD to its own real
  features, and MMD to the nearest *other* class's real features (the class-fidelity check:
  own < nearest other), all with the median-heuristic bandwidth of (synthetic, own real).
  Sets are subsampled to `max_points` for the O(N^2) terms."""
  rng = np.random.default_rng(seed)
  real_labels, synthetic_labels = np.asarray(real_labels), np.asarray(synthetic_labels)

  def take(x):
    return x if len(x) <= max_points else x[rng.choice(len(x), max_points, replace=False)]

  real_by_class = {c: take(np.asarray(real)[real_labels == c])
                   for c in np.unique(real_labels)}
  out = {}
  for c in classes:
    syn = take(np.asarray(synthetic)[synthetic_labels == c])
    own = real_by_class.get(c)
    if len(syn) < 2 or own is None or len(own) < 2:
      continue
    sigma = median_bandwidth(syn, own)
    others = {int(o): mmd2_rbf(syn, r, sigma) for o, r in real_by_class.items()
              if o != c and len(r) > 1}
    nearest = min(others, key=others.get) if others else None
    out[class_names[c]] = {
        "num_synthetic": int(np.sum(synthetic_labels == c)),
        "num_real": int(np.sum(real_labels == c)),
        "mean_pairwise_distance": mean_pairwise_distance(syn),
        "real_mean_pairwise_distance": mean_pairwise_distance(own),
        "spread": spread(syn),
        "real_spread": spread(own),
        "kl_real_to_synthetic": gaussian_kl(own, syn),
        "mmd2_own_class": mmd2_rbf(syn, own, sigma),
        "mmd_bandwidth": sigma,
        "mmd2_nearest_other_class": others[nearest] if others else float("nan"),
        "nearest_other_class": class_names[nearest] if others else "",
    }
  return out
