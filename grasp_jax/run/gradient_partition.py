"""The `gradient` partition strategies: a partition from measured gradient alignment (issue 14).

On the frozen base model and the run's data, the gradient of every class's mean loss w.r.t. the
adapter-site weights (the FFN kernels GRASP's adapters sit beside, `gradient_conflict.FFN_KERNELS`)
is accumulated over class-balanced batches of the *training* split, each batch with `repeats`
draws of noise and timestep, and the class x class cosine matrix of those gradients is clustered
(`partition.alignment`). The measured loss is the run's denoising / flow loss with every sample
conditioned on its own prompt (no condition dropout) and without CBDM / CORAL terms: the partition
is about how the classes pull the shared weights, whatever regulariser a method adds. A multi-label
sample counts for its rarest positive class (the pipeline's `label`), as the rarest-label rule
assigns it.

Stability: the batches are split into two disjoint halves (even / odd batches) and the cosine
matrix of each half is kept; the split-half reliability is the Pearson r of their off-diagonal
entries (with Spearman-Brown's 2r/(1+r) for the whole). A class with fewer than `min_images`
images in the split, or not drawn in both halves, is unmeasured (NaN row) and gets the
rarest-label rule's treatment (`alignment.gradient_groups`).

The base is built through `task.experiment.build` with a measurement config (adapters off, one
cluster) in WORKDIR/partition_measure, so WORKDIR/partition.json is written only with the result.

  measure(config, workdir)            cosine matrix, halves, counts, reliability
  make_partition(config, workdir)     measure + cluster; writes partition_alignment.{json,png}
  ensure(config, workdir)             a run's hook: WORKDIR/partition.json, measured once
  run_cli(config, workdir, ...)       `python -m grasp_jax.partition --strategy=gradient ...`
  heldout_alignment(config, workdir, partitions)   within- vs between-cluster cosine, eval split
"""
import json
import os
from typing import Mapping

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from grasp_jax import files
from grasp_jax import partition as partition_lib
from grasp_jax.inference import model as inference_model
from grasp_jax.data import pipeline
from grasp_jax.data.builders import specs
from grasp_jax.evaluation import gradient_conflict as gc
from grasp_jax.parallel import distributed
from grasp_jax.parallel import sharding
from grasp_jax.partition import alignment
from grasp_jax.task import experiment

# Defaults of the measurement; a config may override them in config.partition.
NUM_BATCHES = 32  # Class-balanced batches (split into two halves for the reliability).
REPEATS = 2  # Noise / timestep draws per batch.
MIN_IMAGES = 5  # Fewer images of a class in the split: not measured.
SCRATCH = "partition_measure"  # WORKDIR subfolder of the measurement's experiment.
OUTPUT = "partition_alignment"  # WORKDIR/<OUTPUT>.json and .png


def options(config):
  """The measurement options of a config (config.partition.gradient_* or the defaults)."""
  p = config.partition
  return dict(num_batches=p.get("gradient_batches", NUM_BATCHES),
              repeats=p.get("gradient_repeats", REPEATS),
              min_images=p.get("gradient_min_images", MIN_IMAGES))


