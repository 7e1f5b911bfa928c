"""Bootstrap intervals against known answers: coverage, analytic standard errors, pairing."""
import numpy as np
import pytest

from grasp_jax.evaluation import intervals
from grasp_jax.evaluation import metrics


def _mean(x):
  return float(np.mean(x))


def test_verdict():
  assert intervals.verdict(0.1, 0.5, higher_is_better=True) == "better"
  assert intervals.verdict(0.1, 0.5, higher_is_better=False) == "worse"
  assert intervals.verdict(-0.5, -0.1, higher_is_better=True) == "worse"
  assert intervals.verdict(-0.5, -0.1, higher_is_better=False) == "better"
  assert intervals.verdict(-0.1, 0.1, higher_is_better=True) == "inconclusive"
  assert intervals.verdict(float("nan"), float("nan"), higher_is_better=True) == "inconclusive"


@pytest.mark.parametrize("level,low,high", [(0.95, 0.88, 0.99), (0.5, 0.35, 0.65)])
def test_bootstrap_coverage_of_a_normal_mean(level, low, high):
  rng = np.random.default_rng(0)
  covered = 0
  for rep in range(100):
    x = rng.normal(3.0, 2.0, size=40)
    out = intervals.bootstrap(_mean, (x,), n_boot=200, seed=rep, level=level)
    assert out["value"] == _mean(x) and out["n"] == (40,) and out["lo"] <= out["hi"]
    covered += out["lo"] <= 3.0 <= out["hi"]
  assert low <= covered / 100 <= high


def test_bootstrap_standard_error_matches_formula():
  # The bootstrap SE of a mean is sd(x) sqrt((n - 1) / n) / sqrt(n) (plug-in variance).
  x = np.random.default_rng(1).exponential(size=60)
  out = intervals.bootstrap(_mean, (x,), n_boot=4000, seed=0)
  np.testing.assert_allclose(out["se"], x.std() / np.sqrt(60), rtol=0.05)


def test_bootstrap_many_equals_one_bootstrap_per_name():
  rng = np.random.default_rng(4)
  labels, x = rng.integers(0, 3, 70), rng.normal(size=70)
  stats = lambda y, v: {"mean": float(v.mean()), ("max", 1): float(v[y == 1].max())}
  many = intervals.bootstrap_many(stats, [(labels, x)], n_boot=60, seed=3, level=0.8,
                                  strata=[labels])
  for name in ("mean", ("max", 1)):
    one = intervals.bootstrap(lambda y, v: stats(y, v)[name], [(labels, x)], n_boot=60, seed=3,
                              level=0.8, strata=[labels])
    assert many[name] == {k: one[k] for k in ("value", "lo", "hi")}
  assert many["mean"]["lo"] < many["mean"]["hi"]


def test_paired_group_shares_row_indices():
  x = np.random.default_rng(2).normal(size=(50, 3))
  gap = lambda a, b: float(np.abs(a - b).max())
  paired = intervals.bootstrap(gap, ((x, x.copy()),), n_boot=50)
  assert paired["lo"] == paired["hi"] == 0.0 and paired["n"] == (50,)
  assert intervals.bootstrap(gap, (x, x.copy()), n_boot=50)["lo"] > 0.0  # Independent items.
  with pytest.raises(ValueError, match=r"\[50, 49\]"):
    intervals.bootstrap(gap, ((x, x[:49]),))


def test_strata_keep_label_counts():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, 90)
  x = np.stack([labels, rng.normal(size=90)], axis=1).astype(np.float64)
  count0 = lambda a: float((a[:, 0] == 0).sum())
  fixed = intervals.bootstrap(count0, (x,), n_boot=50, strata=(labels,))
  assert fixed["lo"] == fixed["hi"] == fixed["value"] == (labels == 0).sum()
  free = intervals.bootstrap(count0, (x,), n_boot=50)
  assert free["lo"] < free["hi"]
  out = intervals.paired_difference(count0, None, x, x.copy(), higher_is_better=True,
                                    n_boot=20, strata=(None, labels))
  assert out["lo"] == out["hi"] == 0.0 and out["verdict"] == "inconclusive"


def _shift(reference, x):
  return float(np.mean(x) - np.mean(reference))


