"""Sample-quality and diversity metrics on features or images, overall and per class / group.

* `fid`, `frechet_distance`: Fréchet distance of Gaussians fitted to two feature sets.
* `kid`: unbiased KID (cubic polynomial kernel MMD^2) averaged over random subsets.
* `prdc`: precision / recall / density / coverage (Naeem et al., 2020), k-NN balls, Euclidean.
* `vendi_score`: exp(entropy of the eigenvalues of K / n), cosine-similarity kernel.
* `ms_ssim`, `mean_pairwise_ms_ssim`: `tf.image.ssim_multiscale` semantics in JAX; the pairwise
  mean among samples of one class is the usual intra-class diversity measure (lower = diverse).
* `irs`: Image Retrieval Score, the ML estimate of how many training images the samples draw
  from (occupancy likelihood of their distinct nearest training images), / N.
* `memorization_rate`: share of samples closer to the training set than most held-out images.
* `by_group`: any of the above per class, per group of classes (head/medium/tail) and overall.

Feature metrics run in float64 numpy. Every number must be reported with its N (see `by_group`).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _features(x, name):
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or not len(x):
    raise ValueError(f"{name}: expected features [N, D] with N >= 1, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}: features contain NaN or inf")
  return x


# ---------------------------------------------------------------------------------------------
# FID.
#
# Tr sqrtm(S1 S2) is computed as the nuclear norm of A B^T for any factors S1 = A^T A,
# S2 = B^T B: the eigenvalues of A^T A B^T B are the squared singular values of A B^T. This is
# exact for singular covariances (N < D: no eps offset, no imaginary parts) and, with the
# centred data as factors, costs O(N^2 D) instead of an O(D^3) sqrtm.


def _psd_factor(sigma):
  """A with A^T A = sigma (symmetric PSD; tiny negative eigenvalues are rounding, clipped)."""
  w, u = np.linalg.eigh(sigma)
  return (u * np.sqrt(np.clip(w, 0.0, None))).T


def _covariance_factor(x):
  """A with A^T A = cov(x) (ddof 1): the centred data itself when it has fewer rows than D."""
  n, d = x.shape
  if n <= d:
    return (x - x.mean(axis=0)) / math.sqrt(n - 1)
  return _psd_factor(np.cov(x, rowvar=False))


def _trace_sqrt_product(a, b):
  c = a @ b.T
  gram = c @ c.T if c.shape[0] <= c.shape[1] else c.T @ c
  return float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum())


def _frechet(mu1, a, mu2, b):
  trace = np.sum(a * a) + np.sum(b * b)  # Tr S1 + Tr S2
  return float(np.sum((mu1 - mu2)**2) + trace - 2.0 * _trace_sqrt_product(a, b))


def gaussian_stats(features):
  """(mean [D], covariance [D, D]) in float64, ddof 1 as in the standard FID code."""
  x = _features(features, "features")
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) for precomputed (cached) statistics."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  for name, v in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if v.shape != ((d,) if name.startswith("mu") else (d, d)):
      raise ValueError(f"{name} has shape {v.shape}; expected D={d} (mu1 is {mu1.shape})")
  return _frechet(mu1, _psd_factor(sigma1), mu2, _psd_factor(sigma2))


def fid(features_a, features_b):
  """FID between two feature sets [Na, D], [Nb, D] (each N >= 2)."""
  a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
  if a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"fid needs N >= 2 and equal D, got {a.shape} and {b.shape}")
  return _frechet(a.mean(axis=0), _covariance_factor(a), b.mean(axis=0), _covariance_factor(b))


# ---------------------------------------------------------------------------------------------
# KID.


def mmd2_unbiased(x, y):
  """Unbiased MMD^2 with the kernel k(u, v) = (u.v / D + 1)^3 (x and y with m >= 2 rows)."""
  x, y = _features(x, "x"), _features(y, "y")
  d = x.shape[1]
  k_xx = (x @ x.T / d + 1.0)**3
  k_yy = (y @ y.T / d + 1.0)**3
  k_xy = (x @ y.T / d + 1.0)**3
  m, n = len(x), len(y)
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) +
               (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2.0 * k_xy.mean())


def kid(features_a, features_b, n_subsets=100, subset_size=1000, seed=0):
  """KID: MMD^2 over `n_subsets` random subsets (drawn without replacement) of
  min(subset_size, Na, Nb) samples from each set. Returns (mean, std)."""
  a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
  m = min(subset_size, len(a), len(b))
  if m < 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"kid needs >= 2 samples per set and equal D, got {a.shape} and {b.shape}")
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)],
                          b[rng.choice(len(b), m, replace=False)]) for _ in range(n_subsets)]
  return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------
# Precision / recall / density / coverage.


def _distances(x, y):
  sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
  return np.sqrt(np.clip(sq, 0.0, None))


def _knn_radii(x, k):
  d = _distances(x, x)
  np.fill_diagonal(d, 0.0)
  return np.partition(d, k, axis=1)[:, k]  # Index 0 is the point itself.


def prdc(real, fake, k=5):
  """Naeem et al. (2020). Each real sample owns a ball reaching its k-th nearest real neighbour.
  precision: fraction of fakes inside some real ball; recall: fraction of reals inside some fake
  ball (fake k-NN radii); density: mean number of real balls holding a fake, / k; coverage:
  fraction of real balls holding at least one fake. Strict '<', as in the reference code."""
  real, fake = _features(real, "real"), _features(fake, "fake")
  if min(len(real), len(fake)) <= k or real.shape[1] != fake.shape[1]:
    raise ValueError(f"prdc with k={k} needs more than k samples per set and equal D, got "
                     f"{real.shape} and {fake.shape}")
  real_radii = _knn_radii(real, k)
  fake_radii = _knn_radii(fake, k)
  d = _distances(real, fake)  # [Nr, Nf]
  in_real_ball = d < real_radii[:, None]
  return {
      "precision": float(in_real_ball.any(axis=0).mean()),
      "recall": float((d < fake_radii[None, :]).any(axis=1).mean()),
      "density": float(in_real_ball.sum(axis=0).mean() / k),
      "coverage": float((d.min(axis=1) < real_radii).mean()),
  }


# ---------------------------------------------------------------------------------------------
# Retrieval against the training set: IRS and memorisation rate.


def nearest_neighbours(reference, query, batch_size=None):
  """(index [n], Euclidean distance [n]) of each query row's nearest reference row; query rows
  go in batches so the distance block stays ~32 MB whatever the reference size."""
  reference, query = _features(reference, "reference"), _features(query, "query")
  if reference.shape[1] != query.shape[1]:
    raise ValueError(f"reference {reference.shape} and query {query.shape} differ in D")
  batch_size = batch_size or max(1, 2**22 // len(reference))
  index = np.empty(len(query), np.int64)
  distance = np.empty(len(query))
  for start in range(0, len(query), batch_size):
    d = _distances(query[start:start + batch_size], reference)
    rows = slice(start, start + len(d))
    index[rows] = d.argmin(axis=1)
    distance[rows] = d[np.arange(len(d)), index[rows]]
  return index, distance


def occupancy_mle(k, n, n_max, level=0.95):
  """(s_hat, lo, hi): ML number s in [k, n_max] of equally likely items behind n uniform draws
  that hit k distinct ones, and the likelihood-ratio interval {s: 2 (L(s_hat) - L(s)) <= chi2_1}.

  L(s) = log P(k | s, n) = log S(n, k) + log s! - log (s - k)! - n log s (occupancy
  distribution, S the Stirling number of the second kind, constant in s and dropped), exact via
  gammaln for every s at once: O(n_max). L is unimodal in s. With no collision (k == n) L keeps
  increasing (flat for n == 1): the MLE is unbounded above and s_hat = n_max.
  """
  if not 1 <= k <= min(n, n_max):
    raise ValueError(f"occupancy_mle needs 1 <= k <= min(n, n_max), got k={k} n={n} "
                     f"n_max={n_max}")
  s = np.arange(k, n_max + 1, dtype=np.float64)
  log_lik = scipy.special.gammaln(s + 1) - scipy.special.gammaln(s - k + 1) - n * np.log(s)
  best = len(s) - 1 if k == n else int(np.argmax(log_lik))
  chi2_1 = scipy.special.ndtri(0.5 + level / 2)**2  # chi2(1) quantile: a squared normal's.
  inside = np.flatnonzero(2.0 * (log_lik[best] - log_lik) <= chi2_1)
  return k + best, k + int(inside[0]), k + int(inside[-1])


def irs(train_features, sample_features, level=0.95):
  """Image Retrieval Score: s_hat / N, s_hat the ML number of distinct training images the
  generator draws from (`occupancy_mle` of k distinct nearest training images among the n
  samples), N = n_train. Exact in logs, where the reference code (MischaD/IRS) approximates
  S(n, k). No collision (k == n) gives s_hat = N: the samples cannot bound it.

  Returns "irs", its likelihood-ratio interval "irs_lo"/"irs_hi" (the samples are fixed here, so
  this is the interval to use; bootstrapping samples invents collisions), "s_hat", "k", "n",
  "n_train" and "retrieved" = k / N.
  """
  train = _features(train_features, "train_features")
  samples = _features(sample_features, "sample_features")
  index, _ = nearest_neighbours(train, samples)
  k, n, n_train = len(np.unique(index)), len(samples), len(train)
  s_hat, lo, hi = occupancy_mle(k, n, n_train, level)
  return {"irs": s_hat / n_train, "irs_lo": lo / n_train, "irs_hi": hi / n_train, "s_hat": s_hat,
          "k": k, "n": n, "n_train": n_train, "retrieved": k / n_train}


def memorization_rate(train_features, test_features, sample_features, percentile=5.0):
  """Share of samples whose nearest-training-image distance is below the `percentile`-th
  percentile of the held-out test images' ones (so ~percentile / 100 for a generator that does
  not copy, ~1 for one that does). `test_features` must not overlap the training set."""
  train = _features(train_features, "train_features")
  test = _features(test_features, "test_features")
  samples = _features(sample_features, "sample_features")
  threshold = float(np.percentile(nearest_neighbours(train, test)[1], percentile))
  rate = float((nearest_neighbours(train, samples)[1] < threshold).mean())
  return {"rate": rate, "threshold": threshold, "n": len(samples), "n_test": len(test)}


# ---------------------------------------------------------------------------------------------
# Vendi score.


def vendi_score(x):
  """exp(-sum l log l) over the eigenvalues l of K / n, K the cosine similarity of the rows of
  x [n, ...] (features, or images flattened to pixels). All-zero rows stay zero (as the
  reference package's normalisation does). 1 for identical samples, n for orthogonal ones."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  if not len(x):
    raise ValueError("vendi_score needs at least one sample")
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x / np.where(norms > 0, norms, 1.0)
  n = len(x)
  # X X^T and X^T X share their non-zero eigenvalues: use the smaller Gram matrix.
  gram = x @ x.T if n <= x.shape[1] else x.T @ x
  eig = np.linalg.eigvalsh(gram / n)
  eig = eig[eig > 0]
  return float(np.exp(-np.sum(eig * np.log(eig))))


# ---------------------------------------------------------------------------------------------
# MS-SSIM (tf.image.ssim_multiscale semantics, NHWC).


def ms_ssim_num_scales(height, width, filter_size=11, max_scales=len(MS_SSIM_WEIGHTS)):
  """Scales that fit: the coarsest must still be >= filter_size (TF asserts this)."""
  scales = 0
  while scales < max_scales and min(height, width) >= filter_size:
    scales += 1
    height, width = (height + 1) // 2, (width + 1) // 2
  if not scales:
    raise ValueError(f"images of {height}x{width} are smaller than the {filter_size}-pixel "
                     f"SSIM window; pass a smaller filter_size")
  return scales


def _gaussian_window(size, sigma):
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma)**2)
  g /= g.sum()
  return np.outer(g, g).astype(np.float32)


