"""The evaluation loop: quality, diversity and usefulness of samples per class and per group.

`evaluate(exp, params, extra, workdir, writer, step, rng=...)` generates config.sample.per_class
samples of every class (config.sample.classes restricts them) and compares them with
config.eval.real_per_class real images per class of config.data.eval_split, decoded and resized
exactly as in training. It reports, per class, per group and over all classes:

  inception  FID, KID, precision/recall/density/coverage (k=5), Vendi on FID-Inception pool3
             features (when config.eval.inception)
  domain     the same on the domain classifier's penultimate features
  ms_ssim    intra-class mean pairwise MS-SSIM of the samples (and of the real images); a
             group's value is the mean over its classes (pairs never mix classes)
  domain_accuracy   the domain classifier's accuracy on the samples (and on the real images)
  downstream a fresh classifier trained on real (the train split; computed once and cached),
             real + synthetic (half of every batch) and synthetic images only, tested on the real
             eval images: macro-F1, balanced accuracy, per-class F1, classes with nonzero F1

Groups (`eval_groups`): `cluster/<name>` for every partition cluster, and `frequency/<name>`:
the partition's own clusters when they are frequency groups (head/medium*/tail/healthy), else
head/medium/tail terciles of the classes by training count (grasp_jax.partition's `frequency`
strategy with k=3).

The domain classifier (DenseNet family, grasp_jax.evaluation.classifier) is trained once on the
*train* split, class-balanced by repeating or subsampling to config.eval.domain_per_class images
per class (default 1000; the eval split stays unseen), and cached as
CACHE/domain_classifier/<hash of its config>.msgpack (CACHE: config.eval.cache_dir, default
WORKDIR; a study shares one across runs). Every metric block records its N, the
resolution and the feature weights' sha1; the step's `meta` records the sampler settings and a
sha256 of the evaluated parameters.

Outputs: WORKDIR/results.json ({step: results}, merged with earlier steps), CLU scalars
`eval/<block>/<group>/<metric>`, and plots (metrics per class ordered head to tail, a sample
grid) as WORKDIR/plots/step_<step>/<name>.png and TensorBoard images `eval_plots/<name>`.
Optional config fields read with defaults: eval.domain_per_class (1000), eval.train_per_class
(0 = all train images are loaded for the downstream classifier), eval.classifier_batch_size (64),
eval.downstream (True; False skips the three downstream classifiers), eval.cache_dir ('').
"""
import functools
import hashlib
import json
import math
import os
import re
import time

from absl import logging
import flax.serialization
import jax
import numpy as np
import tensorflow_datasets as tfds

from grasp_jax import generate
from grasp_jax import partition as partition_lib
from grasp_jax.data import pipeline
from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import features
from grasp_jax.evaluation import metrics
from grasp_jax.evaluation import plots

FEATURE_METRICS = ("fid", "kid", "prdc", "vendi")
SCALAR_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage", "vendi")
_FREQUENCY_NAMES = re.compile(r"head|medium(_\d+)?|tail|healthy")


# ---------------------------------------------------------------------------------------------
# Groups and data.

def eval_groups(part):
  """{'cluster/<name>': class indices, 'frequency/<name>': class indices} (module docstring)."""
  groups = {f"cluster/{name}": [i for i, c in enumerate(part.class_to_cluster) if c == k]
            for k, name in enumerate(part.cluster_names)}
  if all(_FREQUENCY_NAMES.fullmatch(n) for n in part.cluster_names):
    freq = part
  else:
    freq = partition_lib.build_partition(part.class_names, part.class_counts,
                                         strategy="frequency", k=min(3, part.num_classes))
  for k, name in enumerate(freq.cluster_names):
    groups[f"frequency/{name}"] = [i for i, c in enumerate(freq.class_to_cluster) if c == k]
  return groups


def head_to_tail(part, classes):
  """`classes` ordered by training count, most frequent first (ties: lower index first)."""
  counts = np.asarray(part.class_counts)
  return sorted(classes, key=lambda i: (-counts[i], i))


