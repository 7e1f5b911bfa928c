"""Cost-sensitive losses and confidence weights vs hand-computed values and PyTorch formulas."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grasp_jax.feature_ddpm import losses


def test_class_balanced_weights_by_hand():
  # beta = 0.5, counts 1, 2, 3: effective numbers (1 - b^n) / (1 - b) = 1, 1.5, 1.75,
  # inverse 1, 2/3, 4/7 (sum 47/21), normalised to sum 3.
  got = losses.class_balanced_weights([1, 2, 3], beta=0.5)
  np.testing.assert_allclose(got, np.array([1, 2 / 3, 4 / 7]) * 3 / (47 / 21), rtol=1e-12)
  # beta = 0.9999 on a long tail: w_c ~ 1/n_c for n << 1/(1-beta).
  w = losses.class_balanced_weights([6000, 108])
  expected = np.array([1e-4 / (1 - 0.9999**6000), 1e-4 / (1 - 0.9999**108)])
  np.testing.assert_allclose(w, expected / expected.sum() * 2, rtol=1e-10)


def test_ldam_margins_by_hand():
  # n^-1/4 for 16, 1, 81: 1/2, 1, 1/3; the largest scaled to 0.5.
  np.testing.assert_allclose(losses.ldam_margins([16, 1, 81], max_m=0.5), [0.25, 0.5, 1 / 6])


def test_log_prior():
  np.testing.assert_allclose(losses.log_prior([1, 3]), np.log([0.25, 0.75]))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3)).astype(np.float32) * 0.5
  labels = np.array([0, 1, 2, 2, 1, 0])
  weights = np.array([1, 1, 0.3, 0.9, 1, 0.5], np.float32)
  return logits, labels, weights


COUNTS = [100, 20, 5]


def _torch_ce(logits, labels, per_sample):
  ce = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels),
                       reduction="none")
  w = torch.tensor(per_sample, dtype=torch.float64)
  return float((w * ce).sum() / w.sum())


def test_cross_entropy_and_cb(batch):
  logits, labels, weights = batch
  got = float(losses.make_loss("ce", COUNTS)(logits, labels, weights, 0))
  assert got == pytest.approx(_torch_ce(logits, labels, weights), rel=1e-5)
  # CB with all-ones sample weights is torch's class-weighted cross-entropy.
  cb = losses.class_balanced_weights(COUNTS)
  ref = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels),
                        weight=torch.tensor(cb))
  got = float(losses.make_loss("cb", COUNTS)(logits, labels, np.ones(6, np.float32), 0))
  assert got == pytest.approx(float(ref), rel=1e-5)


def test_confidence_adaptive_weights(batch):
  """gamma_c^adaptive = gamma_c^CSL * conf: the per-sample weight is gamma_y * conf."""
  logits, labels, conf = batch
  cb = losses.class_balanced_weights(COUNTS)
  got = float(losses.make_loss("cb", COUNTS)(logits, labels, conf, 0))
  assert got == pytest.approx(_torch_ce(logits, labels, cb[labels] * conf), rel=1e-5)


def test_ldam_drw_matches_cao_formula(batch):
  logits, labels, conf = batch
  cosines = np.tanh(logits)  # LDAM works on cosine logits in [-1, 1].
  m = losses.ldam_margins(COUNTS, 0.5)
  cb = losses.class_balanced_weights(COUNTS)
  loss = losses.make_loss("ldam_drw", COUNTS, s=30.0, drw_step=10)

  def cao(per_class_weight):  # Cao et al.'s LDAMLoss.forward, in torch.
    x = torch.tensor(cosines, dtype=torch.float64)
    index = F.one_hot(torch.tensor(labels), 3).bool()
    x_m = x - torch.tensor(m)[torch.tensor(labels)][:, None]
    out = torch.where(index, x_m, x)
    ce = F.cross_entropy(30.0 * out, torch.tensor(labels), reduction="none")
    w = (torch.tensor(per_class_weight)[torch.tensor(labels)]
         * torch.tensor(conf, dtype=torch.float64))
    return float((w * ce).sum() / w.sum())

  assert float(loss(cosines, labels, conf, 9)) == pytest.approx(cao(np.ones(3)), rel=1e-5)
  assert float(loss(cosines, labels, conf, 10)) == pytest.approx(cao(cb), rel=1e-5)


def test_logit_adjustment(batch):
  logits, labels, conf = batch
  prior = np.array(COUNTS) / np.sum(COUNTS)
  got = float(losses.make_loss("logit_adj", COUNTS, tau=1.5)(logits, labels, conf, 0))
  ref = _torch_ce(logits + 1.5 * np.log(prior), labels, conf)
  assert got == pytest.approx(ref, rel=1e-5)


def test_confidences_by_hand():
  protos = np.array([[1.0, 0.0], [0.0, 2.0]])
  feats = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
  np.testing.assert_allclose(losses.cosine_confidence(feats, [0, 1, 1], protos),
                             [1.0, np.sqrt(0.5), 0.0])
  # Centring: relative to (1, 1), feature (3, 1) points along +x like prototype (2, 1).
  np.testing.assert_allclose(
      losses.cosine_confidence([[3.0, 1.0]], [0], [[2.0, 1.0]], center=np.array([1.0, 1.0])), [1.0])
  # Entropy: uniform -> 0, one-hot-like -> ~1, p = (1/2, 1/4, 1/4): H = 1.5 ln 2.
  logits = np.log(np.array([[1, 1, 1], [1e9, 1, 1], [2, 1, 1]], np.float64))
  np.testing.assert_allclose(losses.entropy_confidence(logits),
                             [0.0, 1.0, 1 - 1.5 * np.log(2) / np.log(3)], atol=1e-7)


def test_bad_input():
  with pytest.raises(ValueError, match="unknown loss"):
    losses.make_loss("focal", COUNTS)
  with pytest.raises(ValueError, match="positive"):
    losses.class_balanced_weights([3, 0])
  with pytest.raises(ValueError, match="beta"):
    losses.class_balanced_weights([3, 1], beta=1.0)