def _ssim_terms(x, y, window, max_val, k1, k2):
  """Per-channel spatial means of (luminance * contrast-structure) and contrast-structure."""
  n, h, w, c = x.shape
  flat = lambda z: z.transpose(0, 3, 1, 2).reshape(n * c, h, w, 1)
  kernel = jnp.asarray(window)[:, :, None, None]
  blur = lambda z: jax.lax.conv_general_dilated(flat(z), kernel, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision=jax.lax.Precision.HIGHEST)
  c1, c2 = (k1 * max_val)**2, (k2 * max_val)**2
  mu_x, mu_y = blur(x), blur(y)
  num0 = 2.0 * mu_x * mu_y
  den0 = mu_x**2 + mu_y**2
  luminance = (num0 + c1) / (den0 + c1)
  cs = (2.0 * blur(x * y) - num0 + c2) / (blur(x * x + y * y) - den0 + c2)
  per_channel = lambda z: z.mean(axis=(1, 2, 3)).reshape(n, c)
  return per_channel(luminance * cs), per_channel(cs)


def _downsample(x):
  # Odd sizes are padded at the end by mirroring (TF's SYMMETRIC), then 2x2 average pooled.
  _, h, w, _ = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="symmetric")
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0


@functools.partial(jax.jit, static_argnames=("max_val", "power_factors", "filter_size",
                                             "filter_sigma", "k1", "k2"))
