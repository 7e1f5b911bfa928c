"""Metrics against independent references: closed forms, scipy sqrtm, naive loops, TensorFlow."""
import itertools
import math

import numpy as np
import pytest
import scipy.linalg

from grasp_jax.evaluation import metrics


def _reference_fid(a, b):
  """The textbook computation (pytorch-fid style): scipy sqrtm of S1 S2, eps offset if needed."""
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  return _reference_frechet(mu1, s1, mu2, s2)


def _reference_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  covmean = np.real(covmean)
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(rng, d):
  m = rng.normal(size=(d, d))
  return m @ m.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("n_a,n_b,d", [(300, 250, 16), (10, 12, 64), (9, 100, 32)])
def test_fid_matches_sqrtm_reference(n_a, n_b, d):
  # Full rank, rank deficient (N < D: data factors), and mixed.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n_a, d)) @ rng.normal(size=(d, d))
  b = rng.normal(size=(n_b, d)) @ rng.normal(size=(d, d)) * 0.7 + 0.5
  np.testing.assert_allclose(metrics.fid(a, b), _reference_fid(a, b), rtol=1e-6)
  assert abs(metrics.fid(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(1)
  d = 7
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  v2[0] = 0.0  # A singular covariance is fine.
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(v1) - np.sqrt(v2))**2)
  got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_general_covariances():
  rng = np.random.default_rng(2)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2),
                             _reference_frechet(mu1, s1, mu2, s2), rtol=1e-9)


def test_fid_of_samples_approaches_closed_form():
  rng = np.random.default_rng(3)
  d, n = 3, 200_000
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  a = rng.multivariate_normal(mu1, s1, n)
  b = rng.multivariate_normal(mu2, s2, n)
  np.testing.assert_allclose(metrics.fid(a, b), _reference_frechet(mu1, s1, mu2, s2), rtol=0.02)


def test_gaussian_stats_and_frechet_agree_with_fid():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 1.0
  got = metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
  np.testing.assert_allclose(got, metrics.fid(a, b), rtol=1e-9)


def test_fid_rejects_bad_input():
  with pytest.raises(ValueError, match="features_a"):
    metrics.fid(np.zeros((4,)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.fid(np.zeros((1, 2)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="NaN"):
    metrics.fid(np.full((3, 2), np.nan), np.zeros((4, 2)))


def _naive_mmd2(x, y):
  d = x.shape[1]
  k = lambda u, v: (float(np.dot(u, v)) / d + 1.0)**3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_mmd2_unbiased_matches_double_loop():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(12, 5)), rng.normal(size=(15, 5)) * 1.3 + 0.2
  np.testing.assert_allclose(metrics.mmd2_unbiased(x, y), _naive_mmd2(x, y), rtol=1e-10)


def test_kid_full_subsets_equal_mmd2():
  # With subset_size >= N every subset is a permutation of the whole set.
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4)) + 0.5
  mean, std = metrics.kid(x, y, n_subsets=5, subset_size=100)
  np.testing.assert_allclose(mean, _naive_mmd2(x, y), rtol=1e-10)
  assert std < 1e-10


def test_kid_is_unbiased_on_equal_distributions():
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=(400, 6)), rng.normal(size=(400, 6))
  same, same_std = metrics.kid(x, y, n_subsets=50, subset_size=100)
  shifted, _ = metrics.kid(x, y + 0.5, n_subsets=50, subset_size=100)
  assert abs(same) < 3 * same_std / math.sqrt(50) + 1e-3 and shifted > 20 * abs(same)