def load_split_images(builder, split, classes, per_class, image_size, channels):
  """(uint8 images [N, H, W, C], labels [N]): the first `per_class` records (0: all) of each
  class in record order, decoded and resized as the training pipeline does."""
  label, _ = pipeline.dataset_labels(builder, split)
  chosen = []
  for c in classes:
    idx = np.flatnonzero(label == c)
    chosen.append(idx[:per_class] if per_class else idx)
  chosen = np.concatenate(chosen).astype(np.int64)
  source = builder.as_data_source(split=split,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  load = pipeline.LoadExample(source, np.zeros(len(source), np.int32), image_size, channels)
  images = np.stack([generate.to_uint8(load(int(i))["image"]) for i in chosen]) if len(chosen) \
      else np.zeros((0, image_size, image_size, channels), np.uint8)
  return images, label[chosen]


# ---------------------------------------------------------------------------------------------
# Classifiers.

def classifier_model(num_classes, image_size):
  """The CPU-sized DenseNet up to 64 px, DenseNet-121 above."""
  arch = classifier.TINY if image_size <= 64 else classifier.DENSENET121
  return classifier.densenet(num_classes, **arch), arch


def _balanced(images, labels, per_class, seed):
  """Each class repeated or subsampled to `per_class` images (deterministic)."""
  rng = np.random.default_rng(seed)
  idx = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    reps = rng.permutation(np.tile(members, -(-per_class // len(members))))
    idx.append(reps[:per_class])
  idx = np.concatenate(idx)
  return images[idx], labels[idx]


_DOMAIN = {}  # cache file -> (Classifier, its msgpack bytes)


def _cache_dir(config, workdir):
  return config.eval.get("cache_dir", "") or workdir


def domain_classifier(exp, workdir, train_images, train_labels):
  """The domain classifier trained on the balanced train images, cached in the workdir.

  Returns (Classifier, info) with info naming the cache file and its weights' sha1.
  """
  c = exp.config
  num_classes = exp.partition.num_classes
  model, arch = classifier_model(num_classes, c.data.image_size)
  per_class = int(c.eval.get("domain_per_class", 1000))
  batch_size = int(c.eval.get("classifier_batch_size", 64))
  spec = {"dataset": c.data.name, "config": c.data.config, "split": c.data.train_split,
          "image_size": c.data.image_size, "channels": c.data.channels, "classes": num_classes,
          "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
          "steps": int(c.eval.classifier_steps), "batch_size": batch_size,
          "per_class": per_class, "train_per_class": int(c.eval.get("train_per_class", 0)),
          "n_train": int(len(train_labels)), "seed": int(c.seed)}
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(_cache_dir(c, workdir), "domain_classifier", f"{key}.msgpack")
  if path in _DOMAIN:  # Same process: keep its compiled forward pass too.
    clf, data = _DOMAIN[path]
  elif os.path.exists(path):
    with open(path, "rb") as f:
      data = f.read()
    clf = classifier.Classifier(model, flax.serialization.msgpack_restore(data))
    logging.info("domain classifier restored from %s", path)
  else:
    images, labels = _balanced(train_images, train_labels, per_class, c.seed)
    start = time.perf_counter()
    clf = classifier.train(model, images, labels, steps=spec["steps"], batch_size=batch_size,
                           seed=c.seed, prefix="domain_classifier")
    logging.info("domain classifier trained in %.1f s", time.perf_counter() - start)
    data = flax.serialization.msgpack_serialize(jax.device_get(clf.variables))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(f"{path}.tmp", "wb") as f:
        f.write(data)
      os.replace(f"{path}.tmp", path)
      with open(path.replace(".msgpack", ".json"), "w") as f:
        json.dump(spec, f, indent=1, sort_keys=True)
  _DOMAIN[path] = (clf, data)
  info = {"features": "domain_densenet_penultimate", "weights_sha1": hashlib.sha1(data).hexdigest(),
          "resolution": c.data.image_size, "resize": "as training", "file": path, "train": spec}
  return clf, info


_REAL_INCEPTION = {}  # sha1 of the real images -> features: evaluations of one process share them


def _real_inception(real):
  key = hashlib.sha1(real.tobytes()).hexdigest()
  if key not in _REAL_INCEPTION:
    _REAL_INCEPTION[key] = _inception()(real)
  return _REAL_INCEPTION[key]


@functools.lru_cache(maxsize=1)
def _inception():
  return features.load_inception()


# ---------------------------------------------------------------------------------------------
# Metric blocks.

def _named(result, names, order):
  """by_group's class/group keys (indices) -> names; classes in `order` (head to tail)."""
  out = {"classes": {names[c]: result["classes"][c] for c in order if c in result["classes"]}}
  out["groups"] = {g: {**e, "classes": [names[c] for c in e["classes"]]}
                   for g, e in result["groups"].items()}
  out["all"] = result["all"]
  return out


def feature_block(real_f, real_y, fake_f, fake_y, groups, order, names, info):
  """FID/KID/PRDC/Vendi per class, per group and overall on one feature space."""
  result = metrics.by_group(real_f, real_y, fake_f, fake_y, groups, metrics=FEATURE_METRICS)
  return {"features": info, **_named(result, names, order)}


def _mean(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else math.nan


def ms_ssim_block(real, real_y, fake, fake_y, groups, order, names):
  """Intra-class mean pairwise MS-SSIM; groups and 'all' average their classes. NaN below 2
  images or below the 11-px SSIM window."""
  def value(images):
    if len(images) < 2 or min(images.shape[1:3]) < 11:
      return math.nan
    return metrics.mean_pairwise_ms_ssim(images)
  per_class = {c: {"n_fake": int(np.sum(fake_y == c)), "ms_ssim": value(fake[fake_y == c]),
                   "n_real": int(np.sum(real_y == c)), "ms_ssim_real": value(real[real_y == c])}
               for c in order}
  def pooled(members):
    members = [c for c in members if c in per_class]
    return {"classes": [names[c] for c in members],
            "ms_ssim": _mean([per_class[c]["ms_ssim"] for c in members]),
            "ms_ssim_real": _mean([per_class[c]["ms_ssim_real"] for c in members])}
  return {"resolution": int(fake.shape[1]), "max_val": 255,
          "classes": {names[c]: v for c, v in per_class.items()},
          "groups": {g: pooled(m) for g, m in groups.items()}, "all": pooled(order)}


def accuracy_block(pred_real, real_y, pred_fake, fake_y, groups, order, names, info):
  """The domain classifier's accuracy on the samples (and the real images) of each class."""
  def entry(members):
    f, r = np.isin(fake_y, members), np.isin(real_y, members)
    return {"n_fake": int(f.sum()),
            "accuracy": float(np.mean(pred_fake[f] == fake_y[f])) if f.any() else math.nan,
            "n_real": int(r.sum()),
            "accuracy_real": float(np.mean(pred_real[r] == real_y[r])) if r.any() else math.nan}
  return {"classifier": info, "classes": {names[c]: entry([c]) for c in order},
          "groups": {g: {"classes": [names[c] for c in m], **entry(m)} for g, m in groups.items()},
          "all": entry(order)}


def downstream_block(exp, workdir, train, fake, fake_y, test, test_y, groups):
  """Classifiers trained on real, real + synthetic and synthetic images, tested on real ones.

  The real-only baseline does not depend on the generator: it is computed once and cached as
  CACHE/downstream_real/<hash of its config>.json.
  """
  c = exp.config
  names = exp.partition.class_names
  num_classes = len(names)
  batch_size = int(c.eval.get("classifier_batch_size", 64))
  steps = int(c.eval.classifier_steps)
  _, arch = classifier_model(num_classes, c.data.image_size)
  arch = {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}
  out = {"test": {"split": c.data.eval_split, "n": int(len(test_y))}}
  spec = {"dataset": c.data.name, "config": c.data.config, "train_split": c.data.train_split,
          "eval_split": c.data.eval_split, "image_size": c.data.image_size,
          "channels": c.data.channels, "arch": arch, "steps": steps, "batch_size": batch_size,
          "seed": int(c.seed), "n_train": int(len(train[1])),
          "test": np.bincount(test_y, minlength=num_classes).tolist(), "groups": groups}
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
  cached = os.path.join(_cache_dir(c, workdir), "downstream_real", f"{key}.json")
  runs = {"real": (train, None), "real+synthetic": (train, (fake, fake_y)),
          "synthetic": ((fake, fake_y), None)}
  for variant, ((images, labels), extra) in runs.items():
    if variant == "real" and os.path.exists(cached):
      with open(cached) as f:
        out[variant] = json.load(f)
      continue
    start = time.perf_counter()
    clf = classifier.train(classifier_model(num_classes, c.data.image_size)[0], images, labels,
                           steps=steps, batch_size=batch_size, seed=c.seed, extra=extra,
                           prefix=f"downstream/{variant}")
    logging.info("downstream classifier (%s) trained in %.1f s", variant,
                 time.perf_counter() - start)
    result = classifier.classification_metrics(test_y, clf.predict(test), num_classes, groups,
                                               names)
    out[variant] = jsonable({
        "n_train_real": int(len(labels)) if variant != "synthetic" else 0,
        "n_train_synthetic": int(len(fake_y)) if variant != "real" else 0,
        "arch": arch, "steps": steps, **result})
    if variant == "real" and jax.process_index() == 0:
      os.makedirs(os.path.dirname(cached), exist_ok=True)
      with open(f"{cached}.tmp", "w") as f:
        json.dump(out[variant], f)
      os.replace(f"{cached}.tmp", cached)
  return out


# ---------------------------------------------------------------------------------------------
# Outputs.

def jsonable(tree):
  """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
  if isinstance(tree, dict):
    return {str(k): jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in (tree.tolist() if isinstance(tree, np.ndarray) else tree)]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if math.isfinite(tree) else None
  if isinstance(tree, (np.integer, np.bool_)):
    return tree.item()
  return tree


def update_results(path, step, results):
  """results.json[str(step)] = results, keeping every other key; written atomically."""
  data = {}
  if os.path.exists(path):
    with open(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start afresh") from e
  data[str(step)] = jsonable(results)
  with open(f"{path}.tmp", "w") as f:
    json.dump(data, f, indent=1)
  os.replace(f"{path}.tmp", path)
  return data


def scalars(results):
  """The CLU scalars of one evaluation (finite values only)."""
  out = {}
  for space in ("inception", "domain"):
    if space in results:
      block = results[space]
      for g, entry in [*block["groups"].items(), ("all", block["all"])]:
        out.update({f"eval/{space}/{g}/{m}": entry[m] for m in SCALAR_METRICS})
  for g, entry in [*results["ms_ssim"]["groups"].items(), ("all", results["ms_ssim"]["all"])]:
    out[f"eval/ms_ssim/{g}"] = entry["ms_ssim"]
  acc = results["domain_accuracy"]
  for g, entry in [*acc["groups"].items(), ("all", acc["all"])]:
    out[f"eval/domain_accuracy/{g}"] = entry["accuracy"]
  for variant in ("real", "real+synthetic", "synthetic") if "downstream" in results else ():
    d = results["downstream"][variant]
    for m in ("macro_f1", "balanced_accuracy", "nonzero_f1_classes"):
      out[f"eval/downstream/{variant}/{m}"] = d[m]
    for g, entry in d["groups"].items():
      out[f"eval/downstream/{variant}/{g}/macro_f1"] = entry["macro_f1"]
  return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def plot_images(results, fake, fake_y, order, names, step):
  """{name: uint8 image}: metrics per class (head to tail) and a labelled sample grid."""
  labels = [names[c] for c in order]
  get = lambda block, key: [block["classes"][n][key] for n in labels]
  out = {}
  for space in ("domain", "inception"):
    if space in results:
      out[f"fid_{space}"] = plots.per_class_bars({space: get(results[space], "fid")}, labels,
                                                 f"FID per class ({space} features), step {step}",
                                                 "FID")
  spaces = [s for s in ("domain", "inception") if s in results]
  for metric in ("coverage", "vendi"):
    out[metric] = plots.per_class_bars({s: get(results[s], metric) for s in spaces}, labels,
                                       f"{metric} per class, step {step}", metric)
  out["ms_ssim"] = plots.per_class_bars(
      {"samples": get(results["ms_ssim"], "ms_ssim"),
       "real": get(results["ms_ssim"], "ms_ssim_real")}, labels,
      f"intra-class MS-SSIM (lower = more diverse), step {step}", "MS-SSIM")
  out["domain_accuracy"] = plots.per_class_bars(
      {"samples": get(results["domain_accuracy"], "accuracy"),
       "real": get(results["domain_accuracy"], "accuracy_real")}, labels,
      f"domain classifier accuracy, step {step}", "accuracy")
  if "downstream" in results:
    down = results["downstream"]
    out["downstream_f1"] = plots.per_class_bars(
        {v: [down[v]["per_class_f1"][n] for n in labels]
         for v in ("real", "real+synthetic", "synthetic")}, labels,
        f"downstream classifier F1 per class, step {step}", "F1")
  out["samples"] = plots.labelled_class_grid(fake, fake_y, order, names,
                                             title=f"samples, step {step}")
  return out


def params_sha256(params):
  """sha256 over the parameter leaves (None when some live on other hosts)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The loop.

def evaluate(exp, params, extra, workdir, writer, step, *, rng, mesh=None, samples=None):
  """Evaluates the model `params` (full tree) at `step`; returns this step's results.

  samples: optional (uint8 images, labels) already generated (e.g. by generate.run_sample);
  otherwise config.sample.per_class per class are generated here, sharded over `mesh`.
  Call it on every process (sampling is SPMD); process 0 writes the files.
  """
  c = exp.config
  part = exp.partition
  names = part.class_names
  groups = eval_groups(part)
  start = time.perf_counter()
  if samples is None:
    fake, fake_y = generate.sample_classes(exp, params, extra, None, c.sample.per_class, rng,
                                           mesh=mesh)
    logging.info("eval: %d samples in %.1f s", len(fake_y), time.perf_counter() - start)
  else:
    fake, fake_y = np.asarray(samples[0]), np.asarray(samples[1], np.int64)
    if fake.dtype != np.uint8 or fake.ndim != 4 or fake_y.shape != (len(fake),):
      raise ValueError(f"samples must be (uint8 images [N, H, W, C], labels [N]), got "
                       f"{fake.dtype} {fake.shape} and labels {fake_y.shape}")
  classes = sorted(set(fake_y.tolist()))
  order = head_to_tail(part, classes)
  size, channels = c.data.image_size, c.data.channels
  real, real_y = load_split_images(exp.builder, c.data.eval_split, classes,
                                   c.eval.real_per_class, size, channels)
  train, train_y = load_split_images(exp.builder, c.data.train_split, range(len(names)),
                                     int(c.eval.get("train_per_class", 0)), size, channels)

  results = {"meta": {
      "step": int(step), "dataset": c.data.name, "dataset_config": c.data.config,
      "eval_split": c.data.eval_split, "train_split": c.data.train_split, "resolution": size,
      "channels": channels, "classes": [names[i] for i in order],
      "n_fake": int(len(fake_y)), "n_real": int(len(real_y)), "n_train": int(len(train_y)),
      "sampler": c.sample.sampler, "sample_steps": int(c.sample.steps),
      "guidance_scale": float(c.sample.guidance_scale), "seed": int(c.seed),
      "params_sha256": params_sha256(params), "base_sha256": exp.base_hash,
      "groups": {g: [names[i] for i in m] for g, m in groups.items()}}}

  clf, clf_info = domain_classifier(exp, workdir, train, train_y)
  both, n = np.concatenate([real, fake]), len(real)  # One batch shape: one compile each.
  feats, preds = clf.features(both), clf.predict(both)
  results["domain"] = feature_block(feats[:n], real_y, feats[n:], fake_y, groups, order, names,
                                    clf_info)
  if c.eval.inception:
    inception = _inception()
    results["inception"] = feature_block(_real_inception(real), real_y, inception(fake), fake_y,
                                         groups, order, names, inception.info())
  results["ms_ssim"] = ms_ssim_block(real, real_y, fake, fake_y, groups, order, names)
  results["domain_accuracy"] = accuracy_block(
      preds[:n], real_y, preds[n:], fake_y, groups, order, names,
      {k: clf_info[k] for k in ("features", "weights_sha1", "file")})
  if c.eval.get("downstream", True):
    results["downstream"] = downstream_block(exp, workdir, (train, train_y), fake, fake_y, real,
                                             real_y, groups)
  results = jsonable(results)
  logging.info("eval at step %d took %.1f s", step, time.perf_counter() - start)

  if jax.process_index() == 0:
    update_results(os.path.join(workdir, "results.json"), step, results)
    images = plot_images(results, fake, fake_y, order, names, step)
    folder = os.path.join(workdir, "plots", f"step_{int(step):06d}")
    for name, image in images.items():
      plots.save_png(os.path.join(folder, f"{name}.png"), image)
    writer.write_scalars(step, scalars(results))
    writer.write_images(step, {f"eval_plots/{k}": v[None] for k, v in images.items()})
    writer.flush()
  return results