def _ms_ssim(x, y, max_val, power_factors, filter_size, filter_sigma, k1, k2):
  window = _gaussian_window(filter_size, filter_sigma)
  terms = []
  for scale in range(len(power_factors)):
    if scale:
      x, y = _downsample(x), _downsample(y)
    ssim, cs = _ssim_terms(x, y, window, max_val, k1, k2)
    terms.append(cs)
  terms[-1] = ssim  # The coarsest scale contributes luminance too.
  stacked = jax.nn.relu(jnp.stack(terms, axis=-1))  # [N, C, scales]
  return jnp.prod(stacked**jnp.asarray(power_factors, jnp.float32), axis=-1).mean(axis=-1)


def ms_ssim(images_a, images_b, max_val=255.0, filter_size=11, filter_sigma=1.5, k1=0.01,
            k2=0.03, power_factors=MS_SSIM_WEIGHTS, num_scales=None):
  """MS-SSIM of image pairs [N, H, W, C] -> [N], as `tf.image.ssim_multiscale`.

  Small images: when the coarsest of the 5 scales would be smaller than the window (any side
  < 161 for the default 11-px window), only the first `num_scales = ms_ssim_num_scales(H, W)`
  scales are used, with their weights renormalised to sum to 1 (so the value stays a weighted
  geometric mean; 28x28 -> 2 scales at 28 and 14 px). Pass `num_scales` to fix it explicitly.
  """
  x = jnp.asarray(images_a, jnp.float32)
  y = jnp.asarray(images_b, jnp.float32)
  if x.ndim != 4 or x.shape != y.shape:
    raise ValueError(f"ms_ssim needs two [N, H, W, C] batches of one shape, got "
                     f"{x.shape} and {y.shape}")
  if num_scales is None:
    num_scales = ms_ssim_num_scales(x.shape[1], x.shape[2], filter_size, len(power_factors))
  weights = np.asarray(power_factors[:num_scales], np.float64)
  weights = tuple(float(v) for v in weights / weights.sum())
  return _ms_ssim(x, y, float(max_val), weights, filter_size, float(filter_sigma), k1, k2)


