"""The evaluation stage on a tiny experiment: results.json per class and per group equals direct
metric computations on independently decoded real images in the recorded roles; the roles are
disjoint; the evaluator is cached by content, not by the run's seed; the downstream classifiers
use the stated data; earlier results are kept.

Data: fashion_mnist_lt/small built from fabricated IDX files (50 test images per class), images
at 16 px. The generator is a stand-in epsilon model (cheap to compile).
"""
import dataclasses
import json
import os
import shutil

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

import fixtures_data as fx
from configs import common
from grasp_jax.inference import generate
from grasp_jax import partition as partition_lib
from grasp_jax.data import pipeline
from grasp_jax.diffusion import schedules
from grasp_jax.evaluation import blocks
from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import compare
from grasp_jax.evaluation import evaluator
from grasp_jax.evaluation import inception
from grasp_jax.evaluation import metrics
from grasp_jax.evaluation import networks
from grasp_jax.run import evaluate
import writers

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



def make_config():
  c = common.base_config()
  c.data.name, c.data.config, c.data.eval_split = "fashion_mnist_lt", "small", "test"
  c.data.image_size, c.data.channels = SIZE, 1
  c.sample.sampler, c.sample.steps, c.sample.guidance_scale = "ddim", 3, 2.0
  c.sample.per_class, c.sample.batch_size = PER_CLASS, 32
  c.eval.real_per_class, c.eval.inception = PER_CLASS, False
  c.eval.heldout_per_class = 20  # Of 50 test images per class: 30 train the evaluator.
  c.eval.evaluator_widths, c.eval.evaluator_steps, c.eval.evaluator_batch_size = (4, 8), 2, 16
  c.eval.n_boot = 20
  c.eval.classifier_steps, c.eval.downstream_validate_every = 2, 1
  c.eval.downstream_val_per_class, c.eval.downstream_test_per_class = 5, 10
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
  workdir, writer = os.fspath(root / "work"), writers.MemoryWriter()
  rng = jax.random.key(7)
  results = evaluate.evaluate(exp, {}, {}, workdir, writer, 1, rng=rng)
  fake, fake_y = generate.sample_classes(exp, {}, {}, None, PER_CLASS, rng)
  return dict(exp=exp, workdir=workdir, writer=writer, results=results, fake=fake,
              fake_y=fake_y, builder=builder, counts=counts, root=root)


def decode(builder, split, records):
  """Records of a split via TFDS' own decoder and PIL (not the pipeline's loader)."""
  source = builder.as_data_source(split=split)
  images, labels = [], []
  for i in records:
    record = source[int(i)]
    image = PIL.Image.fromarray(record["image"][..., 0]).resize((SIZE, SIZE),
                                                                PIL.Image.Resampling.BICUBIC)
    images.append(np.asarray(image)[..., None])
    labels.append(record["label"])
  return np.stack(images), np.asarray(labels)


def roles(builder):
  """reference, twin, evaluator-train, downstream val and test records, per the docstring of
  run/evaluate.py, rebuilt from the labels and the split seed (permutation per class)."""
  labels = np.asarray([r["label"] for r in builder.as_data_source(split="test")])
  rng = np.random.default_rng(0)
  out = {k: [] for k in ("reference", "twin", "evaluator", "val", "test", "perm")}
  for c in range(10):
    perm = rng.permutation(np.flatnonzero(labels == c))
    out["perm"].append(perm)
    out["reference"] += list(perm[:PER_CLASS])
    out["twin"] += list(perm[PER_CLASS:2 * PER_CLASS])
    out["evaluator"] += list(perm[20:])
    out["val"] += list(perm[20:25])
    out["test"] += list(perm[25:35])
  return out