def test_prdc_hand_computed_1d():
  # k=1. Real 0, 1, 3, 20 -> NN radii 1, 1, 2, 17. Fake 0.5, 2.6, 10 -> radii 2.1, 2.1, 7.4.
  # precision: 0.5 in ball(0); 2.6 in ball(3); 10 in ball(20) -> 3/3.
  # recall: reals within a fake ball: 0, 1 (of 0.5), 3 (of 2.6); 20 is 10 from 10 > 7.4 -> 3/4.
  # density: 0.5 in balls of 0 and 1; 2.6 in ball(3); 10 in ball(20) -> (2 + 1 + 1) / 3 / k.
  # coverage: nearest fake to each real: 0.5 < 1, 0.5 < 1, 0.4 < 2, 10 < 17 -> 4/4.
  real = np.array([[0.0], [1.0], [3.0], [20.0]])
  fake = np.array([[0.5], [2.6], [10.0]])
  got = metrics.prdc(real, fake, k=1)
  np.testing.assert_allclose([got["precision"], got["recall"], got["density"], got["coverage"]],
                             [1.0, 0.75, 4 / 3, 1.0])


def test_prdc_matches_brute_force():
  rng = np.random.default_rng(8)
  real, fake = rng.normal(size=(30, 2)), rng.normal(size=(25, 2)) * 1.5 + 0.3
  k = 3
  dist = math.dist

  def radius(points, i):
    return sorted(dist(points[i], q) for j, q in enumerate(points) if j != i)[k - 1]

  r_real = [radius(real, i) for i in range(len(real))]
  r_fake = [radius(fake, j) for j in range(len(fake))]
  precision = np.mean([any(dist(r, f) < r_real[i] for i, r in enumerate(real)) for f in fake])
  recall = np.mean([any(dist(r, f) < r_fake[j] for j, f in enumerate(fake)) for r in real])
  density = np.mean([sum(dist(r, f) < r_real[i] for i, r in enumerate(real))
                     for f in fake]) / k
  coverage = np.mean([min(dist(r, f) for f in fake) < r_real[i] for i, r in enumerate(real)])
  got = metrics.prdc(real, fake, k=k)
  np.testing.assert_allclose([got["precision"], got["recall"], got["density"], got["coverage"]],
                             [precision, recall, density, coverage], rtol=1e-12)


def test_vendi_identical_and_orthogonal():
  rng = np.random.default_rng(9)
  v = rng.normal(size=(1, 16))
  np.testing.assert_allclose(metrics.vendi_score(np.repeat(v, 9, 0)), 1.0, rtol=1e-9)
  np.testing.assert_allclose(metrics.vendi_score(np.eye(6, 10) * 3.0), 6.0, rtol=1e-9)
  # More samples than dimensions (the X^T X path): two orthogonal directions, 10 copies each.
  x = np.concatenate([np.tile([1.0, 0, 0], (10, 1)), np.tile([0, 2.0, 0], (10, 1))])
  np.testing.assert_allclose(metrics.vendi_score(x), 2.0, rtol=1e-9)


def test_vendi_matches_brute_force_on_pixels():
  rng = np.random.default_rng(10)
  images = rng.integers(0, 256, (12, 3, 2, 1), dtype=np.uint8)  # 12 samples, 6 pixels.
  flat = images.reshape(12, -1).astype(np.float64)
  k = np.array([[np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for b in flat]
                for a in flat])
  eig = np.clip(np.linalg.eigvals(k / 12).real, 1e-300, None)
  expected = math.exp(-sum(e * math.log(e) for e in eig if e > 1e-12))
  np.testing.assert_allclose(metrics.vendi_score(images), expected, rtol=1e-8)


def test_ms_ssim_num_scales():
  assert metrics.ms_ssim_num_scales(256, 256) == 5
  assert metrics.ms_ssim_num_scales(28, 28) == 2
  assert metrics.ms_ssim_num_scales(161, 200) == 5  # 161 -> 81 -> 41 -> 21 -> 11.
  assert metrics.ms_ssim_num_scales(160, 200) == 4  # 160 -> ... -> 10 < 11.
  with pytest.raises(ValueError, match="smaller filter_size"):
    metrics.ms_ssim_num_scales(8, 8)


@pytest.fixture(scope="module")
def tf():
  tf = pytest.importorskip("tensorflow")
  tf.config.set_visible_devices([], "GPU")
  return tf