def measurement_config(config, workdir, split, num_batches):
  """The run's config for measuring on the frozen base (see the module docstring)."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.partition.strategy, cfg.partition.k = "single", 1  # The partition does not exist yet.
    cfg.partition.thresholds = cfg.partition.groups = ""
    # No adapters; every base weight is differentiated (and so kept in float32 below).
    cfg.method.adapter, cfg.method.trainable = "none", (r".*",)
    cfg.model.frozen_dtype = "float32"  # It differentiates the base itself.
    cfg.diffusion.cfg_dropout = 0.0
    cfg.diffusion.cbdm_weight = cfg.diffusion.coral_weight = 0.0
    if not cfg.model.pretrained:  # The demo's own base, trained into WORKDIR/base.
      cfg.model.pretrained = inference_model.base_folder(config, workdir)
    cfg.data.eval_split = split  # Experiment.heldout_batches: class-balanced batches of it.
    cfg.train.diagnostics_batches = num_batches
  return cfg


@jax.jit
def _cosines(half_a, half_b):
  """Cosines over all tapped layers: both halves together, each half; and the counts."""
  (sums_a, counts_a), (sums_b, counts_b) = half_a, half_b
  cos = lambda s, n: gc.cosine_matrix(gc.group_means(s, n))[gc.ALL]
  total = jax.tree.map(jnp.add, sums_a, sums_b)
  return cos(total, counts_a + counts_b), cos(sums_a, counts_a), cos(sums_b, counts_b), (
      counts_a, counts_b)


def accumulate(loss_fn, params, extra, batches, rng, *, num_classes, repeats=1,
               param_filter=gc.FFN_KERNELS):
  """Per-class gradient cosines from sums over `batches` x `repeats` rng draws, in two halves.

  loss_fn, params, extra: as `gradient_conflict.group_gradient_sums`; batches: an iterable of
  device batches with 'label'; rng: folded with (batch, repeat). Batch i goes to half i % 2.
  Returns host numpy: cosine [C, C] (both halves), halves [2, C, C], counts [2, C] (samples x
  repeats per half); rows of classes absent from a half are NaN in that half.
  """
  sums_fn = jax.jit(lambda p, e, b, r: gc.group_gradient_sums(
      loss_fn, p, e, b, r, {"class": (b["label"], num_classes)}, param_filter=param_filter))
  halves = [None, None]
  for i, batch in enumerate(batches):
    for j in range(repeats):
      sums, counts = sums_fn(params, extra, batch, jax.random.fold_in(rng, i * repeats + j))
      new = (sums["class"], counts["class"])
      halves[i % 2] = new if halves[i % 2] is None else jax.tree.map(jnp.add, halves[i % 2], new)
  if halves[1] is None:
    raise ValueError("the gradient measurement needs at least 2 batches (two halves)")
  cos, cos_a, cos_b, counts = multihost_utils.process_allgather(_cosines(*halves), tiled=True)
  return {"cosine": np.asarray(cos, np.float64),
          "halves": np.stack([cos_a, cos_b]).astype(np.float64),
          "counts": np.stack(counts).astype(np.int64)}


def finish(raw, class_names, class_counts, *, min_images, repeats):
  """`accumulate`'s output -> the measurement: unmeasured classes NaN, reliability, counts."""
  class_counts = np.asarray(class_counts, np.int64)
  measured = (class_counts >= min_images) & (raw["counts"] > 0).all(axis=0)
  blank = lambda m: np.where(measured[:, None] & measured[None, :], m, np.nan)
  cos, halves = blank(raw["cosine"]), np.stack([blank(h) for h in raw["halves"]])
  return {"class_names": list(class_names), "class_counts": class_counts,
          "samples": raw["counts"].sum(axis=0) // repeats, "measured": measured,
          "cosine": cos, "halves": halves,
          "reliability": alignment.split_half_reliability(*halves, measured)}


def measure(config, workdir, *, split=None, num_batches=NUM_BATCHES, repeats=REPEATS,
            min_images=MIN_IMAGES, param_filter=gc.FFN_KERNELS):
  """The class gradient cosine matrix of the frozen base on `split` (default: the train split).

  Every process must call it. Returns {class_names, class_counts (images of the split), samples
  (drawn per class), measured bool[C], cosine [C, C], halves [2, C, C], reliability, split,
  num_batches, repeats, min_images}.
  """
  split = split or config.data.train_split
  cfg = measurement_config(config, workdir, split, num_batches)
  exp = experiment.build(cfg, os.path.join(workdir, SCRATCH))
  mesh = sharding.make_mesh(cfg.mesh)
  rng = jax.random.key(cfg.seed)
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(exp.init_variables, rng)
    shardings = sharding.logical_shardings(boxed, mesh, cfg.mesh)
    variables = jax.jit(lambda r, b: nn.unbox(exp.init_variables(r, b)),
                        out_shardings=shardings)(rng, exp.base_on_devices(shardings["params"]))
    extra = {k: v for k, v in variables.items() if k != "params"}
    raw = accumulate(exp.loss_fn, variables["params"], extra, exp.heldout_batches(mesh),
                     jax.random.fold_in(rng, 1), num_classes=exp.partition.num_classes,
                     repeats=repeats, param_filter=param_filter)
  names, counts = pipeline.dataset_class_counts(exp.builder, split)
  result = finish(raw, names, counts, min_images=min_images, repeats=repeats)
  result.update(split=split, num_batches=num_batches, repeats=repeats, min_images=min_images)
  logging.info("gradient alignment on %s: %d of %d classes measured, split-half r = %.3f",
               split, result["measured"].sum(), len(names),
               result["reliability"]["split_half"])
  return result


def cluster_order(part):
  """Class indices by cluster, head to tail within each: the heatmap's order."""
  table = np.asarray(part.class_to_cluster)
  return np.concatenate([partition_lib.head_to_tail(part.class_counts, np.flatnonzero(table == g))
                         for g in range(part.num_clusters)])


