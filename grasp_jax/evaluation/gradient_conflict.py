"""Gradient-conflict diagnostics: do head and tail classes pull the shared FFN weights apart?

For every class (and every GRASP cluster) the gradient of its mean loss on held-out batches is
taken w.r.t. the *shared* feed-forward weights (the frozen base kernels, whether trained or not),
then compared by cosine similarity: per layer and over all selected layers concatenated. Reported
as CLU summaries: head-vs-tail mean cosine per layer, mean cosine within each cluster and across
clusters (the alignment a static partition should raise), and the matrices as heatmaps.

How all per-group gradients come from one forward and one backward pass: every selected `Dense`
parameter gets a *tap*, a zero-valued per-group copy (P [G, D, F] for a kernel [D, F]) whose row of
the sample's group is added to the weight that sample sees, `y_b = x_b @ (W + P[g_b])`. With P = 0
the forward pass is unchanged, so the tap is a custom_vjp identity that never computes it; its
backward pass gives `d(sum_b loss_b)/dP[g] = sum_{b in g} x_b^T dy_b`, the gradient of group g's
loss sum w.r.t. W. Per selected layer this costs one per-sample outer product [B, D, F] and a
segment sum, where `jax.jacrev` over the C per-class losses would cost C backward passes. It is
exact when samples do not interact inside the loss (per-sample norms and attention, as in the
UNet and MMDiT, and the denoising / flow / CBDM losses); a cross-sample term (CORAL's SupCon) is
attributed to the sample whose forward pass it flows through. Batch-level auxiliary losses (MoE
load balancing) are not attributable to a class and are left out.

Memory: the accumulated sums hold (C + K) x the selected parameters; for a full-size backbone,
narrow `param_filter` to a few layers.
"""
import functools
import math
import re

from flax import traverse_util
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from matplotlib import colormaps
from matplotlib import figure
from matplotlib.backends import backend_agg  # Figures drawn with Agg only: no pyplot, no display.
import numpy as np

from grasp_jax import files
from grasp_jax import partition as partition_lib
from grasp_jax.models import adapters

# Base weights of every transformer feed-forward layer: `ff` (UNet, MMDiT image stream) and
# `ff_context` (MMDiT text stream), first (`net_0/proj`, GEGLU/GELU) and second (`net_2`) linear.
FFN_KERNELS = r"(.*/)?ff(_context)?/net_(0/proj|2)/kernel"
ALL = "all"  # Key of the cosine matrix over all selected layers concatenated.
_DENSE_TYPES = (adapters.Dense, nn.Dense)
_TAPPED_LEAVES = ("kernel", "bias")


# ---------------------------------------------------------------------------------------------
# Per-group gradients.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap(spec, y, x, ids, probes):
  """Identity in `y`; its VJP w.r.t. `probes` is the per-group gradient of the Dense's weights.

  spec: static (group counts per grouping, tapped leaf names); ids: tuple of int [B], one per
  grouping; probes: {leaf: tuple of zeros [G, *leaf_shape], one per grouping}.
  """
  del spec, x, ids, probes
  return y


def _tap_fwd(spec, y, x, ids, probes):
  del spec, probes
  return y, (x, ids)


def _tap_bwd(spec, residuals, dy):
  nums, leaves = spec
  x, ids = residuals
  b = x.shape[0]
  xs = x.reshape(b, -1, x.shape[-1]).astype(jnp.float32)  # [B, N, D]
  dys = dy.reshape(b, -1, dy.shape[-1]).astype(jnp.float32)  # [B, N, F]
  per_sample = {"kernel": lambda: jnp.einsum("bnd,bnf->bdf", xs, dys),
                "bias": lambda: jnp.sum(dys, axis=1)}
  grads = {}
  for leaf in leaves:
    g = per_sample[leaf]()
    # Out-of-range ids (e.g. -1) belong to no group: segment_sum drops them.
    grads[leaf] = tuple(jax.ops.segment_sum(g, i, n) for i, n in zip(ids, nums))
  # P = 0, so the tap adds nothing to x's cotangent; ids are integers.
  return dy, None, None, grads


_tap.defvjp(_tap_fwd, _tap_bwd)


def _selected(params, param_filter):
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  chosen = {p: v for p, v in flat.items() if re.fullmatch(param_filter, p)}
  if not chosen:
    raise ValueError(f"param_filter {param_filter!r} matches no parameter; parameters look like "
                     f"{sorted(flat)[:5]}")
  return chosen


