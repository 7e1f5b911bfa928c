"""Downstream classifier: metrics vs scikit-learn, DenseNet-121 size, a separable toy task."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import networks


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("absent_class", [False, True])
def test_metrics_match_sklearn(absent_class):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, 300)
  preds = np.where(rng.random(300) < 0.5, labels, rng.integers(0, 6, 300))
  preds[preds == 5] = 4  # Class 5 is never predicted: F1 = 0.
  if absent_class:
    labels[labels == 3] = 2  # Class 3 has no test samples (but is still predicted).
  groups = {"head": [0, 1], "medium": [2, 3], "tail": [4, 5]}
  m = classifier.classification_metrics(labels, preds, 6, groups)
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
  assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
  f1 = skm.f1_score(labels, preds, average=None, labels=range(6), zero_division=0)
  recall = skm.recall_score(labels, preds, average=None, labels=range(6), zero_division=0)
  np.testing.assert_allclose(list(m["per_class_f1"].values()), f1)
  assert m["nonzero_f1_classes"] == int(np.sum(f1 > 0))
  for g, members in groups.items():
    mask = np.isin(labels, members)
    present = [c for c in members if np.any(labels == c)]
    assert m["groups"][g]["accuracy"] == pytest.approx(skm.accuracy_score(labels[mask],
                                                                          preds[mask]))
    assert m["groups"][g]["macro_f1"] == pytest.approx(f1[members].mean())
    assert m["groups"][g]["balanced_accuracy"] == pytest.approx(recall[present].mean())


def test_densenet121_parameter_count():
  """torchvision's densenet121 (1000 classes) has 7,978,856 parameters."""
  model = networks.densenet(1000, **networks.DENSENET121)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  params = nn.unbox(shapes["params"])
  assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 7_978_856
  leaves = jax.tree.leaves(shapes["params"], is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert all(isinstance(l, nn.Partitioned) for l in leaves)  # Logical axis names everywhere.


def _toy(rng, n):
  """Three classes: a bright band at the top, middle or bottom (flip-invariant), plus noise."""
  labels = rng.integers(0, 3, n)
  images = rng.normal(0, 0.3, (n, 16, 16, 1))
  for i, c in enumerate(labels):
    images[i, 5 * c:5 * c + 5] += 1.0
  return np.clip(images, -1, 1).astype(np.float32), labels


def test_learns_separable_toy_with_extra_source():
  rng = np.random.default_rng(0)
  x, y = _toy(rng, 400)
  x_test, y_test = _toy(rng, 150)
  model = networks.densenet(3, growth_rate=4, block_config=(1, 1), num_init_features=8,
                            small_input=True)
  # Half the data comes in through the `extra` hook (as synthetic images would).
  clf = classifier.train(model, x[:200], y[:200], steps=60, batch_size=32, learning_rate=3e-3,
                         seed=0, extra=(x[200:], y[200:]), extra_fraction=0.5)
  logits = clf.logits(x_test, batch_size=64)
  acc = classifier.classification_metrics(y_test, logits.argmax(-1), 3)["accuracy"]
  assert acc > 0.8, acc  # Chance is 1/3.
  feats = clf.features(x_test, batch_size=64)
  assert feats.shape == (150, clf.feature_dim)
  np.testing.assert_allclose(clf.head_logits(feats), logits, rtol=1e-4, atol=1e-4)


def test_bad_input():
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    networks.to_model_input(np.full((1, 4, 4, 1), 3.0))
  with pytest.raises(ValueError, match="labels"):
    classifier.classification_metrics(np.array([0, 7]), np.array([0, 1]), 3)
  model = networks.densenet(3, **networks.TINY)
  with pytest.raises(ValueError, match="labels must lie"):
    classifier.train(model, np.zeros((2, 8, 8, 1)), np.array([0, 5]), steps=1)
