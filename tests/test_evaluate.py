"""The evaluation loop on a tiny experiment: results.json per class and per group equals direct
metric computations on independently decoded real images, earlier results are kept, and the
domain classifier is cached.

Data: fashion_mnist_lt/small built from fabricated IDX files, images at 16 px. The generator is
a stand-in epsilon model (cheap to compile); Inception runs in one call on 4 images.
"""
import dataclasses
import json
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

import fixtures_data as fx
from configs import common
from grasp_jax import generate
from grasp_jax import partition as partition_lib
from grasp_jax.data import pipeline
from grasp_jax.diffusion import schedules
from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import evaluate
from grasp_jax.evaluation import features
from grasp_jax.evaluation import metrics

SIZE, PER_CLASS = 16, 6
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot")


class Conditioner:
  def lookup(self, prompts):
    pooled = np.stack([np.full(4, (len(p) % 11) / 11.0 - 0.5, np.float32) for p in prompts])
    return {"context": pooled[:, None, :], "pooled": pooled}


class EpsModel(nn.Module):
  @nn.compact
  def __call__(self, x, t, context, cluster_ids=None):
    t = t.astype(jnp.float32)[:, None, None, None]
    return (0.8 * jnp.cos(t / 1000) * x + 0.4 * context.mean(axis=(1, 2))[:, None, None, None]
            + 0.1 * cluster_ids[:, None, None, None])


@dataclasses.dataclass(eq=False)
class FakeExperiment:
  config: object
  builder: object
  partition: object
  module: nn.Module = EpsModel()
  schedule: object = schedules.ddpm_schedule("linear", 1000)
  conditioner: Conditioner = Conditioner()
  base_hash: str = "fake"

  def __post_init__(self):
    self.null_cond = {k: v[0] for k, v in self.conditioner.lookup([""]).items()}


class Writer:
  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def write_images(self, step, images):
    self.images[step] = dict(images)

  def flush(self):
    pass


def make_config():
  c = common.base_config()
  c.data.name, c.data.config, c.data.eval_split = "fashion_mnist_lt", "small", "test"
  c.data.image_size, c.data.channels = SIZE, 1
  c.sample.sampler, c.sample.steps, c.sample.guidance_scale = "ddim", 3, 2.0
  c.sample.per_class, c.sample.batch_size = PER_CLASS, 32
  c.eval.real_per_class, c.eval.inception, c.eval.classifier_steps = PER_CLASS, False, 2
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One evaluation at step 1 (samples generated inside) in a fresh workdir."""
  root = tmp_path_factory.mktemp("evaluate")
  fx.make_fmnist_dir(root / "idx", [620] + [110] * 9, 60)
  old = os.environ.get("FMNIST_DIR")
  os.environ["FMNIST_DIR"] = os.fspath(root / "idx")
  try:
    builder = pipeline.load_builder("fashion_mnist_lt/small", os.fspath(root / "data"), build=True)
  finally:
    if old is None:
      del os.environ["FMNIST_DIR"]
    else:
      os.environ["FMNIST_DIR"] = old
  names, counts = pipeline.dataset_class_counts(builder, "train")
  part = partition_lib.build_partition(names, counts, strategy="healthy", healthy="T-shirt/top")
  exp = FakeExperiment(make_config(), builder, part)
  workdir, writer = os.fspath(root / "work"), Writer()
  rng = jax.random.key(7)
  results = evaluate.evaluate(exp, {}, {}, workdir, writer, 1, rng=rng)
  fake, fake_y = generate.sample_classes(exp, {}, {}, None, PER_CLASS, rng)
  return dict(exp=exp, workdir=workdir, writer=writer, results=results, fake=fake,
              fake_y=fake_y, builder=builder, counts=counts)


def real_images(builder, per_class, classes=range(10)):
  """First `per_class` test images of each class, via TFDS' own decoder and PIL."""
  source = builder.as_data_source(split="test")
  images, labels = [], []
  for c in classes:
    taken = 0
    for i in range(len(source)):
      record = source[i]
      if record["label"] == c and taken < per_class:
        image = PIL.Image.fromarray(record["image"][..., 0]).resize(
            (SIZE, SIZE), PIL.Image.Resampling.BICUBIC)
        images.append(np.asarray(image)[..., None])
        labels.append(c)
        taken += 1
  return np.stack(images), np.asarray(labels)


def domain_classifier(results):
  path = results["domain"]["features"]["file"]
  with open(path, "rb") as f:
    data = f.read()
  model = classifier.densenet(10, **classifier.TINY)
  return classifier.Classifier(model, flax.serialization.msgpack_restore(data))


