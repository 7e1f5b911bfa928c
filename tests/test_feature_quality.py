"""Synthetic-feature quality measures vs independent references (scipy, torch, Python loops)."""
import numpy as np
import pytest
from scipy.spatial import distance
import torch

from grasp_jax.feature_ddpm import quality


@pytest.fixture(scope="module")
def sets():
  rng = np.random.default_rng(0)
  return rng.normal(size=(40, 5)), rng.normal(0.5, 1.5, size=(30, 5))


def test_diversity(sets):
  x, _ = sets
  assert quality.mean_pairwise_distance(x) == pytest.approx(distance.pdist(x).mean(), rel=1e-10)
  centroid = x.mean(0)
  assert quality.spread(x) == pytest.approx(
      np.mean([np.linalg.norm(r - centroid) for r in x]), rel=1e-10)


def test_gaussian_kl_matches_torch(sets):
  x, y = sets
  ridge = 1e-3

  def fit(a):
    cov = np.cov(a, rowvar=False)
    cov += ridge * np.trace(cov) / a.shape[1] * np.eye(a.shape[1])
    return torch.distributions.MultivariateNormal(torch.tensor(a.mean(0)), torch.tensor(cov))

  ref = float(torch.distributions.kl_divergence(fit(x), fit(y)))
  assert quality.gaussian_kl(x, y, ridge=ridge) == pytest.approx(ref, rel=1e-8)
  assert quality.gaussian_kl(x, x) == pytest.approx(0.0, abs=1e-10)


def test_mmd_rbf_matches_loop(sets):
  x, y = sets
  pooled = np.concatenate([x, y])
  sigma = np.median(distance.pdist(pooled))
  assert quality.median_bandwidth(x, y) == pytest.approx(sigma, rel=1e-10)
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))
  n, m = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(a, b) for a in x for b in y) / (n * m)
  assert quality.mmd2_rbf(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-8)


def test_bad_input():
  with pytest.raises(ValueError, match="N >= 2"):
    quality.mean_pairwise_distance(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="NaN"):
    quality.spread(np.array([[np.nan, 1.0]]))