def test_paired_difference_detects_a_shift_only_when_paired():
  rng = np.random.default_rng(4)
  reference, z = rng.normal(size=300), rng.normal(size=200)
  a, b = z + 0.05, z  # Same initial noise: a constant shift, well inside the unpaired noise.
  out = intervals.paired_difference(_shift, reference, a, b, higher_is_better=True, n_boot=100)
  np.testing.assert_allclose(out["diff"], 0.05, rtol=1e-9)
  assert out["verdict"] == "better" and out["lo"] > 0.0 and out["n"] == 200
  assert intervals.paired_difference(_shift, reference, a, b, higher_is_better=False,
                                     n_boot=100)["verdict"] == "worse"
  unpaired = intervals.bootstrap(lambda r, x, y: _shift(r, x) - _shift(r, y), (reference, a, b),
                                 n_boot=100)
  assert intervals.verdict(unpaired["lo"], unpaired["hi"], True) == "inconclusive"


def test_paired_difference_with_fid():
  rng = np.random.default_rng(5)
  reference = rng.normal(size=(300, 2))
  good, bad = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 0.5
  same = rng.normal(size=(200, 2))
  run = lambda a, b: intervals.paired_difference(metrics.fid, reference, a, b,
                                                 higher_is_better=False, n_boot=100)
  assert run(good, bad)["verdict"] == "better"
  assert run(bad, good)["verdict"] == "worse"
  assert run(good, same)["verdict"] == "inconclusive"


def _seeded_runs(rng, n_seeds, n, spread):
  """Per-seed samples whose seed offsets dominate the within-seed noise."""
  offsets = rng.normal(0.0, spread, n_seeds)
  return [o + rng.normal(0.0, 0.01, n) for o in offsets]


@pytest.mark.parametrize("within", [True, False])
def test_over_seeds_interval_reflects_seed_variation(within):
  rng = np.random.default_rng(6)
  runs = _seeded_runs(rng, 8, 50, 1.0)
  seed_means = np.array([x.mean() for x in runs])
  out = intervals.over_seeds(_mean, [(x,) for x in runs], n_boot=2000, within=within)
  np.testing.assert_allclose(out["value"], seed_means.mean(), rtol=1e-12)
  assert out["n"] == (400,) and out["n_seeds"] == 8
  # Bootstrap SE of the mean of 8 seed means (the within-seed part is negligible).
  np.testing.assert_allclose(out["se"], seed_means.std() / np.sqrt(8), rtol=0.1)
  pooled = intervals.bootstrap(_mean, (np.concatenate(runs),), n_boot=200)
  assert pooled["se"] < out["se"] / 2  # Ignoring the seeds would be overconfident.


def test_paired_difference_over_matched_seeds():
  rng = np.random.default_rng(7)
  reference = rng.normal(size=100)
  b = _seeded_runs(rng, 5, 60, 1.0)
  a = [x + 0.02 for x in b]  # Same seeds, same noise: a is shifted by 0.02 in every seed.
  out = intervals.paired_difference(_shift, reference, a, b, higher_is_better=True, n_boot=100)
  np.testing.assert_allclose(out["diff"], 0.02, rtol=1e-9)
  assert out["verdict"] == "better" and out["n_seeds"] == 5 and out["n"] == 300
  mismatched = intervals.paired_difference(_shift, reference, a, b[1:] + b[:1],
                                           higher_is_better=True, n_boot=100)
  assert mismatched["verdict"] == "inconclusive"
  with pytest.raises(ValueError, match="matched"):
    intervals.paired_difference(_shift, reference, a, b[:4], higher_is_better=True)


def test_floor_uses_disjoint_halves():
  real = np.arange(100, dtype=np.float64)[:, None] * np.ones((1, 3))
  halves = []

  def overlap(x, y):
    halves.append((x[:, 0], y[:, 0]))
    return float(len(np.intersect1d(x[:, 0], y[:, 0])))

  assert intervals.floor(overlap, real, 40, seed=0) == 0.0
  assert intervals.floor(overlap, real, 50, seed=1) == 0.0
  (x0, y0), (x1, y1) = halves
  assert len(x0) == len(y0) == 40 and len(np.unique(np.concatenate([x1, y1]))) == 100
  assert not np.array_equal(np.sort(x0), np.arange(40))  # Random, not the first rows.
  with pytest.raises(ValueError, match=r"2n = 120 .* got 100"):
    intervals.floor(overlap, real, 60)
