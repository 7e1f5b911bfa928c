"""Feature-level tail hallucination, end to end: `run(config, workdir)` (configs/feature_ddpm.py).

  1. encoder phi: a DenseNet trained with cross-entropy on the long-tailed train split (its
     features are cached in WORKDIR/encoder_features.npz, reused while data/encoder/seed match);
  2. memory bank of phi's train features (EMA prototypes, reservoir samples per class);
  3. class-conditional feature DDPM on the bank's (standardised) features;
  4. synthetic features for the classes of `synth.groups`, with confidence weights;
  5. linear heads on real features and on real + synthetic features, for CE and every CSL;
  6. metrics on the test split (overall, per class, head/medium/tail), synthetic-feature quality,
     t-SNE plot; WORKDIR/results.json and CLU summaries.
"""
import json
import os
import time

from absl import logging
from clu import metric_writers
import jax
import numpy as np
import tensorflow_datasets as tfds

from grasp_jax import partition
from grasp_jax.diffusion import schedules
from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import networks
from grasp_jax.feature_ddpm import ddpm
from grasp_jax.feature_ddpm import head as head_lib
from grasp_jax.feature_ddpm import losses
from grasp_jax.feature_ddpm import memory_bank
from grasp_jax.feature_ddpm import quality
from grasp_jax.feature_ddpm import tsne

CACHE = "encoder_features.npz"


def load_split(config, split):
  """(images uint8 [N, H, W, C], labels int [N], class names) of a TFDS split (built if needed)."""
  # Registers the builders (imported here: only this function needs TFDS builders).
  import grasp_jax.data.builders  # pylint: disable=g-import-not-at-top,unused-import
  name = config.data.name + (f"/{config.data.config}" if config.data.config else "")
  builder = tfds.builder(name, data_dir=config.data.data_dir or None)
  builder.download_and_prepare()
  if split not in builder.info.splits:
    raise ValueError(f"config.data: split {split!r} not in {name} "
                     f"(has {sorted(builder.info.splits)})")
  source = builder.as_data_source(split)
  items = source.__getitems__(list(range(len(source))))
  images = np.stack([it["image"] for it in items]).astype(np.uint8)
  labels = np.asarray([it["label"] for it in items], np.int32)
  return images, labels, list(builder.info.features["label"].names)


def class_groups(config, class_names, counts):
  """{group name: [class indices]} from the frequency partition of the train counts."""
  thresholds = ([float(t) for t in config.groups.thresholds.split(",")]
                if config.groups.thresholds else None)
  part = partition.build_partition(class_names, counts, strategy="frequency",
                                   k=None if thresholds else config.groups.k,
                                   thresholds=thresholds)
  return {g: [i for i, cid in enumerate(part.class_to_cluster) if cid == k]
          for k, g in enumerate(part.cluster_names)}


def encoder_network(config, num_classes):
  e = config.encoder
  return networks.densenet(num_classes, growth_rate=e.growth_rate,
                           block_config=tuple(e.block_config),
                           num_init_features=e.num_init_features, bn_size=e.bn_size,
                           small_input=e.small_input, stem_stride=e.stem_stride)


def encode(config, workdir, data, num_classes, groups, class_names, writer):
  """Trains the encoder (or loads the cache): train/test features, its head, its test metrics."""
  fingerprint = json.dumps({"data": config.data.to_dict(), "encoder": config.encoder.to_dict(),
                            "seed": config.seed}, sort_keys=True)
  path = os.path.join(workdir, CACHE)
  if os.path.exists(path):
    with np.load(path) as cache:
      if str(cache["fingerprint"]) == fingerprint:
        logging.info("encoder features from %s", path)
        return ({k: cache[k] for k in ("train", "test", "head_kernel", "head_bias")},
                json.loads(str(cache["metrics"])))
    logging.info("%s was made with another data/encoder config; training again", path)
  train_x, train_y, test_x, test_y = data
  e = config.encoder
  encoder = classifier.train(encoder_network(config, num_classes), train_x, train_y,
                             steps=e.steps, batch_size=e.batch_size,
                             learning_rate=e.learning_rate, seed=config.seed, flip=e.flip,
                             log_every=e.log_every, writer=writer, prefix="encoder")
  metrics = classifier.classification_metrics(test_y, encoder.predict(test_x), num_classes,
                                              groups, class_names)
  head = encoder.variables["params"]["head"]
  out = {"train": encoder.features(train_x), "test": encoder.features(test_x),
         "head_kernel": np.asarray(head["kernel"]), "head_bias": np.asarray(head["bias"])}
  np.savez(path, fingerprint=fingerprint, metrics=json.dumps(metrics), **out)
  return out, metrics