def assert_close(got, expected):
  if expected is None or not np.isfinite(expected):
    assert got is None
  else:
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_feature_metrics_per_class_and_group(run):
  results = run["results"]
  real, real_y = real_images(run["builder"], PER_CLASS)
  fake, fake_y = run["fake"], run["fake_y"]
  clf = domain_classifier(results)
  rf, ff = clf.features(real), clf.features(fake)
  block = results["domain"]
  # Classes ordered head to tail by training count.
  assert list(block["classes"]) == [NAMES[i] for i in np.argsort(-run["counts"], kind="stable")]
  tail = list(np.argsort(run["counts"], kind="stable")[:3])  # 3 rarest of 10 (terciles)
  cases = {f"class {NAMES[c]}": (block["classes"][NAMES[c]], [c]) for c in range(10)}
  cases["frequency/tail"] = (block["groups"]["frequency/tail"], tail)
  cases["cluster/findings"] = (block["groups"]["cluster/findings"], list(range(1, 10)))
  cases["all"] = (block["all"], list(range(10)))
  for name, (entry, members) in cases.items():
    r, f = rf[np.isin(real_y, members)], ff[np.isin(fake_y, members)]
    assert (entry["n_real"], entry["n_fake"]) == (len(r), len(f)), name
    assert_close(entry["fid"], metrics.fid(r, f))
    assert_close(entry["kid"], metrics.kid(r, f)[0])
    for key, value in metrics.prdc(r, f).items():
      assert_close(entry[key], value)
    assert_close(entry["vendi"], metrics.vendi_score(f))
  assert sorted(block["groups"]["frequency/tail"]["classes"]) == sorted(NAMES[c] for c in tail)
  assert block["groups"]["cluster/healthy"]["classes"] == ["T-shirt/top"]
  assert block["features"]["resolution"] == SIZE and len(block["features"]["weights_sha1"]) == 40

  preds = clf.predict(fake)
  for c in (0, 9):
    entry = results["ms_ssim"]["classes"][NAMES[c]]
    assert_close(entry["ms_ssim"], metrics.mean_pairwise_ms_ssim(fake[fake_y == c]))
    assert_close(entry["ms_ssim_real"], metrics.mean_pairwise_ms_ssim(real[real_y == c]))
    acc = results["domain_accuracy"]["classes"][NAMES[c]]
    assert_close(acc["accuracy"], np.mean(preds[fake_y == c] == c))
  tail_ms = [metrics.mean_pairwise_ms_ssim(fake[fake_y == c]) for c in tail]
  assert_close(results["ms_ssim"]["groups"]["frequency/tail"]["ms_ssim"], np.mean(tail_ms))


def test_downstream_synthetic_only_matches_direct_training(run):
  down = run["results"]["downstream"]
  real, real_y = real_images(run["builder"], PER_CLASS)
  clf = classifier.train(classifier.densenet(10, **classifier.TINY), run["fake"], run["fake_y"],
                         steps=2, batch_size=64, seed=0)
  expected = classifier.classification_metrics(real_y, clf.predict(real), 10, class_names=NAMES)
  for key in ("macro_f1", "balanced_accuracy", "nonzero_f1_classes"):
    assert_close(down["synthetic"][key], expected[key])
  assert down["synthetic"]["per_class_f1"] == pytest.approx(expected["per_class_f1"])
  assert down["real"]["n_train_real"] == sum(run["counts"])  # The whole train split.
  assert down["real+synthetic"]["n_train_synthetic"] == 10 * PER_CLASS
  assert set(down["real"]["groups"]) == set(run["results"]["meta"]["groups"])
  # The real-only baseline does not depend on the generator: cached for later evaluations.
  [cached] = os.listdir(os.path.join(run["workdir"], "downstream_real"))
  with open(os.path.join(run["workdir"], "downstream_real", cached)) as f:
    assert json.load(f) == json.loads(json.dumps(down["real"]))


def test_outputs_written(run):
  workdir = run["workdir"]
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["1"]["meta"]["n_fake"] == 10 * PER_CLASS
  assert saved["1"]["meta"]["resolution"] == SIZE
  scalars = run["writer"].scalars[1]
  assert scalars["eval/domain/frequency/tail/fid"] == pytest.approx(
      run["results"]["domain"]["groups"]["frequency/tail"]["fid"])
  assert "eval/downstream/real+synthetic/macro_f1" in scalars
  plots = os.listdir(os.path.join(workdir, "plots", "step_000001"))
  assert {"fid_domain.png", "coverage.png", "samples.png", "downstream_f1.png"} <= set(plots)
  assert run["writer"].images[1]["eval_plots/samples"].ndim == 4


def test_second_evaluation_keeps_earlier_results_and_cached_classifier(run):
  exp = run["exp"]
  config = make_config()
  config.eval.inception, config.eval.real_per_class = True, 2
  with config.unlocked():
    config.eval.downstream = False
  exp2 = dataclasses.replace(exp, config=config)
  keep = np.flatnonzero(run["fake_y"] == 1)[:2]
  fake, fake_y = run["fake"][keep], run["fake_y"][keep]
  file = run["results"]["domain"]["features"]["file"]
  mtime = os.stat(file).st_mtime_ns
  results = evaluate.evaluate(exp2, {}, {}, run["workdir"], Writer(), 2, rng=jax.random.key(0),
                              samples=(fake, fake_y))
  assert os.stat(file).st_mtime_ns == mtime  # Restored, not retrained.
  assert results["domain"]["features"]["weights_sha1"] == \
      run["results"]["domain"]["features"]["weights_sha1"]
  with open(os.path.join(run["workdir"], "results.json")) as f:
    saved = json.load(f)
  assert set(saved) == {"1", "2"}
  assert saved["1"] == json.loads(json.dumps(run["results"]))
  real, _ = real_images(run["builder"], 2, classes=[1])
  inception = features.load_inception()
  entry = results["inception"]["classes"]["Trouser"]
  assert (entry["n_real"], entry["n_fake"]) == (2, 2)
  assert_close(entry["fid"], metrics.fid(inception(real), inception(fake)))
  assert results["inception"]["features"]["weights_sha1"] == features.INCEPTION_SHA1
  assert "downstream" not in results and list(results["domain"]["classes"]) == ["Trouser"]