@pytest.mark.parametrize("shape", [(3, 181, 200, 3), (4, 28, 28, 1)])
def test_ms_ssim_matches_tensorflow(tf, shape):
  rng = np.random.default_rng(11)
  a = rng.integers(0, 256, shape).astype(np.float32)
  # Correlated pairs (a blurred copy plus noise), so the value is far from 0 and 1.
  b = np.clip(0.5 * a + 0.5 * np.roll(a, 1, axis=2) + rng.normal(0, 20, shape), 0, 255)
  b = b.astype(np.float32)
  scales = metrics.ms_ssim_num_scales(shape[1], shape[2])
  weights = np.array(metrics.MS_SSIM_WEIGHTS[:scales])
  expected = tf.image.ssim_multiscale(a, b, 255.0, power_factors=weights / weights.sum()).numpy()
  got = np.asarray(metrics.ms_ssim(a, b))
  assert 0.05 < expected.min() and expected.max() < 0.95
  np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_allclose(np.asarray(metrics.ms_ssim(a, a)), 1.0, atol=1e-5)


def test_mean_pairwise_ms_ssim_all_pairs():
  rng = np.random.default_rng(12)
  images = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
  images[1] = images[0]
  pairs = list(itertools.combinations(range(5), 2))
  expected = np.mean([float(metrics.ms_ssim(images[i:i + 1], images[j:j + 1])[0])
                      for i, j in pairs])
  got = metrics.mean_pairwise_ms_ssim(images, batch_size=4)  # 10 pairs in padded batches.
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  sampled = metrics.mean_pairwise_ms_ssim(images, max_pairs=6, batch_size=4)
  values = [float(metrics.ms_ssim(images[i:i + 1], images[j:j + 1])[0]) for i, j in pairs]
  assert min(values) <= sampled <= max(values)


def test_by_group_matches_direct_computation():
  rng = np.random.default_rng(13)
  d = 6
  counts_real, counts_fake = {0: 40, 1: 25, 2: 8, 3: 3}, {0: 30, 1: 20, 2: 7, 3: 1}
  make = lambda counts, shift: (
      np.concatenate([rng.normal(size=(n, d)) + c + shift for c, n in counts.items()]),
      np.concatenate([np.full(n, c) for c, n in counts.items()]))
  real, y_real = make(counts_real, 0.0)
  fake, y_fake = make(counts_fake, 0.2)
  groups = {"head": [0], "medium": [1], "tail": [2, 3]}
  out = metrics.by_group(real, y_real, fake, y_fake, groups, metrics=("fid", "prdc", "vendi"))

  assert set(out["classes"]) == {0, 1, 2, 3}
  for c in range(4):
    entry = out["classes"][c]
    assert (entry["n_real"], entry["n_fake"]) == (counts_real[c], counts_fake[c])
  np.testing.assert_allclose(out["classes"][1]["fid"],
                             _reference_fid(real[y_real == 1], fake[y_fake == 1]), rtol=1e-6)
  tail_real, tail_fake = real[y_real >= 2], fake[y_fake >= 2]
  tail = out["groups"]["tail"]
  assert (tail["n_real"], tail["n_fake"], tail["classes"]) == (11, 8, [2, 3])
  np.testing.assert_allclose(tail["fid"], _reference_fid(tail_real, tail_fake), rtol=1e-6)
  assert tail["precision"] == metrics.prdc(tail_real, tail_fake)["precision"]
  np.testing.assert_allclose(out["all"]["fid"], _reference_fid(real, fake), rtol=1e-6)
  assert out["all"]["n_real"] == len(real)
  # Too few samples for the metric: NaN, not an error.
  assert math.isnan(out["classes"][3]["fid"]) and math.isnan(out["classes"][3]["coverage"])
  assert out["classes"][3]["vendi"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="unknown metrics"):
    metrics.by_group(real, y_real, fake, y_fake, groups, metrics=("fdi",))