def save_alignment(out_dir, part, result):
  """<out_dir>/partition_alignment.json (matrix, reliability, order) and .png (the heatmap)."""
  order = cluster_order(part)
  labels = [f"{part.class_to_cluster[i]}:{part.class_names[i]}" for i in order]
  r = result["reliability"]["split_half"]
  image = gc.heatmap_image(result["cosine"][np.ix_(order, order)], labels,
                           title=f"class gradient cosine by {part.strategy} cluster "
                                 f"(split-half r = {r:.2f})")
  paths = {ext: os.path.join(out_dir, f"{OUTPUT}.{ext}") for ext in ("json", "png")}
  files.write_bytes(paths["png"], specs.encode_png(image))
  files.write_json(paths["json"], {
      **result, "partition": part.to_json(), "order": [part.class_names[i] for i in order],
      "alignment": gc.group_alignment(result["cosine"], part), "heatmap": paths["png"]})
  return paths


def make_partition(config, workdir, *, strategy=None, k=None):
  """Measures on the train split and clusters: (Partition, measurement). Process 0 writes
  WORKDIR/partition_alignment.{json,png}; the partition file is the caller's."""
  p = config.partition
  strategy = strategy or p.strategy
  if strategy not in partition_lib.GRADIENT_STRATEGIES:
    raise ValueError(f"strategy {strategy!r} is not measured; expected one of "
                     f"{partition_lib.GRADIENT_STRATEGIES}")
  result = measure(config, workdir, **options(config))
  part = partition_lib.build_partition(result["class_names"], result["class_counts"],
                                       strategy=strategy, k=k or p.k, healthy=p.healthy,
                                       cosine=result["cosine"])
  if jax.process_index() == 0:
    result["paths"] = save_alignment(workdir, part, result)
  return part, result


def ensure(config, workdir):
  """A run's hook before `experiment.build`: for a gradient strategy, WORKDIR/partition.json is
  measured and written once (later calls and other strategies: nothing). Every process calls it."""
  path = os.path.join(workdir, "partition.json")
  if config.partition.strategy not in partition_lib.GRADIENT_STRATEGIES or os.path.exists(path):
    return None
  part, _ = make_partition(config, workdir)
  if jax.process_index() == 0:
    part.save(path)
  distributed.barrier("gradient_partition")
  return part


def run_cli(config, workdir, *, strategy="gradient", k=None, out=None, as_json=False):
  """The partition command for the gradient strategies: the report text; writes `out`."""
  part, result = make_partition(config, workdir, strategy=strategy, k=k)
  if out and jax.process_index() == 0:
    part.save(out)
  rel, align = result["reliability"], gc.group_alignment(result["cosine"], part)
  written = [p for p in [*(result.get("paths") or {}).values(), out] if p]
  if as_json:
    return json.dumps(files.jsonable({**part.to_json(), "reliability": rel,
                                      "measured": result["measured"], "alignment": align,
                                      "files": written}), indent=2)
  head = (f"{config.data.name}: {part.num_classes} classes ({int(result['measured'].sum())} "
          f"measured), strategy={strategy}, K={part.num_clusters}; {result['num_batches']} "
          f"batches x {result['repeats']} draws; split-half r = {rel['split_half']:.3f} "
          f"(Spearman-Brown {rel['spearman_brown']:.3f}, {rel['pairs']} pairs); cosine within "
          f"clusters {align['intra_pooled']:.3f}, between {align['inter']:.3f}")
  return "\n".join([head, partition_lib.format_table(part), *(f"wrote {p}" for p in written)])


def heldout_alignment(config, workdir, partitions: Mapping[str, partition_lib.Partition], *,
                      split=None):
  """Within- vs between-cluster gradient cosine of each partition, on held-out batches.

  One measurement on the frozen base over `split` (default: the eval split, which the gradient
  partition never saw), then `gradient_conflict.group_alignment` per partition: {'reliability':
  ..., name: {intra, intra_pooled, inter, gap = intra_pooled - inter}}.
  """
  opts = options(config)
  result = measure(config, workdir, split=split or config.data.eval_split,
                   num_batches=opts["num_batches"], repeats=opts["repeats"], min_images=1)
  out = {"reliability": result["reliability"], "split": result["split"]}
  for name, part in partitions.items():
    if tuple(part.class_names) != tuple(result["class_names"]):
      raise ValueError(f"partition {name!r} has classes {part.class_names}, the data "
                       f"{result['class_names']}")
    a = gc.group_alignment(result["cosine"], part)
    out[name] = {**a, "gap": a["intra_pooled"] - a["inter"]}
  return out