def mean_pairwise_ms_ssim(images, max_pairs=2000, batch_size=250, seed=0, **ms_ssim_kwargs):
  """Mean MS-SSIM over pairs of distinct images [N, H, W, C]: all N(N-1)/2 pairs, or
  `max_pairs` random ones (i != j) when there are more."""
  images = np.asarray(images)
  n = len(images)
  if images.ndim != 4 or n < 2:
    raise ValueError(f"mean_pairwise_ms_ssim needs >= 2 images [N, H, W, C], got {images.shape}")
  if n * (n - 1) // 2 <= max_pairs:
    i, j = np.triu_indices(n, k=1)
  else:
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, max_pairs)
    j = (i + rng.integers(1, n, max_pairs)) % n  # Uniform over the other n - 1 images.
  values = []
  size = min(batch_size, len(i))
  for start in range(0, len(i), size):
    ii, jj = i[start:start + size], j[start:start + size]
    k = len(ii)
    pad = lambda idx: np.concatenate([idx, np.zeros(size - k, idx.dtype)])  # One compile.
    values.append(np.asarray(ms_ssim(images[pad(ii)], images[pad(jj)], **ms_ssim_kwargs))[:k])
  return float(np.concatenate(values).mean())


# ---------------------------------------------------------------------------------------------
# Per class / per group.


