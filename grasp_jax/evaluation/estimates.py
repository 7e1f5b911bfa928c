"""Metrics of one sample set as estimates {value, lo, hi}: the point value with a 95% bootstrap
interval over images (grasp_jax.evaluation.intervals), in a form that resampling cannot bias.

* FD: rows of both sets resampled (within class, so per-class counts stay fixed).
* KID: the unbiased MMD^2 of the whole sets; a bootstrap replicate drops the pairs of copies of
  one image from the U-statistic (they are not independent pairs), computed from the kernel
  matrices and the resampling counts.
* Precision and density are means over the samples of per-sample values given the real set,
  recall and coverage means over the real images of per-image values given the sample set
  (`prdc_rows`); each is resampled over its own rows only, so no k-NN radius is ever computed on
  duplicated rows. Conditional accuracy and the memorisation rate are per-sample means too.
* IRS: its own likelihood-ratio interval (metrics.irs).

`per_row` values also serve the paired run-vs-run comparison (grasp_jax.evaluation.compare).
"""
import numpy as np

from grasp_jax.evaluation import intervals
from grasp_jax.evaluation import metrics

PRDC = ("precision", "recall", "density", "coverage")


def _estimate(out):
  return {"value": out["value"], "lo": out["lo"], "hi": out["hi"]}


def _nan():
  return {"value": float("nan"), "lo": float("nan"), "hi": float("nan")}


def mean(values, labels, *, n_boot, seed=0):
  """Mean of per-row values [N] (e.g. 0/1 correct) with a class-stratified bootstrap interval."""
  values = np.asarray(values, np.float64)
  if not len(values):
    return _nan()
  return _estimate(intervals.bootstrap(np.mean, [values], strata=[labels], n_boot=n_boot,
                                       seed=seed))


def fd(real, real_y, fake, fake_y, *, n_boot, seed=0):
  """Fréchet distance of the two feature sets (NaN below 2 rows)."""
  if min(len(real), len(fake)) < 2:
    return _nan()
  return _estimate(intervals.bootstrap(metrics.fid, [real, fake], strata=[real_y, fake_y],
                                       n_boot=n_boot, seed=seed))


def _kernel(x, y):
  return (x @ y.T / x.shape[1] + 1.0)**3  # metrics.mmd2_unbiased's cubic kernel.


def _u_mean(gram, counts):
  """Mean of gram[i, j] over ordered pairs of resampled rows that are copies of distinct rows."""
  total = counts @ gram @ counts - np.sum(counts**2 * np.diag(gram))
  return total / (counts.sum()**2 - np.sum(counts**2))


def kid_fn(real, fake):
  """fn(real_rows, fake_rows) -> the unbiased MMD^2 (KID's kernel) of the rows given as indices
  (repeats allowed) into `real` and `fake`; pairs of copies of one row are left out of the
  U-statistics. With every row once it is metrics.mmd2_unbiased."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  k_rr, k_ff, k_rf = _kernel(real, real), _kernel(fake, fake), _kernel(real, fake)

  def mmd2(ir, jf):
    cr = np.bincount(ir, minlength=len(real)).astype(np.float64)
    cf = np.bincount(jf, minlength=len(fake)).astype(np.float64)
    if np.sum(cr > 0) < 2 or np.sum(cf > 0) < 2:
      return float("nan")
    return float(_u_mean(k_rr, cr) + _u_mean(k_ff, cf)
                 - 2.0 * (cr @ k_rf @ cf) / (cr.sum() * cf.sum()))
  return mmd2


def kid(real, real_y, fake, fake_y, *, n_boot, seed=0):
  """Unbiased MMD^2 (KID's kernel) of the whole sets; bootstrap without tied pairs (NaN below 2
  rows)."""
  if min(len(real), len(fake)) < 2:
    return _nan()
  return _estimate(intervals.bootstrap(kid_fn(real, fake),
                                       [np.arange(len(real)), np.arange(len(fake))],
                                       strata=[real_y, fake_y], n_boot=n_boot, seed=seed))


PRDC_K = 5  # Nearest neighbours of the PRDC balls (metrics.prdc's default).


def prdc_rows(real, fake, k=PRDC_K):
  """Per-row terms of metrics.prdc: {"precision", "density"}: [N_fake] (a sample inside some
  real k-NN ball; the number of real balls holding it / k), {"recall", "coverage"}: [N_real] (a
  real image inside some sample's k-NN ball; its own ball holding a sample)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  # pylint: disable=protected-access
  real_radii, fake_radii = metrics._knn_radii(real, k), metrics._knn_radii(fake, k)
  d = metrics._distances(real, fake)
  # pylint: enable=protected-access
  inside = d < real_radii[:, None]
  return {"precision": inside.any(axis=0).astype(np.float64),
          "density": inside.sum(axis=0) / k,
          "recall": (d < fake_radii[None, :]).any(axis=1).astype(np.float64),
          "coverage": (d.min(axis=1) < real_radii).astype(np.float64)}


def prdc(real, real_y, fake, fake_y, *, n_boot, seed=0, k=5):
  """{precision, recall, density, coverage: estimate} (NaN with k or fewer rows on a side)."""
  if min(len(real), len(fake)) <= k:
    return {m: _nan() for m in PRDC}
  rows = prdc_rows(real, fake, k)
  return {m: mean(rows[m], fake_y if m in ("precision", "density") else real_y,
                  n_boot=n_boot, seed=seed) for m in PRDC}


def memorization_rows(reference_distance, sample_distance, percentile=5.0):
  """(per-sample 0/1 [N], threshold): a sample's nearest-training-image distance is below the
  `percentile`-th percentile of the reference (held-out real) images' ones; the mean of the rows
  is metrics.memorization_rate from precomputed distances."""
  threshold = float(np.percentile(reference_distance, percentile))
  return (np.asarray(sample_distance) < threshold).astype(np.float64), threshold
