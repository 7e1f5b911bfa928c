"""Pieces of the evaluation protocol against independent references: estimates (per-pair loops,
metrics' own formulas), the paired comparison from saved features, the downstream training sets
and the classifier's early stopping and class-balanced batches."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from grasp_jax.evaluation import augment
from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import compare
from grasp_jax.evaluation import downstream
from grasp_jax.evaluation import estimates
from grasp_jax.evaluation import evaluator
from grasp_jax.evaluation import metrics
from grasp_jax.evaluation import networks
from grasp_jax.run import evaluate


def _kid_loop(x, y, ix, iy):
  """Unbiased MMD^2 of the rows x[ix], y[iy], by a loop over pairs whose source rows differ."""
  k = lambda u, v: (u @ v / x.shape[1] + 1.0)**3
  def within(z, idx):
    values = [k(z[a], z[b]) for p, a in enumerate(idx) for q, b in enumerate(idx)
              if p != q and a != b]
    return np.mean(values)
  return within(x, ix) + within(y, iy) - 2 * np.mean([k(x[a], y[b]) for a in ix for b in iy])


def test_kid_fn_matches_pair_loop_with_and_without_repeats():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1, size=(6, 3))
  fn = estimates.kid_fn(x, y)
  np.testing.assert_allclose(fn(np.arange(7), np.arange(6)), metrics.mmd2_unbiased(x, y))
  ix, iy = np.array([0, 0, 2, 3, 3, 3, 6]), np.array([1, 1, 2, 5, 5, 0])
  np.testing.assert_allclose(fn(ix, iy), _kid_loop(x, y, ix, iy))


def test_prdc_rows_and_memorization_rows_match_metrics():
  rng = np.random.default_rng(1)
  real, fake = rng.normal(size=(40, 4)), rng.normal(0.3, 1.2, size=(30, 4))
  rows = estimates.prdc_rows(real, fake, k=5)
  assert {m: float(np.mean(v)) for m, v in rows.items()} == pytest.approx(
      metrics.prdc(real, fake, k=5))
  assert rows["precision"].shape == (30,) and rows["coverage"].shape == (40,)
  train, test = rng.normal(size=(50, 4)), rng.normal(size=(20, 4))
  fake[:5] = train[:5] + 1e-3  # Copies are memorised.
  d = lambda q: metrics.nearest_neighbours(train, q)[1]
  mem, threshold = estimates.memorization_rows(d(test), d(fake))
  expected = metrics.memorization_rate(train, test, fake)
  assert mem.mean() == pytest.approx(expected["rate"]) and threshold == expected["threshold"]
  assert mem[:5].all()


def test_estimates_value_and_interval():
  rng = np.random.default_rng(2)
  real, fake = rng.normal(size=(60, 3)), rng.normal(1.0, 1, size=(60, 3))
  labels = np.repeat([0, 1], 30)
  out = estimates.fd(real, labels, fake, labels, n_boot=50)
  assert out["value"] == metrics.fid(real, fake) and out["lo"] < out["value"] < out["hi"]
  est = estimates.mean(np.r_[np.ones(30), np.zeros(30)], labels, n_boot=50)
  # Stratified: each class keeps its 30 rows, so the mean never moves.
  assert est == {"value": 0.5, "lo": 0.5, "hi": 0.5}
  assert np.isnan(estimates.kid(real[:1], None, fake, None, n_boot=5)["value"])


def _write_run(workdir, features, labels, pred, nn, reference, seed=0):
  results = {"evaluator": {"weights_sha1": "e" * 40}, "meta": {
      "seed": seed, "class_names": ["a", "b"], "groups": {"frequency/tail": ["b"]}}}
  evaluate.save_features(os.fspath(workdir), 3, results, labels,
                         {"features": features, "pred": pred, "nn_distance": nn}, reference)


def test_paired_comparison_recomputes_from_saved_features(tmp_path):
  rng = np.random.default_rng(3)
  n = 60
  labels = np.repeat([0, 1], n // 2)
  ref = {"features": rng.normal(size=(n, 4)), "labels": labels, "pred": labels,
         "nn_distance": rng.uniform(1, 2, n), "records": np.arange(n)}
  noise = rng.normal(size=(n, 4))  # Shared initial noise: the samples are paired.
  good, bad = noise, noise * 2.0 + 1.5
  _write_run(tmp_path / "a", good, labels, labels, rng.uniform(1, 2, n), ref)
  _write_run(tmp_path / "b", bad, labels, 1 - labels, np.full(n, 0.5), ref)
  f16 = lambda x: x.astype(np.float16).astype(np.float64)
  out = compare.paired(tmp_path / "a", tmp_path / "b", "fd", n_boot=100)
  expected = metrics.fid(f16(ref["features"]), f16(good)) - metrics.fid(f16(ref["features"]),
                                                                         f16(bad))
  assert out["diff"] == pytest.approx(expected) and out["verdict"] == "better"
  assert out["step"] == 3 and out["n"] == n
  tail = compare.paired(tmp_path / "a", tmp_path / "b", "conditional_accuracy", "b", n_boot=100)
  assert tail["diff"] == 1.0 and tail["verdict"] == "better" and tail["n"] == n // 2
  mem = compare.paired(tmp_path / "a", tmp_path / "b", "memorization", "frequency/tail",
                       n_boot=100)
  assert mem["diff"] < 0 and mem["verdict"] == "better"  # b copies: every distance is tiny.
  kid = compare.paired(tmp_path / "a", tmp_path / "b", "kid", n_boot=30)
  assert kid["diff"] == pytest.approx(metrics.mmd2_unbiased(f16(ref["features"]), f16(good))
                                      - metrics.mmd2_unbiased(f16(ref["features"]), f16(bad)))
  _write_run(tmp_path / "c", good, labels, labels, np.ones(n), ref, seed=1)
  with pytest.raises(ValueError, match="seeds 0 and 1 differ"):
    compare.paired(tmp_path / "a", tmp_path / "c", "fd")
  with pytest.raises(ValueError, match="unknown group 'head'"):
    compare.paired(tmp_path / "a", tmp_path / "b", "fd", "head")
  # A group with no more samples than PRDC's k: no k-NN balls, so no verdict (not a crash).
  small = np.repeat([0, 1], [n - 4, 4])
  for name in ("d", "e"):
    _write_run(tmp_path / name, good, small, small, np.ones(n), {**ref, "labels": small})
  few = compare.paired(tmp_path / "d", tmp_path / "e", "coverage", "frequency/tail")
  assert (few["diff"], few["verdict"], few["n"]) == (None, "inconclusive", 4)
  with open(tmp_path / "a" / "eval" / "step_000003" / "features.npz", "rb") as f:
    assert f.read(2) == b"PK"  # A zip: numpy's npz.


def test_downstream_training_sets_counts():
  real = (np.zeros((10, 4, 4, 1), np.uint8), np.array([0] * 8 + [1] * 2))
  held = (np.ones((4, 4, 4, 1), np.uint8), np.array([0, 0, 1, 1]))
  synth = (np.full((4, 4, 4, 1), 2, np.uint8), np.array([0, 0, 1, 1]))
  sets = downstream.training_sets(real, held, synth)
  assert list(sets) == list(downstream.VARIANTS)
  count = lambda v: np.bincount(sets[v][1]).tolist()
  assert count("real") == count("real_balanced") == [8, 2]
  assert sets["real_balanced"][2] and not sets["real"][2]
  assert count("real+heldout") == count("real+synthetic") == [10, 4]
  assert (sets["real+heldout"][0][10:] == 1).all() and (sets["real+synthetic"][0][10:] == 2).all()
  assert count("synthetic") == [2, 2]
  assert list(downstream.training_sets(real, held, None)) == list(downstream.GENERATOR_FREE)


def test_balanced_batches_draw_classes_uniformly():
  labels = np.array([0] * 95 + [1] * 5)
  draw = lambda balanced: np.concatenate(
      [batches() for batches in [classifier._Batches(0, labels, 0, 64, 0.5, balanced)]
       for _ in range(50)])
  assert 0.45 < np.mean(labels[draw(True)] == 1) < 0.55  # Uniform over rows would give 0.05.
  assert np.mean(labels[draw(False)] == 1) < 0.1


def _toy(rng, n):
  labels = rng.integers(0, 3, n)
  images = rng.normal(0, 0.3, (n, 8, 8, 1))
  for i, c in enumerate(labels):
    images[i, 3 * c:3 * c + 2] += 1.0
  return np.clip(images, -1, 1).astype(np.float32), labels


def test_early_stopping_keeps_the_best_validated_weights():
  rng = np.random.default_rng(4)
  x, y = _toy(rng, 120)
  val = _toy(rng, 60)
  model = networks.CNN(3, widths=(4,), convs=1)
  clf = classifier.train(model, x, y, steps=12, batch_size=16, learning_rate=1e-2, seed=0,
                         validation=val, validate_every=3, patience=1)
  h = clf.history
  curve = dict(h["val_macro_f1"])
  assert h["best_val_macro_f1"] == max(curve.values()) and curve[h["best_step"]] == max(
      curve.values())
  # The returned weights are the best step's: their validation macro-F1 is the recorded one.
  preds = clf.predict(val[0])
  f1 = classifier.per_class_f1(val[1], preds, 3)[np.unique(val[1])].mean()
  assert f1 == pytest.approx(h["best_val_macro_f1"])
  # Stopped after one validation without improvement, or ran all steps.
  stops = [s for s, _ in h["val_macro_f1"]]
  assert h["steps_run"] == stops[-1]
  assert h["steps_run"] == 12 or curve[stops[-1]] <= curve[stops[-2]]
  json.dumps(h)  # The record goes into results.json.


def test_perturbations_against_loops():
  x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
  assert np.array_equal(evaluator.perturb(x, "brightness+40"), np.minimum(x.astype(int) + 40, 255))
  blocks = evaluator.perturb(x, "blocks4x4")
  for n in range(3):
    for i in range(8):
      for j in range(8):
        b = x[n, i // 4 * 4:i // 4 * 4 + 4, j // 4 * 4:j // 4 * 4 + 4, 0]
        assert blocks[n, i, j, 0] == np.clip(np.round(b.mean()), 0, 255)
  noisy = evaluator.perturb(np.full((64, 32, 32, 1), 128, np.uint8), "noise_sd20").astype(float)
  assert abs(noisy.std() - 20) < 1 and abs(noisy.mean() - 128) < 1
  with pytest.raises(ValueError, match="unknown perturbation 'blur'"):
    evaluator.perturb(x, "blur")


def test_training_appearance_changes_match_the_measured_perturbations():
  """The evaluator trains on the changes its robustness is measured under (uint8 loops above);
  in [-1, 1] they may differ from the rounded uint8 ones by half a grey level."""
  x = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 1)).astype(np.uint8)
  xf = networks.to_model_input(x)
  noise = np.random.default_rng(2).normal(size=xf.shape).astype(np.float32)
  op = np.array([0, 1, 2, 4])  # none, brightness, noise, the second block size (4)
  amount = np.array([0.0, 40.0, 20.0, 0.0], np.float32)
  out = np.asarray(augment.perturb_appearance(xf, op, amount, noise, (2, 4)))
  grey = lambda v: (v + 1) * 127.5
  tol = 0.5 + 1e-3
  assert np.array_equal(out[0], xf[0])
  assert np.abs(grey(out[1]) - evaluator.perturb(x[1:2], "brightness+40")[0]).max() <= tol
  expected = np.clip(x[2].astype(float) + 20 * noise[2], 0, 255)
  assert np.abs(grey(out[2]) - expected).max() <= 1e-3
  assert np.abs(grey(out[3]) - evaluator.perturb(x[3:4], "blocks4x4")[0]).max() <= tol


def test_random_appearance_changes_half_the_batch_within_the_ranges():
  x = np.random.default_rng(0).uniform(-0.4, 0.4, (600, 8, 8, 1)).astype(np.float32)
  out = np.asarray(augment.random_appearance(x, jax.random.key(0), (50.0, 30.0, (2,))))
  diff = (out - x).reshape(600, -1) * 127.5
  changed = np.abs(diff).max(1) > 1e-3
  assert 0.42 < changed.mean() < 0.58
  shifted = changed & (np.ptp(diff, 1) < 1e-3)
  blocky = changed & np.all(out[:, ::2, ::2] == out[:, 1::2, 1::2], axis=(1, 2, 3))
  noisy = changed & ~shifted & ~blocky
  for kind in (shifted, blocky, noisy):  # one third each of the changed images
    assert 0.2 < kind.sum() / changed.sum() < 0.47
  assert np.abs(diff[shifted]).max() <= 50 + 1e-3
  assert diff[noisy].std(1).max() < 30 * 1.4  # sd <= 30, estimated from 64 pixels
  with pytest.raises(ValueError, match="block sizes that divide"):
    classifier.train(networks.CNN(num_classes=2, widths=(4,), convs=1),
                     np.zeros((2, 6, 6, 1)), np.array([0, 1]), steps=1,
                     appearance=(0, 0, (4,)))


def test_cnn_hidden_features_against_numpy():
  """hidden > 0: features = ReLU(dense(flattened last stage)), here one 3x3 conv-BN-ReLU stage
  computed with loops (BN at its initial running statistics: mean 0, variance 1)."""
  model = networks.CNN(2, widths=(3,), convs=1, hidden=5)
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 1)).astype(np.float32)
  variables = nn.unbox(model.init(jax.random.key(0), x))
  p = jax.tree.map(np.asarray, variables["params"])
  rng = np.random.default_rng(1)  # Nonzero BN scale/bias and dense biases: all of them count.
  bn = {"scale": rng.normal(size=3), "bias": rng.normal(size=3)}
  p["stage0_norm0"] = bn
  p["hidden"]["bias"] = rng.normal(size=5)
  logits, features = model.apply({**variables, "params": p}, x, return_features=True)
  kernel = p["stage0_conv0"]["kernel"]  # [3, 3, 1, 3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = np.zeros((2, 6, 6, 3))
  for i in range(6):
    for j in range(6):
      conv[:, i, j] = np.einsum("nhwc,hwco->no", padded[:, i:i + 3, j:j + 3], kernel)
  stage = np.maximum(conv / np.sqrt(1 + 1e-5) * bn["scale"] + bn["bias"], 0)
  expected = np.maximum(stage.reshape(2, -1) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, expected @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-4, atol=1e-5)