def _fid_metric(real, fake):
  return {"fid": fid(real, fake) if min(len(real), len(fake)) >= 2 else math.nan}


def _kid_metric(real, fake):
  if min(len(real), len(fake)) < 2:
    return {"kid": math.nan, "kid_std": math.nan}
  mean, std = kid(real, fake)
  return {"kid": mean, "kid_std": std}


def _prdc_metric(real, fake, k=5):
  if min(len(real), len(fake)) <= k:
    return dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan)
  return prdc(real, fake, k)


def _vendi_metric(real, fake):
  return {"vendi": vendi_score(fake) if len(fake) else math.nan,
          "vendi_real": vendi_score(real) if len(real) else math.nan}


def _ms_ssim_metric(real, fake):
  """Intra-class MS-SSIM; `real`/`fake` are images here, not features."""
  return {"ms_ssim": mean_pairwise_ms_ssim(fake) if len(fake) >= 2 else math.nan,
          "ms_ssim_real": mean_pairwise_ms_ssim(real) if len(real) >= 2 else math.nan}


# name -> fn(real, fake) -> {metric: value}; values are NaN when N is too small for the metric.
METRICS = {"fid": _fid_metric, "kid": _kid_metric, "prdc": _prdc_metric, "vendi": _vendi_metric,
           "ms_ssim": _ms_ssim_metric}


def by_group(features_real, labels_real, features_fake, labels_fake, groups,
             metrics=("fid", "kid", "prdc")):
  """Metrics per class, per group of classes and over all samples.

  Args:
    features_real, features_fake: [N, ...] arrays (features; images for "ms_ssim").
    labels_real, labels_fake: [N] class of each sample.
    groups: {group name: classes}, e.g. {"head": [0, 3], "medium": [...], "tail": [...]}.
    metrics: names from METRICS, or a {name: fn(real, fake) -> dict} mapping.

  Returns:
    {"classes": {class: entry}, "groups": {name: entry}, "all": entry}, each entry holding
    "n_real", "n_fake" and the metric values (NaN where N is too small).
  """
  if not isinstance(metrics, dict):
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
      raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    metrics = {m: METRICS[m] for m in metrics}
  real, fake = np.asarray(features_real), np.asarray(features_fake)
  labels_real, labels_fake = np.asarray(labels_real), np.asarray(labels_fake)
  for name, x, labels in (("real", real, labels_real), ("fake", fake, labels_fake)):
    if labels.shape != (len(x),):
      raise ValueError(f"labels_{name} has shape {labels.shape}; expected ({len(x)},)")

  def entry(classes):
    r = real[np.isin(labels_real, classes)]
    f = fake[np.isin(labels_fake, classes)]
    out = {"n_real": len(r), "n_fake": len(f)}
    for fn in metrics.values():
      out.update(fn(r, f))
    return out

  classes = sorted(set(labels_real.tolist()) | set(labels_fake.tolist()))
  result = {"classes": {c: entry([c]) for c in classes}, "groups": {}, "all": entry(classes)}
  for name, members in groups.items():
    result["groups"][name] = {"classes": list(members), **entry(list(members))}
  return result