def _average(runs):
  """Mean over seeds of every numeric leaf; `std` of the top-level scalars."""
  def mean(values):
    if isinstance(values[0], dict):
      return {k: mean([v[k] for v in values]) for k in values[0]}
    return float(np.mean(values))
  out = mean(runs)
  out["std"] = {k: float(np.std([r[k] for r in runs])) for k in runs[0]
                if isinstance(runs[0][k], float)}
  out["num_seeds"] = len(runs)
  return out


def _scalars(prefix, metrics):
  out = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
  for g, m in metrics.get("groups", {}).items():
    out.update({f"{prefix}/{g}/{k}": v for k, v in m.items() if isinstance(v, float)})
  return out


def _check_config(config):
  checks = [("synth.confidence", config.synth.confidence, losses.CONFIDENCES),
            ("synth.csl_counts", config.synth.csl_counts, ("mixed", "real")),
            ("ddpm.network", config.ddpm.network, ddpm.NETWORKS)]
  checks += [("head.losses", kind, losses.LOSSES) for kind in config.head.losses]
  for field, value, allowed in checks:
    if value not in allowed:
      raise ValueError(f"config.{field}: {value!r} is not one of {allowed}")


def run(config, workdir):
  """Runs the whole pipeline; returns the results dict also written to WORKDIR/results.json."""
  _check_config(config)
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  start = time.time()

  # Data.
  train_x, train_y, class_names = load_split(config, config.data.train_split)
  test_x, test_y, _ = load_split(config, config.data.eval_split)
  num_classes = len(class_names)
  counts = np.bincount(train_y, minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(f"classes without training images: "
                     f"{[class_names[c] for c in np.flatnonzero(counts == 0)]}")
  groups = class_groups(config, class_names, counts)
  synth_classes = []
  for g in filter(None, config.synth.groups.split("+")):
    if g not in groups:
      raise ValueError(f"config.synth.groups: unknown group {g!r}; groups are {sorted(groups)}")
    synth_classes += groups[g]
  results = {"dataset": {
      "name": config.data.name, "config": config.data.config, "num_train": int(len(train_y)),
      "num_test": int(len(test_y)), "image_shape": list(train_x.shape[1:]),
      "train_counts": dict(zip(class_names, counts.tolist())),
      "groups": {g: [class_names[c] for c in m] for g, m in groups.items()},
      "synthetic_classes": [class_names[c] for c in synth_classes]}}
  logging.info("data: %d train / %d test images; groups %s", len(train_y), len(test_y),
               results["dataset"]["groups"])

  # 1. Encoder.
  feats, results["encoder"] = encode(config, workdir, (train_x, train_y, test_x, test_y),
                                     num_classes, groups, class_names, writer)
  writer.write_scalars(config.encoder.steps, _scalars("encoder", results["encoder"]))
  train_f, test_f = feats["train"], feats["test"]
  head_logits = lambda f: f @ feats["head_kernel"] + feats["head_bias"]
  logging.info("encoder: macro-F1 %.4f, %d-d features (%.0f s)",
               results["encoder"]["macro_f1"], train_f.shape[1], time.time() - start)

  # 2. Memory bank; features are standardised with the real train statistics from here on.
  bank = memory_bank.fill(memory_bank.create(num_classes, train_f.shape[1], config.bank.capacity,
                                             config.bank.momentum),
                          train_f, train_y, seed=config.seed)
  mu, sd = train_f.mean(0), train_f.std(0)
  sd = np.where(sd > 1e-6, sd, 1.0)
  standardise = lambda f: (f - mu) / sd
  bank_f, bank_y = memory_bank.contents(bank)
  prototypes = np.asarray(bank.prototypes)

  # 3. Feature DDPM.
  d = config.ddpm
  schedule = schedules.ddpm_schedule(d.beta_schedule, d.num_train_timesteps, d.beta_start,
                                     d.beta_end)
  eps_net = ddpm.EpsNet(num_classes, width=d.width, depth=d.depth, mlp_ratio=d.mlp_ratio,
                        network=d.network, num_tokens=d.num_tokens, heads=d.heads,
                        prototype_cond=d.prototype_cond)
  model, history = ddpm.train(
      eps_net, standardise(bank_f), bank_y, schedule, steps=d.steps, batch_size=d.batch_size,
      learning_rate=d.learning_rate, seed=config.seed, class_balanced=d.class_balanced,
      prototypes=standardise(prototypes) if d.prototype_cond else None, chunk=d.chunk,
      writer=writer)
  results["ddpm"] = {"loss_history": history, "bank_sizes": dict(zip(
      class_names, np.minimum(np.asarray(bank.seen), bank.capacity).tolist()))}

  # 4. Synthetic tail features and their confidence.
  syn_y = np.repeat(np.asarray(synth_classes, np.int32), config.synth.per_class)
  syn_z = model.sample(syn_y, jax.random.PRNGKey(config.seed + 1))
  syn_f = syn_z * sd + mu
  if config.synth.confidence == "cosine":
    conf = losses.cosine_confidence(syn_f, syn_y, prototypes, center=mu)
  elif config.synth.confidence == "entropy":
    conf = losses.entropy_confidence(head_logits(syn_f))
  else:
    conf = np.ones(len(syn_y))
  syn_pred = np.argmax(head_logits(syn_f), -1)
  results["synthetic"] = {
      "confidence": config.synth.confidence,
      "per_class": quality.per_class_report(standardise(train_f), train_y, syn_z, syn_y,
                                            synth_classes, class_names,
                                            config.eval.quality_max_points, config.seed)}
  for c in synth_classes:
    entry = results["synthetic"]["per_class"].setdefault(class_names[c], {})
    entry["mean_confidence"] = float(conf[syn_y == c].mean())
    entry["encoder_head_agreement"] = float(np.mean(syn_pred[syn_y == c] == c))
  logging.info("synthetic: %d features for %s (%.0f s)", len(syn_y),
               results["dataset"]["synthetic_classes"], time.time() - start)

  # 5. Heads: every loss on real features, and with the synthetic ones mixed in.
  results["heads"] = compare_heads(config, standardise(train_f), train_y, standardise(test_f),
                                   test_y, (syn_z, syn_y, conf), num_classes, groups,
                                   class_names, writer)

  # Optional image-level link: the same DenseNet on real + external (e.g. GRASP) images.
  if config.image_link.npz:
    results["image_link"] = image_link(config, train_x, train_y, test_x, test_y, num_classes,
                                       groups, class_names, writer)

  # 6. Plot and write.
  if len(syn_y):
    image = tsne.plot(os.path.join(workdir, "tsne.png"), standardise(train_f), train_y, syn_z,
                      syn_y, class_names, max_per_class=config.eval.tsne_per_class,
                      seed=config.seed)
    writer.write_images(0, {"tsne_real_vs_synthetic": image[None]})
  results["seconds"] = time.time() - start
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  writer.flush()
  logging.info("comparison on %s (%.0f s):\n%s", config.data.eval_split, results["seconds"],
               comparison_table(results))
  return results


def compare_heads(config, train_z, train_y, test_z, test_y, synthetic, num_classes, groups,
                  class_names, writer):
  """Linear heads for every loss, on real features and on real + synthetic ones."""
  h, s = config.head, config.synth
  seeds = [config.seed * 1000 + i for i in range(h.seeds)]
  counts = np.bincount(train_y, minlength=num_classes)
  out = {}
  for kind in h.losses:
    net = head_lib.FeatureHead(num_classes, hidden=h.hidden, normed=kind in losses.NORMED_LOSSES)
    for mixed in (False, True) if len(synthetic[1]) else (False,):
      n = counts
      if mixed and s.csl_counts == "mixed":
        n = head_lib.mixed_class_counts(train_y, synthetic[1], synthetic[2], s.fraction,
                                        num_classes)
      loss_fn = losses.make_loss(kind, n, beta=h.cb_beta, max_m=h.ldam_max_m, s=h.ldam_s,
                                 drw_step=int(h.drw_fraction * h.steps), tau=h.la_tau)
      name = kind + ("+synth" if mixed else "")
      params = head_lib.train(net, train_z, train_y, loss_fn, steps=h.steps,
                              batch_size=h.batch_size, learning_rate=h.learning_rate,
                              seeds=seeds, synthetic=synthetic if mixed else None,
                              synth_fraction=s.fraction, warmup_steps=s.warmup_steps)
      out[name] = _average([classifier.classification_metrics(test_y, p, num_classes, groups,
                                                              class_names)
                            for p in head_lib.predict(net, params, test_z)])
      writer.write_scalars(h.steps, _scalars(f"heads/{name}", out[name]))
      logging.info("head %-18s macro-F1 %.4f +- %.4f", name, out[name]["macro_f1"],
                   out[name]["std"]["macro_f1"])
  return out


def comparison_table(results) -> str:
  """A plain-text table of the encoder and every head: overall and per-group macro-F1."""
  groups = list(results["encoder"]["groups"])
  header = f"{'model':<20}{'acc':>8}{'macroF1':>9}{'bAcc':>8}" + "".join(
      f"{'F1 ' + g:>12}" for g in groups) + f"{'nonzero':>9}"
  rows = [header]
  entries = [("encoder (CE, e2e)", results["encoder"])] + list(results["heads"].items())
  entries += [(f"image:{k}", v) for k, v in results.get("image_link", {}).items()]
  for name, m in entries:
    rows.append(f"{name:<20}{m['accuracy']:>8.4f}{m['macro_f1']:>9.4f}"
                f"{m['balanced_accuracy']:>8.4f}"
                + "".join(f"{m['groups'][g]['macro_f1']:>12.4f}" for g in groups)
                + f"{m['nonzero_f1_classes']:>9.1f}")
  return "\n".join(rows)


def image_link(config, train_x, train_y, test_x, test_y, num_classes, groups, class_names,
               writer):
  """The encoder's DenseNet trained on real + synthetic images and on synthetic images only.

  The images come from `config.image_link.npz` (`images` uint8 [N, H, W, C], `labels` int [N]),
  e.g. GRASP samples; they are resized to the real images' size if needed.
  """
  path = config.image_link.npz
  with np.load(path) as data:
    if "images" not in data or "labels" not in data:
      raise ValueError(f"{path}: needs arrays 'images' and 'labels', has {sorted(data)}")
    images, labels = data["images"], data["labels"].astype(np.int32)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
    raise ValueError(f"{path}: images must be uint8 [N, H, W, C] with one label each, got "
                     f"{images.dtype} {images.shape} and {labels.shape} labels")
  if images.shape[1:] != train_x.shape[1:]:
    images = np.asarray(jax.image.resize(images.astype(np.float32),
                                         (len(images),) + train_x.shape[1:], "bilinear"))
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  e = config.encoder
  net = encoder_network(config, num_classes)
  out = {}
  for name, (x, y, extra) in {"real+synthetic": (train_x, train_y, (images, labels)),
                              "synthetic": (images, labels, None)}.items():
    clf = classifier.train(net, x, y, steps=e.steps, batch_size=e.batch_size,
                           learning_rate=e.learning_rate, seed=config.seed, flip=e.flip,
                           extra=extra, extra_fraction=config.image_link.fraction,
                           log_every=e.log_every, writer=writer, prefix=f"image_link/{name}")
    out[name] = classifier.classification_metrics(test_y, clf.predict(test_x), num_classes,
                                                  groups, class_names)
    writer.write_scalars(e.steps, _scalars(f"image_link/{name}", out[name]))
  return out