def _dense_taps(probes, ids, nums, tapped):
  """A flax method interceptor putting a `_tap` on every Dense call with a probed leaf."""
  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _DENSE_TYPES):
      return y
    prefix = "/".join(module.path)
    leaves = tuple(l for l in _TAPPED_LEAVES if f"{prefix}/{l}" in probes)
    if not leaves:
      return y
    x = args[0] if args else next(iter(kwargs.values()))
    for i in ids:
      if x.shape[0] != i.shape[0]:
        raise ValueError(f"Dense {prefix!r} sees a leading axis of {x.shape[0]}, but the group "
                         f"ids are per sample ({i.shape[0]}): a layer run on a concatenated or "
                         "reshaped batch cannot be split by sample")
    tapped.update(f"{prefix}/{l}" for l in leaves)
    return _tap((nums, leaves), y, x, ids, {l: probes[f"{prefix}/{l}"] for l in leaves})
  return interceptor


def group_gradient_sums(loss_fn, params, extra, batch, rng, groupings, *,
                        param_filter=FFN_KERNELS):
  """Per-group sums of per-sample loss gradients w.r.t. the selected Dense weights; one pass.

  Args:
    loss_fn: `(params, extra, batch, rng) -> (per_sample_loss [B], aux_scalar)`; aux is ignored.
    params: the full (unboxed) parameter tree; nothing is trained, no gradient of it is formed.
    extra: the model's other variable collections, passed through to `loss_fn`.
    batch, rng: one batch and the loss's rng (noise, timesteps, condition dropout).
    groupings: {name: (ids int [B], num_groups)}; ids outside [0, num_groups) join no group.
    param_filter: regex fullmatched against '/'-joined parameter paths; it may select only the
      `kernel`/`bias` of `Dense` layers that `loss_fn` calls.

  Returns:
    (sums, counts): sums[name][path] is float32 [num_groups, *leaf_shape] = sum over the samples b
    of the group of d loss_b / d leaf; counts[name] float32 [num_groups] samples per group.
  """
  names = tuple(groupings)
  ids = tuple(jnp.asarray(groupings[n][0]).astype(jnp.int32) for n in names)
  nums = tuple(int(groupings[n][1]) for n in names)
  chosen = _selected(params, param_filter)
  probes = {path: tuple(jnp.zeros((n,) + leaf.shape, jnp.float32) for n in nums)
            for path, leaf in chosen.items()}
  tapped = set()

  def total_loss(probes):
    with nn.intercept_methods(_dense_taps(probes, ids, nums, tapped)):
      per_sample, _ = loss_fn(params, extra, batch, rng)
    if per_sample.ndim != 1 or any(per_sample.shape[0] != i.shape[0] for i in ids):
      raise ValueError(f"loss_fn must return a per-sample loss [B] matching the group ids "
                       f"{[i.shape for i in ids]}, got shape {per_sample.shape}")
    return jnp.sum(per_sample.astype(jnp.float32))

  grads = jax.grad(total_loss)(probes)
  untapped = sorted(set(chosen) - tapped)
  if untapped:
    raise ValueError(f"param_filter {param_filter!r} selects {untapped}, which are not the "
                     "kernel/bias of a Dense layer that loss_fn calls; only those can be split "
                     "by group")
  sums = {n: {path: g[j] for path, g in grads.items()} for j, n in enumerate(names)}
  counts = {n: jax.ops.segment_sum(jnp.ones(i.shape, jnp.float32), i, num)
            for n, i, num in zip(names, ids, nums)}
  return sums, counts


def group_means(sums, counts):
  """Per-group mean gradients from sums and counts; NaN rows for groups without samples."""
  def mean(s):
    c = counts.reshape((-1,) + (1,) * (s.ndim - 1))
    return jnp.where(c > 0, s / jnp.maximum(c, 1), jnp.nan)
  return {path: mean(s) for path, s in sums.items()}


def class_gradients(loss_fn, params, extra, batch, rng, *, num_classes,
                    param_filter=FFN_KERNELS):
  """Per-class mean-loss gradients {path: [C, ...]} (NaN rows: class absent) and counts [C]."""
  sums, counts = group_gradient_sums(loss_fn, params, extra, batch, rng,
                                     {"class": (batch["label"], num_classes)},
                                     param_filter=param_filter)
  return group_means(sums["class"], counts["class"]), counts["class"]


def cluster_gradients(loss_fn, params, extra, batch, rng, *, num_clusters,
                      param_filter=FFN_KERNELS):
  """Per-cluster mean-loss gradients {path: [K, ...]} (NaN rows: cluster absent) and counts."""
  sums, counts = group_gradient_sums(loss_fn, params, extra, batch, rng,
                                     {"cluster": (batch["cluster_id"], num_clusters)},
                                     param_filter=param_filter)
  return group_means(sums["cluster"], counts["cluster"]), counts["cluster"]


# ---------------------------------------------------------------------------------------------
# Cosine similarities and their summaries.

