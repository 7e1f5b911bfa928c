"""IRS and memorisation rate against exact rational arithmetic, brute-force loops, simulation."""
from fractions import Fraction
import functools
import math

import numpy as np
import pytest

from grasp_jax.evaluation import metrics


@functools.lru_cache(maxsize=None)
def _stirling2(n, k):
  """Exact S(n, k) by the recurrence S(n, k) = k S(n-1, k) + S(n-1, k-1)."""
  if n == k:
    return 1
  if not n or not k:
    return 0
  return k * _stirling2(n - 1, k) + _stirling2(n - 1, k - 1)


def _occupancy_probability(k, s, n):
  """Exact P(k distinct | s items, n uniform draws) = S(n, k) s! / (s - k)! / s^n."""
  if k > s:
    return Fraction(0)
  return Fraction(_stirling2(n, k) * math.perm(s, k), s**n)


def test_occupancy_probabilities_sum_to_one():
  # Validates the formula the MLE maximises (and the exact reference used below).
  for s in (1, 2, 5, 13):
    for n in (1, 3, 8, 15):
      assert sum(_occupancy_probability(k, s, n) for k in range(n + 1)) == 1


def test_occupancy_probability_matches_enumeration():
  s, n = 4, 5
  counts = np.bincount([len(set(draw)) for draw in np.ndindex(*(s,) * n)], minlength=n + 1)
  for k in range(n + 1):
    assert _occupancy_probability(k, s, n) == Fraction(int(counts[k]), s**n)


@pytest.mark.parametrize("n,n_max", [(2, 9), (6, 30), (12, 40), (15, 15)])
def test_occupancy_mle_matches_exact_argmax(n, n_max):
  for k in range(1, min(n, n_max) + 1):
    probs = [_occupancy_probability(k, s, n) for s in range(k, n_max + 1)]
    # Unimodal: the exact ratios P(s + 1) / P(s) cross 1 at most once, downwards.
    rises = [b > a for a, b in zip(probs, probs[1:])]
    assert rises == sorted(rises, reverse=True)
    expected = n_max if k == n else k + probs.index(max(probs))
    s_hat, lo, hi = metrics.occupancy_mle(k, n, n_max)
    assert s_hat == expected, (k, n, n_max)
    assert lo <= s_hat <= hi


def _exact_mle_by_bisection(k, n, n_max):
  # P(s + 1) > P(s)  <=>  s^n > (s + 1 - k) (s + 1)^(n - 1), in exact integers; unimodal in s.
  lo, hi = k, n_max
  while lo < hi:
    mid = (lo + hi) // 2
    if mid**n > (mid + 1 - k) * (mid + 1)**(n - 1):
      lo = mid + 1
    else:
      hi = mid
  return lo


@pytest.mark.parametrize("k,n,n_max", [(4000, 5000, 100_000), (700, 3000, 50_000),
                                       (9000, 9100, 100_000), (29, 30, 100_000)])
def test_occupancy_mle_exact_at_large_n(k, n, n_max):
  assert metrics.occupancy_mle(k, n, n_max)[0] == _exact_mle_by_bisection(k, n, n_max)


def test_occupancy_mle_simulation_and_interval_coverage():
  rng = np.random.default_rng(0)
  s_true, n_max, n = 200, 1000, 300
  estimates, covered = [], 0
  for _ in range(200):
    k = len(np.unique(rng.integers(0, s_true, n)))
    s_hat, lo, hi = metrics.occupancy_mle(k, n, n_max)
    estimates.append(s_hat)
    covered += lo <= s_true <= hi
  assert abs(np.mean(estimates) / s_true - 1) < 0.03
  assert 0.9 <= covered / 200 <= 0.99
  # A 50% interval must cover far less often: the interval is not trivially wide.
  covered_50 = sum(lo <= s_true <= hi for lo, hi in (
      metrics.occupancy_mle(len(np.unique(rng.integers(0, s_true, n))), n, n_max, 0.5)[1:]
      for _ in range(200)))
  assert 0.35 <= covered_50 / 200 <= 0.65


def test_occupancy_mle_edge_cases():
  assert metrics.occupancy_mle(7, 7, 50)[0] == 50  # No collision: unbounded, s_hat = N.
  assert metrics.occupancy_mle(1, 1, 50)[0] == 50
  assert metrics.occupancy_mle(1, 10, 50)[0] == 1
  with pytest.raises(ValueError, match="k=0"):
    metrics.occupancy_mle(0, 5, 10)


def test_nearest_neighbours_matches_loop():
  rng = np.random.default_rng(1)
  train, query = rng.normal(size=(57, 6)), rng.normal(size=(23, 6))
  index, distance = metrics.nearest_neighbours(train, query, batch_size=5)
  for i, q in enumerate(query):
    d = [np.linalg.norm(q - t) for t in train]
    assert index[i] == int(np.argmin(d))
    np.testing.assert_allclose(distance[i], min(d), rtol=1e-9)


def test_irs_counts_distinct_retrievals():
  rng = np.random.default_rng(2)
  train = rng.normal(size=(500, 8))
  picks = rng.integers(0, 40, 120)  # Samples near training images 0..39 only.
  samples = train[picks] + 1e-3 * rng.normal(size=(120, 8))
  out = metrics.irs(train, samples)
  k = len(np.unique(picks))
  s_hat = metrics.occupancy_mle(k, 120, 500)[0]
  assert (out["k"], out["n"], out["n_train"], out["s_hat"]) == (k, 120, 500, s_hat)
  assert out["irs"] == s_hat / 500 and out["retrieved"] == k / 500
  assert abs(s_hat - 40) <= 5 and out["irs_lo"] <= 40 / 500 <= out["irs_hi"]
  # Distinct nearest images for every sample: no collision, s_hat = N.
  assert metrics.irs(train, train[:30] + 1e-3)["irs"] == 1.0


def test_irs_rejects_empty_samples():
  with pytest.raises(ValueError, match="sample_features"):
    metrics.irs(np.zeros((5, 3)), np.zeros((0, 3)))


def test_memorization_rate():
  rng = np.random.default_rng(3)
  train, test = rng.normal(size=(400, 5)), rng.normal(size=(400, 5))
  copies = train[rng.integers(0, 400, 200)] + 1e-4 * rng.normal(size=(200, 5))
  fresh = rng.normal(size=(2000, 5))
  assert metrics.memorization_rate(train, test, copies)["rate"] == 1.0
  out = metrics.memorization_rate(train, test, fresh, percentile=10.0)
  assert abs(out["rate"] - 0.10) < 0.03 and out["n"] == 2000 and out["n_test"] == 400
  # Per-sample loop reference.
  nearest = lambda x: np.linalg.norm(train - x, axis=1).min()
  threshold = np.percentile([nearest(x) for x in test], 10.0)
  np.testing.assert_allclose(out["threshold"], threshold, rtol=1e-9)
  assert out["rate"] == np.mean([nearest(x) < threshold for x in fresh])