def load_evaluator(results):
  with open(results["evaluator"]["file"], "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
  return classifier.Classifier(networks.CNN(10, widths=(4, 8)), variables)


def assert_close(got, expected):
  if expected is None or not np.isfinite(expected):
    assert got is None
  else:
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_roles_are_disjoint_and_sized():
  labels = np.repeat(np.arange(3), [50, 30, 7])
  r = evaluator.roles(labels, 20, seed=0)
  for c, n in ((0, 20), (1, 15), (2, 3)):  # min(heldout_per_class, n_c // 2)
    held, train = r["heldout"][c], r["evaluator"][c]
    assert len(held) == n and len(held) + len(train) == np.sum(labels == c)
    assert not set(held) & set(train) and (labels[np.concatenate([held, train])] == c).all()
  again = evaluator.roles(labels, 20, seed=0)
  assert all(np.array_equal(r["heldout"][c], again["heldout"][c]) for c in range(3))
  other = evaluator.roles(labels, 20, seed=1)
  assert not np.array_equal(r["heldout"][0], other["heldout"][0])


def test_feature_metrics_and_floors_per_class_and_group(run):
  results, builder = run["results"], run["builder"]
  rec = roles(builder)
  real, real_y = decode(builder, "test", rec["reference"])
  twin, twin_y = decode(builder, "test", rec["twin"])
  fake, fake_y = run["fake"], run["fake_y"]
  clf = load_evaluator(results)
  rf, tf, ff = clf.features(real), clf.features(twin), clf.features(fake)
  block = results["domain"]
  # Classes ordered head to tail by training count.
  assert list(block["classes"]) == [NAMES[i] for i in np.argsort(-run["counts"], kind="stable")]
  tail = list(np.argsort(run["counts"], kind="stable")[:3])  # 3 rarest of 10 (terciles)
  cases = {f"class {NAMES[c]}": (block["classes"][NAMES[c]], [c]) for c in (0, 4, 9)}
  cases["frequency/tail"] = (block["groups"]["frequency/tail"], tail)
  cases["all"] = (block["all"], list(range(10)))
  for name, (entry, members) in cases.items():
    r, t, f = rf[np.isin(real_y, members)], tf[np.isin(twin_y, members)], ff[np.isin(fake_y,
                                                                                        members)]
    assert (entry["n_real"], entry["n_fake"], entry["n_twin"]) == (len(r), len(f), len(t)), name
    for e, x in ((entry, f), (entry["floor"], t)):
      assert_close(e["fd"]["value"], metrics.fid(r, x))
      assert_close(e["kid"]["value"], metrics.mmd2_unbiased(r, x))
      for key, value in metrics.prdc(r, x).items():
        assert_close(e[key]["value"], value)
      assert e["fd"]["lo"] <= e["fd"]["hi"]
  assert block["groups"]["cluster/healthy"]["classes"] == ["T-shirt/top"]
  assert block["features"]["weights_sha1"] == results["evaluator"]["weights_sha1"]

  preds, twin_preds = clf.predict(fake), clf.predict(twin)
  acc = results["accuracy"]
  for c in (0, 9):
    entry = acc["classes"][NAMES[c]]
    assert_close(entry["conditional_accuracy"]["value"], np.mean(preds[fake_y == c] == c))
    assert_close(entry["floor"]["conditional_accuracy"]["value"],
                 np.mean(twin_preds[twin_y == c] == c))
  both = np.concatenate([clf.predict(real), twin_preds]), np.concatenate([real_y, twin_y])
  assert_close(acc["all"]["accuracy_real"]["value"], np.mean(both[0] == both[1]))
  assert acc["all"]["accuracy_real"]["n"] == 2 * 10 * PER_CLASS


def test_retrieval_irs_and_memorization(run):
  results, builder = run["results"], run["builder"]
  train, train_y = decode(builder, "train", range(sum(run["counts"])))
  real, real_y = decode(builder, "test", roles(builder)["reference"])
  clf = load_evaluator(results)
  trf, rf, ff = clf.features(train), clf.features(real), clf.features(run["fake"])
  fake_y = run["fake_y"]
  tail = list(np.argsort(run["counts"], kind="stable")[:3])
  for entry, members in ((results["retrieval"]["classes"]["Bag"], [8]),
                         (results["retrieval"]["groups"]["frequency/tail"], tail)):
    f = ff[np.isin(fake_y, members)]
    expected = metrics.irs(trf[np.isin(train_y, members)], f)
    assert entry["irs"]["value"] == expected["irs"] and entry["irs"]["k"] == expected["k"]
    assert entry["irs"]["n_train"] == np.isin(train_y, members).sum()
    mem = metrics.memorization_rate(trf, rf[np.isin(real_y, members)], f)
    assert_close(entry["memorization"]["value"], mem["rate"])
    assert_close(entry["memorization"]["threshold"], mem["threshold"])


def test_evaluator_cached_by_content_not_seed(run):
  exp, results = run["exp"], run["results"]
  record = results["evaluator"]
  assert record["spec"]["roles"]["heldout_per_class"] == 20
  assert record["n_train"] == 10 * 30 and record["n_heldout"] == 10 * 20
  assert record["ok"] is False and record["floor"] == 0.9  # Random images: chance accuracy.
  role = evaluator.roles(pipeline.dataset_labels(run["builder"], "test")[0], 20, 0)
  reseeded = make_config()
  reseeded.seed = 5
  spec = evaluate.evaluator_spec(reseeded, 10, role)
  assert evaluator.cache_path(run["workdir"], spec) == record["file"]
  longer = make_config()
  longer.eval.evaluator_steps = 3
  assert evaluator.cache_path(run["workdir"], evaluate.evaluator_spec(longer, 10, role)) != \
      record["file"]
  assert set(rec_ for rec_ in roles(run["builder"])["evaluator"]) == set(
      np.concatenate(list(role["evaluator"].values())).tolist())


def test_shipped_evaluator_is_used_before_training(run, tmp_path, monkeypatch):
  record = run["results"]["evaluator"]
  shipped = tmp_path / "package" / "domain_classifier"
  shipped.mkdir(parents=True)
  for suffix in (".msgpack", ".json"):
    shutil.copy(record["file"].replace(".msgpack", suffix), shipped)
  monkeypatch.setattr(evaluator, "SHIPPED", str(tmp_path / "package"))
  monkeypatch.setattr(evaluator, "_LOADED", {})

  def must_not_train():
    raise AssertionError("a shipped evaluator was trained again")

  _, got = evaluator.load_or_train(str(tmp_path / "empty_cache"), record["spec"], must_not_train)
  assert got["file"].startswith(str(shipped)) and got["weights_sha1"] == record["weights_sha1"]
  other = {**record["spec"], "train": {**record["spec"]["train"], "steps": 99}}
  with pytest.raises(AssertionError, match="trained again"):  # Another spec is not shipped.
    evaluator.load_or_train(str(tmp_path / "empty_cache"), other, must_not_train)


def test_downstream_uses_the_stated_data(run):
  down = run["results"]["downstream"]
  v = down["variants"]
  n_train = int(sum(run["counts"]))
  assert v["real"]["n_train"] == v["real_balanced"]["n_train"] == n_train
  assert v["real_balanced"]["balanced"] and not v["real"]["balanced"]
  assert v["real+heldout"]["n_train"] == v["real+synthetic"]["n_train"] == n_train + 10 * PER_CLASS
  assert v["real+heldout"]["n_train_per_class"] == v["real+synthetic"]["n_train_per_class"]
  assert v["synthetic"]["n_train_per_class"] == [PER_CLASS] * 10
  assert (down["n_val"], down["n_test"]) == (50, 100)
  rec = roles(run["builder"])
  assert not set(rec["test"]) & set(rec["reference"]) and not set(rec["test"]) & set(rec["val"])
  # The synthetic-only classifier, retrained here on the same data, scores the same.
  test, test_y = decode(run["builder"], "test", rec["test"])
  val = decode(run["builder"], "test", rec["val"])
  clf = classifier.train(networks.densenet(10, **networks.TINY), run["fake"], run["fake_y"],
                         steps=2, batch_size=64, seed=0, validation=val, validate_every=1)
  expected = classifier.classification_metrics(test_y, clf.predict(test), 10, class_names=NAMES)
  for key in ("macro_f1", "balanced_accuracy", "nonzero_f1_classes"):
    assert_close(v["synthetic"][key]["value"], expected[key])
  assert v["synthetic"]["per_class_f1"] == pytest.approx(expected["per_class_f1"])
  # The generator-free classifiers are cached for later evaluations.
  [cached] = os.listdir(os.path.join(run["workdir"], "downstream_real"))
  with open(os.path.join(run["workdir"], "downstream_real", cached)) as f:
    assert set(json.load(f)) == {"real", "real_balanced", "real+heldout"}


def test_shipped_downstream_results_are_used_before_training(run, tmp_path, monkeypatch):
  trained = []  # The variants downstream_block asks to train.
  monkeypatch.setattr(evaluate.downstream, "run", lambda model_fn, sets, *a, **k: (
      trained.append(sorted(sets)) or {n: {"from": str(len(trained))} for n in sets}))
  monkeypatch.setattr(evaluator, "SHIPPED", str(tmp_path / "package"))
  rng = np.random.default_rng(0)
  pair = lambda n: (rng.integers(0, 255, (n, 4, 4, 1), np.uint8), rng.integers(0, 10, n))
  data = [pair(20), pair(10), pair(10), pair(10), pair(10)]  # train, held-out, fake, val, test
  groups = {"frequency/tail": [0, 1]}
  block = lambda workdir, fake: evaluate.downstream_block(
      run["exp"], str(workdir), data[0], data[1], fake, data[3], data[4], groups, 10)
  block(tmp_path / "a", data[2])
  # The first run's cache, shipped: a run on an empty workdir trains only the generator's two.
  shutil.copytree(tmp_path / "a" / "downstream_real", tmp_path / "package" / "downstream_real")
  variants = block(tmp_path / "b", data[2])["variants"]
  assert trained == [sorted(evaluate.downstream.VARIANTS), ["real+synthetic", "synthetic"]]
  assert {n: v["from"] for n, v in variants.items()} == {
      "real": "1", "real_balanced": "1", "real+heldout": "1", "real+synthetic": "2",
      "synthetic": "2"}
  assert not os.path.exists(tmp_path / "b" / "downstream_real")  # Not copied from the package.
  block(tmp_path / "c", pair(10))  # Other samples: the generator-free ones still ship.
  evaluate.downstream_block(run["exp"], str(tmp_path / "d"), pair(20), *data[1:], groups, 10)
  # Other real training images: not shipped, so all five are trained.
  assert trained[2:] == [["real+synthetic", "synthetic"], sorted(evaluate.downstream.VARIANTS)]


def test_outputs_written(run):
  workdir, results = run["workdir"], run["results"]
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["1"]["meta"]["n_fake"] == 10 * PER_CLASS
  assert saved["1"]["meta"]["n_twin"] == 10 * PER_CLASS
  scalars = run["writer"].scalars[1]
  entry = results["domain"]["groups"]["frequency/tail"]
  assert scalars["eval/domain/frequency/tail/fd"] == pytest.approx(entry["fd"]["value"])
  assert scalars["eval/domain/frequency/tail/fd_floor"] == pytest.approx(
      entry["floor"]["fd"]["value"])
  assert "eval/downstream/real+synthetic/macro_f1" in scalars
  plots = os.listdir(os.path.join(workdir, "plots", "step_000001"))
  assert {"fd_domain.png", "conditional_accuracy.png", "samples.png",
          "downstream_f1.png"} <= set(plots)
  samples, reference = compare.load_run(workdir)
  clf = load_evaluator(results)
  np.testing.assert_allclose(samples["features"], clf.features(run["fake"]), rtol=1e-2, atol=1e-2)
  assert samples["features"].dtype == np.float16
  assert np.array_equal(samples["labels"], run["fake_y"])
  assert np.array_equal(reference["records"], roles(run["builder"])["reference"])
  # The same samples paired with themselves: no difference.
  same = compare.paired(workdir, workdir, "fd", "frequency/tail", n_boot=20)
  assert same["diff"] == 0.0 and same["verdict"] == "inconclusive"


def test_second_evaluation_keeps_earlier_results_and_cached_evaluator(run):
  exp = run["exp"]
  config = make_config()
  config.eval.inception, config.eval.downstream = True, False
  exp2 = dataclasses.replace(exp, config=config)
  keep = np.flatnonzero(run["fake_y"] == 1)[:2]
  fake, fake_y = run["fake"][keep], run["fake_y"][keep]
  file = run["results"]["evaluator"]["file"]
  mtime = os.stat(file).st_mtime_ns
  results = evaluate.evaluate(exp2, {}, {}, run["workdir"], writers.MemoryWriter(), 2,
                              rng=jax.random.key(0),
                              samples=(fake, fake_y), real_per_class=2)
  assert os.stat(file).st_mtime_ns == mtime  # Restored, not retrained.
  assert results["evaluator"]["weights_sha1"] == run["results"]["evaluator"]["weights_sha1"]
  with open(os.path.join(run["workdir"], "results.json")) as f:
    saved = json.load(f)
  assert set(saved) == {"1", "2"}
  assert saved["1"] == json.loads(json.dumps(run["results"]))
  real, _ = decode(run["builder"], "test", roles(run["builder"])["perm"][1][:2])
  extractor = inception.load_inception()
  entry = results["inception"]["classes"]["Trouser"]
  assert (entry["n_real"], entry["n_fake"]) == (2, 2)
  assert_close(entry["fd"]["value"], metrics.fid(extractor(real), extractor(fake)))
  assert results["inception"]["features"]["weights_sha1"] == inception.INCEPTION_SHA1
  assert "downstream" not in results and list(results["domain"]["classes"]) == ["Trouser"]


def test_frequency_groups_are_the_datas_whatever_the_runs_partition():
  """Runs of different methods on one dataset are compared on the same classes: the study's
  shared adapter (K = 1) once got other head / medium groups than GRASP's."""
  names = tuple("abcdefghij")
  counts = [1000, 585, 342, 200, 117, 68, 40, 23, 14, 8]
  # By hand: 'a' (healthy) apart, the nine others in thirds by count.
  expected = {"frequency/healthy": [0], "frequency/head": [1, 2, 3],
              "frequency/medium": [4, 5, 6], "frequency/tail": [7, 8, 9]}
  for strategy, k in (("healthy+frequency", 4), ("single", 1), ("class", 10),
                      ("healthy+random", 4), ("frequency", 2)):
    part = partition_lib.build_partition(names, counts, strategy=strategy, k=k, healthy="a")
    groups = blocks.eval_groups(part, "a")
    assert {g: sorted(m) for g, m in groups.items() if g.startswith("frequency/")} == expected
    assert sorted(g for g in groups if g.startswith("cluster/")) == sorted(
        f"cluster/{n}" for n in part.cluster_names)
  # No healthy class in the data: terciles of every class.
  part = partition_lib.build_partition(names[1:], counts[1:], strategy="single", k=1)
  groups = blocks.eval_groups(part, "No Finding")
  assert [sorted(groups[f"frequency/{g}"]) for g in ("head", "medium", "tail")] == [
      [0, 1, 2], [3, 4, 5], [6, 7, 8]]