def cosine_matrix(grads):
  """{path: [G, ...]} -> {path: [G, G]} cosines per layer, plus ALL: the layers concatenated.

  Rows that are NaN (absent groups) or zero give NaN entries. The concatenated cosine is formed
  from summed per-layer Gram matrices, so the concatenation is never materialised.
  """
  def gram(g):
    g = g.reshape(g.shape[0], -1).astype(jnp.float32)
    return jnp.matmul(g, g.T, precision=jax.lax.Precision.HIGHEST)

  def normalise(gm):
    norm = jnp.sqrt(jnp.diagonal(gm))
    cos = gm / (norm[:, None] * norm[None, :])
    return jnp.where(jnp.isfinite(cos), jnp.clip(cos, -1.0, 1.0), jnp.nan)

  grams = {path: gram(g) for path, g in grads.items()}
  out = {path: normalise(gm) for path, gm in grams.items()}
  out[ALL] = normalise(sum(grams.values()))
  return out


def _pair_mean(cos, mask):
  """Mean of the finite entries of `cos` where `mask`; NaN when there is none."""
  cos = np.asarray(cos, np.float64)
  keep = mask & np.isfinite(cos)
  return float(cos[keep].mean()) if keep.any() else math.nan


def head_tail_cosine(cos, groups):
  """Mean cosine between head and tail classes (absent classes skipped).

  cos: a [C, C] matrix, or {layer: [C, C]} (then a {layer: mean} dict is returned).
  groups: (head class indices, tail class indices).
  """
  head, tail = groups
  if isinstance(cos, dict):
    return {k: head_tail_cosine(v, (head, tail)) for k, v in cos.items()}
  c = np.shape(cos)[0]
  mask = np.zeros((c, c), bool)
  mask[np.ix_(np.asarray(head, int), np.asarray(tail, int))] = True
  mask &= ~np.eye(c, dtype=bool)  # Only matters when the two sets overlap.
  return _pair_mean(cos, mask)


def group_alignment(cos, groups):
  """Mean pairwise cosine within each group, pooled over all within-group pairs, and across groups.

  cos: [C, C]; groups: a `Partition` (its clusters) or a sequence of class-index lists (a class in
  no list is left out). Pairs are distinct classes; absent classes (NaN) are skipped.
  Returns {'intra': [G] floats (NaN for groups with < 2 present classes), 'intra_pooled': float,
  'inter': float}.
  """
  c = np.shape(cos)[0]
  if hasattr(groups, "class_to_cluster"):
    member = np.asarray(groups.class_to_cluster)
    num = groups.num_clusters
  else:
    member = np.full(c, -1)
    for g, idx in enumerate(groups):
      member[np.asarray(idx, int)] = g
    num = len(groups)
  off_diag = ~np.eye(c, dtype=bool)
  same = (member[:, None] == member[None, :]) & (member[:, None] >= 0) & off_diag
  other = (member[:, None] != member[None, :]) & (member[:, None] >= 0) & (member[None, :] >= 0)
  intra = [_pair_mean(cos, same & (member[:, None] == g)) for g in range(num)]
  return {"intra": intra, "intra_pooled": _pair_mean(cos, same), "inter": _pair_mean(cos, other)}


# ---------------------------------------------------------------------------------------------
# Images, CLU summaries and the driver.

def heatmap_image(cos, names, title=None):
  """A cosine matrix as an RGB image (uint8 [H, W, 3]) with a colorbar and name ticks.

  Rows/columns are drawn in the given order (order them head -> tail before calling); NaN
  entries (absent classes) are grey.
  """
  cos = np.asarray(cos, np.float64)
  n = len(names)
  if cos.shape != (n, n):
    raise ValueError(f"heatmap_image: matrix shape {cos.shape} does not match {n} names")
  side = 2.5 + 0.32 * n
  fig = figure.Figure(figsize=(side + 1.2, side), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  cmap = colormaps["RdBu_r"].with_extremes(bad="0.7")
  im = ax.imshow(np.ma.masked_invalid(cos), cmap=cmap, vmin=-1.0, vmax=1.0)
  ax.set_xticks(range(n), names, rotation=90, fontsize=7)
  ax.set_yticks(range(n), names, fontsize=7)
  if n <= 12:
    for i in range(n):
      for j in range(n):
        if np.isfinite(cos[i, j]):
          ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6,
                  color="white" if abs(cos[i, j]) > 0.6 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="gradient cosine")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def summarize(class_cos, cluster_cos, class_counts, cluster_counts, partition, head_tail):
  """The diagnostics of one evaluation from the cosine matrices (host numpy; small).

  class_cos / cluster_cos: {layer or ALL: [C, C] / [K, K]}; *_counts: held-out samples per group;
  head_tail: (head, tail) class indices.
  """
  class_cos = {k: np.asarray(v) for k, v in class_cos.items()}
  cluster_cos = {k: np.asarray(v) for k, v in cluster_cos.items()}
  head, tail = head_tail
  align = group_alignment(class_cos[ALL], partition)
  return {
      "class_names": list(partition.class_names),
      "cluster_names": list(partition.cluster_names),
      "class_counts": np.asarray(class_counts).astype(int).tolist(),
      "cluster_counts": np.asarray(cluster_counts).astype(int).tolist(),
      "head_classes": [partition.class_names[i] for i in head],
      "tail_classes": [partition.class_names[i] for i in tail],
      "head_tail": head_tail_cosine(class_cos, (head, tail)),
      "intra": dict(zip(partition.cluster_names, align["intra"])),
      "intra_pooled": align["intra_pooled"],
      "inter": align["inter"],
      "order": partition_lib.head_to_tail(partition.class_counts).tolist(),
      "class_cos": class_cos,
      "cluster_cos": cluster_cos,
  }


