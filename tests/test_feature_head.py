"""Feature heads: mixed class counts by hand; learning, cosine logits and the curriculum switch."""
import jax
import numpy as np
import pytest

from grasp_jax.feature_ddpm import head
from grasp_jax.feature_ddpm import losses


def test_mixed_class_counts_by_hand():
  # Real: 3 x class 0, 1 x class 1 (shares 3/4, 1/4). Synthetic: class 1 with weights 1 and 0.5.
  # f = 0.5: p = 0.5 * (3/4, 1/4) + 0.5 * (0, 1) = (3/8, 5/8); N + M = 6 -> (2.25, 3.75).
  got = head.mixed_class_counts([0, 0, 0, 1], [1, 1], [1.0, 0.5], 0.5, 2)
  np.testing.assert_allclose(got, [2.25, 3.75])


@pytest.fixture(scope="module")
def blobs():
  rng = np.random.default_rng(0)
  means = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
  y = rng.integers(0, 3, 600)
  x = (means[y] + rng.normal(size=(600, 2))).astype(np.float32)
  return x[:400], y[:400], x[400:], y[400:], means


def test_learns_and_normed_logits(blobs):
  x, y, x_test, y_test, _ = blobs
  net = head.FeatureHead(3, normed=True)
  counts = np.bincount(y, minlength=3)
  params = head.train(net, x, y, losses.make_loss("ldam_drw", counts, drw_step=50), steps=150,
                      batch_size=64, learning_rate=0.1, seeds=(0, 1))
  preds = head.predict(net, params, x_test)
  assert preds.shape == (2, len(y_test))
  assert (preds == y_test).mean(axis=1).min() > 0.9
  one = jax.tree.map(lambda a: a[0], params)
  logits = np.asarray(net.apply({"params": one}, x_test))
  assert np.abs(logits).max() <= 1.0 + 1e-6  # Cosines.


def test_curriculum_delays_synthetic_features(blobs):
  """Poisoned synthetic features (class-0 points labelled 2) only hurt once they are injected."""
  x, y, x_test, y_test, means = blobs
  rng = np.random.default_rng(1)
  poison = (means[0] + rng.normal(size=(300, 2))).astype(np.float32)
  synthetic = (poison, np.full(300, 2), np.ones(300))
  net = head.FeatureHead(3)
  loss = losses.make_loss("ce", np.bincount(y, minlength=3))
  class0 = y_test == 0
  recall = {}
  for warmup in (0, 200):
    params = head.train(net, x, y, loss, steps=200, batch_size=64, learning_rate=0.1,
                        synthetic=synthetic, synth_fraction=0.5, warmup_steps=warmup)
    recall[warmup] = (head.predict(net, params, x_test)[0][class0] == 0).mean()
  assert recall[200] > 0.9 and recall[0] < 0.5, recall