def write_summaries(writer, step, results):
  """CLU scalars and heatmaps of `summarize`'s results; returns them JSON-able (NaN -> None).

  Scalars (NaN ones are skipped): grad_cos/head_tail/<layer path>, grad_cos/head_tail/all,
  grad_cos/intra/<cluster>, grad_cos/intra_pooled, grad_cos/inter. Images: grad_cos/classes
  (all selected layers, classes head -> tail) and grad_cos/clusters.
  """
  scalars = {f"grad_cos/head_tail/{k}": v for k, v in results["head_tail"].items()}
  scalars.update({f"grad_cos/intra/{k}": v for k, v in results["intra"].items()})
  scalars["grad_cos/intra_pooled"] = results["intra_pooled"]
  scalars["grad_cos/inter"] = results["inter"]
  writer.write_scalars(step, {k: v for k, v in scalars.items() if np.isfinite(v)})
  order = np.asarray(results["order"], int)
  class_img = heatmap_image(
      results["class_cos"][ALL][np.ix_(order, order)],
      [results["class_names"][i] for i in order], title=f"class gradient cosine, step {step}")
  cluster_img = heatmap_image(results["cluster_cos"][ALL], results["cluster_names"],
                              title=f"cluster gradient cosine, step {step}")
  writer.write_images(step, {"grad_cos/classes": class_img[None],
                             "grad_cos/clusters": cluster_img[None]})
  return {"step": int(step), **files.jsonable(results)}


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_classes", "num_clusters",
                                             "param_filter"))
def _batch_sums(params, extra, batch, rng, *, loss_fn, num_classes, num_clusters, param_filter):
  return group_gradient_sums(
      loss_fn, params, extra, batch, rng,
      {"class": (batch["label"], num_classes), "cluster": (batch["cluster_id"], num_clusters)},
      param_filter=param_filter)


@functools.partial(jax.jit, donate_argnums=(0,))
def _add(acc, new):
  return jax.tree.map(jnp.add, acc, new)


@jax.jit
def _cosines(sums, counts):
  return {n: cosine_matrix(group_means(sums[n], counts[n])) for n in sums}


def run_diagnostics(exp, params, extra, batches, rng, writer, step, head_tail, *,
                    param_filter=FFN_KERNELS):
  """Gradient-conflict diagnostics of `exp.loss_fn` on held-out `batches`, written to `writer`.

  Per-class and per-cluster gradient *sums* and counts are accumulated over the batches (so the
  class means are exact over all of them), then turned into cosine matrices and summaries.
  exp: has `loss_fn` and `partition`; params: the full parameter tree (frozen base merged with
  the trainables); batches: an iterable of device batches with 'label' and 'cluster_id'; rng: a
  key, folded with the batch index; head_tail: (head, tail) class indices, the data's frequency
  groups whatever the run's partition (so that runs of different methods are compared on the
  same classes). Returns the JSON-able results of `write_summaries`.
  One compile per (loss_fn, shapes); later calls reuse it.
  """
  part = exp.partition
  acc = None
  for i, batch in enumerate(batches):
    new = _batch_sums(params, extra, batch, jax.random.fold_in(rng, i), loss_fn=exp.loss_fn,
                      num_classes=part.num_classes, num_clusters=part.num_clusters,
                      param_filter=param_filter)
    acc = new if acc is None else _add(acc, new)
  if acc is None:
    raise ValueError("run_diagnostics got no batches")
  sums, counts = acc
  # process_allgather: plain numpy on every host, whatever sharding XLA gave the small outputs.
  cos, counts = multihost_utils.process_allgather((_cosines(sums, counts), counts), tiled=True)
  results = summarize(cos["class"], cos["cluster"], counts["class"], counts["cluster"], part,
                      head_tail)
  return write_summaries(writer, step, results)
