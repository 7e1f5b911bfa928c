"""Adapter banks: GRASP per-cluster adapters, LoRA, SeLoRA and the learned-gating MoE baseline.

Two hooks are used by the backbones (models/attention.py, models/dit.py):
  * `Dense`: a drop-in for nn.Dense with logical axis names; with method lora/selora it also
    owns low-rank delta parameters (`lora_a`, `lora_b`) in the same scope, so the base parameter
    paths (`kernel`, `bias`) stay those of the diffusers checkpoint.
  * `FFNAdapter`: returns the residual delta added to `ffn(x)`; zeros (and no parameters) for
    methods that have no FFN adapter (none, lora, selora).

`cluster_ids=None` at the FFN site reproduces the frozen base (grasp and moe). LoRA/SeLoRA deltas
live in `Dense`, which never sees cluster ids: they always apply, and are zero at init.

Methods (`AdapterConfig.method`):
  grasp   K residual bottleneck adapters stacked `[K, ...]`; a sample's row is *gathered* by its
          cluster id and applied with two batched einsums: one adapter's FLOPs, never K.
  lora    `x @ lora_a @ lora_b * alpha/r` on every `Dense` whose module path matches
          `lora_targets`.
  selora  LoRA with a static maximum rank and an active-rank mask (collection 'selora') that
          grows during training; see `selora_fi_ratios`.
  moe     A router (C -> K logits per token) over K experts shaped like GRASP's; the baseline
          that pays for routing: all experts are computed densely. Its load-balancing loss is
          sown as `losses/moe_aux`; collect it with
          `y, mut = model.apply(variables, ..., mutable=['losses'])` and
          `aux = sum(jax.tree.leaves(mut['losses']))`, then add `weight * aux` to the loss.
  none    No adapter (full fine-tuning, or the frozen base).

SeLoRA training recipe (pure functions below, driven by the trainer):
  fisher = selora_fisher_init(params)                          # after init and after each check
  every step:
    grads = grad of the loss with variables {'params': ..., 'selora': selora_probe(sv)}
    fisher = selora_fisher_update(fisher, grads)
    grads = selora_mask_grads(grads, sv)                        # the probe rank must not train
  every n steps:
    params, sv, grown = selora_grow(params, sv, fisher, threshold); fisher = selora_fisher_init(..)
The probe turns the next (inactive) rank on; its `lora_b` row is zero, so the forward pass, the
loss and every other gradient are bitwise those of the unprobed model, and the only extra gradient
is that of the candidate's `lora_b` row: the Fisher signal of one more rank, at no extra cost.
"""
import dataclasses
import functools
import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

METHODS = ("none", "grasp", "lora", "selora", "moe")
GATHERS = ("index", "onehot")
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch's default (erf) GELU.
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "identity": lambda x: x,
}
# Module paths (fullmatch on the '/'-joined path) that get LoRA: attention projections (UNet and
# SD3 joint attention, incl. the context stream) and the feed-forward linears.
DEFAULT_LORA_TARGETS = (r"(.*/)?(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|"
                        r"to_add_out|net_0/proj|net_2)")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which adapter the backbone carries, and its shape.

  method: one of METHODS.
  num_clusters: K, GRASP clusters or MoE experts.
  rank: adapter bottleneck / LoRA rank (SeLoRA: the static maximum rank R).
  activation: bottleneck nonlinearity of grasp/moe adapters (a key of ACTIVATIONS; all map 0->0,
    so a zeroed row is an exact no-op).
  gather: grasp row selection: 'index' (gather `down[c]`) or 'onehot' (`one_hot(c) @ down`, no
    dynamic gather; also accepts soft cluster weights [B, K]).
  lora_alpha: LoRA scale is lora_alpha / rank (None -> scale 1). SeLoRA uses the static R, so the
    scale does not change when a rank is added.
  lora_targets: regex fullmatched against the '/'-joined module path of each `Dense`.
  selora_init_rank: active ranks at initialisation (the paper starts at 1).
  moe_mode: 'soft' (softmax-weighted sum of all experts) or 'top<k>' (e.g. 'top1': Switch).
  """
  method: str = "none"
  num_clusters: int = 1
  rank: int = 8
  activation: str = "gelu"
  gather: str = "index"
  lora_alpha: float | None = None
  lora_targets: str = DEFAULT_LORA_TARGETS
  selora_init_rank: int = 1
  moe_mode: str = "soft"

  def __post_init__(self):
    def check(ok, field, allowed):
      if not ok:
        raise ValueError(f"AdapterConfig.{field}={getattr(self, field)!r} is invalid; "
                         f"expected {allowed}")
    check(self.method in METHODS, "method", METHODS)
    check(self.num_clusters >= 1, "num_clusters", ">= 1")
    check(self.rank >= 1, "rank", ">= 1")
    check(self.activation in ACTIVATIONS, "activation", tuple(ACTIVATIONS))
    check(self.gather in GATHERS, "gather", GATHERS)
    check(1 <= self.selora_init_rank <= self.rank, "selora_init_rank", f"in [1, rank={self.rank}]")
    try:
      re.compile(self.lora_targets)
    except re.error as e:
      raise ValueError(f"AdapterConfig.lora_targets={self.lora_targets!r}: {e}") from None
    top_k = self.moe_top_k
    check(self.moe_mode == "soft" or (top_k is not None and 1 <= top_k <= self.num_clusters),
          "moe_mode", f"'soft' or 'top<k>' with 1 <= k <= num_clusters={self.num_clusters}")

  @property
  def moe_top_k(self):
    """k of a 'top<k>' moe_mode; None for 'soft'."""
    m = re.fullmatch(r"top([0-9]+)", self.moe_mode)
    return int(m.group(1)) if m else None

  @property
  def lora_scale(self):
    return 1.0 if self.lora_alpha is None else self.lora_alpha / self.rank


class Dense(nn.Module):
  """nn.Dense with logical axis names (kernel `kernel_axes`, bias `kernel_axes[-1]`).

  With method lora/selora and a module path matching `adapter.lora_targets`, adds
  `lora_a [in, r]` (Kaiming-uniform, as PEFT) and `lora_b [r, out]` (zeros):
  `y = x @ kernel + bias + (x @ lora_a) * mask @ lora_b * scale`, `mask` being SeLoRA's active
  ranks (variable 'selora'/'mask', [R] float; all ones for plain LoRA).
  """
  features: int
  use_bias: bool = True
  kernel_axes: tuple = ("embed", "mlp")
  adapter: AdapterConfig = AdapterConfig()
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_axis, out_axis = self.kernel_axes
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.kernel_axes),
        (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    y = jnp.einsum("...i,io->...o", x, kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    cfg = self.adapter
    if cfg.method not in ("lora", "selora") or not re.fullmatch(cfg.lora_targets,
                                                                 "/".join(self.path)):
      return y
    r = cfg.rank
    # Kaiming-uniform with a=sqrt(5) (torch/PEFT default): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    lora_a = self.param("lora_a", nn.with_logical_partitioning(a_init, (in_axis, "rank")),
                        (x.shape[-1], r), self.param_dtype)
    lora_b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("rank", out_axis)),
                        (r, self.features), self.param_dtype)
    h = jnp.einsum("...i,ir->...r", x, lora_a.astype(dtype))
    if cfg.method == "selora":
      mask = self.variable("selora", "mask",
                           lambda: (jnp.arange(r) < cfg.selora_init_rank).astype(jnp.float32))
      h = h * mask.value.astype(dtype)
    delta = jnp.einsum("...r,ro->...o", h, lora_b.astype(dtype))
    return y + delta * jnp.asarray(cfg.lora_scale, dtype)


def _stacked_init(base_init, num):
  """Initialiser of a [num, ...] stack: `num` independent draws of `base_init` (split rng), so
  each row is distributed as a single adapter's (fan-in from the row shape, not num * C)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.vmap(lambda k: base_init(k, shape[1:], dtype))(jax.random.split(key, num))
  return init


class FFNAdapter(nn.Module):
  """Residual delta at a feed-forward site: `ffn(x) + FFNAdapter(x, cluster_ids)`.

  x: [B, ..., C] (e.g. [B, N, C] tokens or [B, C]).
  cluster_ids (grasp): int [B] cluster per sample; ids outside [0, K) (e.g. -1) select no adapter
    (delta 0 for that sample, e.g. adapter dropout). With gather='onehot' it may instead be float
    weights [B, K]: the delta is then `sum_k w_k * adapter_k(x)` (soft membership/interpolation at
    sampling time; this path computes all K adapters, the only one that does).
  cluster_ids (moe): unused except that None means "base" (delta 0, no router, no aux loss); pass
    any array (e.g. the cluster ids) to route.
  """
  config: AdapterConfig

  @nn.compact
  def __call__(self, x, cluster_ids=None):
    cfg = self.config
    if cfg.method not in ("grasp", "moe") or cluster_ids is None:
      return jnp.zeros_like(x)
    if x.ndim < 2:
      raise ValueError(f"FFNAdapter expects x of shape [B, ..., C], got {x.shape}")
    k, c, r = cfg.num_clusters, x.shape[-1], cfg.rank
    p = {
        "down": self.param("down", nn.with_logical_partitioning(
            _stacked_init(nn.initializers.lecun_normal(), k), ("cluster", "embed", "rank")),
                           (k, c, r), jnp.float32),
        "down_bias": self.param("down_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("cluster", "rank")), (k, r), jnp.float32),
        # Zero-initialised: training starts exactly at the frozen base.
        "up": self.param("up", nn.with_logical_partitioning(
            nn.initializers.zeros, ("cluster", "rank", "embed")), (k, r, c), jnp.float32),
        "up_bias": self.param("up_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("cluster", "embed")), (k, c), jnp.float32),
    }
    p = {name: w.astype(x.dtype) for name, w in p.items()}
    act = ACTIVATIONS[cfg.activation]
    tokens = x.reshape(x.shape[0], -1, c)  # [B, N, C]
    if cfg.method == "grasp":
      out = _grasp(tokens, cluster_ids, p, act, cfg)
    else:
      out = self._moe(tokens, p, act)
    return out.reshape(x.shape)

  def _moe(self, x, p, act):
    """Learned gating over all K experts, computed densely (the baseline pays for routing).

    soft: weights = softmax(router(x)). top<k>: weights = the top-k router probabilities, zero
    elsewhere; for k=1 the raw probability of the chosen expert (Switch Transformer), for k>1
    renormalised over the chosen k. Experts are still all computed, then masked: exact, and
    simpler than capacity-based dispatch for a baseline.
    Aux loss (Switch): K * sum_i f_i * P_i, with f_i the fraction of tokens whose top-1 expert is
    i and P_i the mean router probability of expert i, over all B*N tokens.
    """
    cfg = self.config
    k = cfg.num_clusters
    # Router in fp32 (selective precision, as Switch).
    router = self.param("router", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "cluster")), (x.shape[-1], k), jnp.float32)
    logits = jnp.einsum("bnc,ck->bnk", x.astype(jnp.float32), router)
    probs = jax.nn.softmax(logits, axis=-1)
    top_k = cfg.moe_top_k
    if top_k is None:
      weights = probs
    else:
      top_p, top_i = jax.lax.top_k(probs, top_k)
      if top_k > 1:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
      weights = jnp.sum(jax.nn.one_hot(top_i, k, dtype=probs.dtype) * top_p[..., None], axis=-2)
    f = jnp.mean(jax.nn.one_hot(jnp.argmax(probs, axis=-1), k), axis=(0, 1))
    self.sow("losses", "moe_aux", k * jnp.sum(f * jnp.mean(probs, axis=(0, 1))))
    return _all_experts(x, weights.astype(x.dtype), p, act)


def _all_experts(x, weights, p, act):
  """sum_k weights[b, n, k] * expert_k(x[b, n]): every expert on every token (K x the FLOPs)."""
  h = act(jnp.einsum("bnc,kcr->bnkr", x, p["down"]) + p["down_bias"])
  out = jnp.einsum("bnkr,krc->bnc", h * weights[..., None], p["up"])
  return out + jnp.einsum("bnk,kc->bnc", weights, p["up_bias"])


def _grasp(x, cluster_ids, p, act, cfg):
  """Per-sample adapter `up_c(act(down_c(x)))` with the sample's rows selected, then applied."""
  k, b = cfg.num_clusters, x.shape[0]
  ids = jnp.asarray(cluster_ids)
  if jnp.issubdtype(ids.dtype, jnp.floating):
    if cfg.gather != "onehot" or ids.shape != (b, k):
      raise ValueError(f"float cluster weights need gather='onehot' and shape (B, K)=({b}, {k}); "
                       f"got gather={cfg.gather!r}, shape {ids.shape}")
    return _all_experts(x, jnp.broadcast_to(ids.astype(x.dtype)[:, None], x.shape[:2] + (k,)),
                        p, act)
  if ids.shape != (b,):
    raise ValueError(f"cluster_ids must be int [B]=[{b}] (or float [B, K] weights), "
                     f"got shape {ids.shape}")
  if cfg.gather == "index":
    # Out-of-range ids (negative ones too) read zeros: an exact no-op adapter for that sample.
    ids = jnp.where((ids >= 0) & (ids < k), ids, k)
    row = {name: jnp.take(w, ids, axis=0, mode="fill", fill_value=0) for name, w in p.items()}
  else:
    onehot = jax.nn.one_hot(ids, k, dtype=x.dtype)  # Zero rows for out-of-range ids.
    row = {name: jnp.einsum("bk,k...->b...", onehot, w) for name, w in p.items()}
  h = act(jnp.einsum("bnc,bcr->bnr", x, row["down"]) + row["down_bias"][:, None])
  return jnp.einsum("bnr,brc->bnc", h, row["up"]) + row["up_bias"][:, None]


# ---------------------------------------------------------------------------------------------
# SeLoRA: Fisher-information-driven rank growth (pure functions on unboxed variable trees).
#
# Trees: `params` is the 'params' collection (full or only the trainable LoRA leaves; paths from
# the same root), `selora_vars` the 'selora' collection, `grads` a gradient tree of `params`.

def _lora_layers(tree):
  """{module path: {'lora_a': ..., 'lora_b': ...}} of every LoRA'd Dense in a nested dict."""
  layers = {}
  for path, leaf in traverse_util.flatten_dict(tree).items():
    if path[-1] in ("lora_a", "lora_b"):
      layers.setdefault(path[:-1], {})[path[-1]] = leaf
  return layers


def _masks(selora_vars):
  return {path[:-1]: m for path, m in traverse_util.flatten_dict(selora_vars).items()
          if path[-1] == "mask"}


def _with_layers(tree, layers):
  """`tree` with the LoRA leaves of `layers` substituted."""
  flat = traverse_util.flatten_dict(tree)
  for path, leaves in layers.items():
    for name, leaf in leaves.items():
      flat[path + (name,)] = leaf
  return traverse_util.unflatten_dict(flat)


def _candidate(mask):
  """One-hot [R] of the next rank to activate (all zeros when the layer is full)."""
  return (jnp.arange(mask.shape[0]) == jnp.sum(mask > 0)).astype(mask.dtype)


def selora_fisher_init(params):
  """Zero accumulators (squared-gradient sums) for every lora_a / lora_b leaf of `params`."""
  return traverse_util.unflatten_dict({
      path: jnp.zeros_like(v) for path, v in traverse_util.flatten_dict(params).items()
      if path[-1] in ("lora_a", "lora_b")})


def selora_fisher_update(fisher_state, grads):
  """Adds the squared gradients (empirical Fisher diagonal) of the LoRA leaves to the sums."""
  flat_g = traverse_util.flatten_dict(grads)
  flat_f = traverse_util.flatten_dict(fisher_state)
  missing = [path for path in flat_f if path not in flat_g]
  if missing:
    names = ["/".join(p) for p in missing[:3]]
    raise ValueError(f"selora_fisher_update: grads lack the LoRA leaves {names}")
  return traverse_util.unflatten_dict({path: f + jnp.square(flat_g[path].astype(f.dtype))
                                       for path, f in flat_f.items()})


def selora_probe(selora_vars):
  """The 'selora' collection with each layer's next rank switched on (see the module docstring);
  the outputs are unchanged because that rank's lora_b row is zero."""
  return traverse_util.unflatten_dict({
      path: (jnp.maximum(m, _candidate(m)) if path[-1] == "mask" else m)
      for path, m in traverse_util.flatten_dict(selora_vars).items()})


def selora_mask_grads(grads, selora_vars):
  """Zeroes the gradients of inactive ranks (needed after a probed backward pass)."""
  masks = _masks(selora_vars)
  layers = {}
  for path, g in _lora_layers(grads).items():
    m = masks[path]
    layers[path] = {"lora_a": g["lora_a"] * m[None, :].astype(g["lora_a"].dtype),
                    "lora_b": g["lora_b"] * m[:, None].astype(g["lora_b"].dtype)}
  return _with_layers(grads, layers)


def selora_fi_ratios(selora_vars, fisher_state):
  """Fisher-information ratio per LoRA'd layer: {module path: ratio}.

  Definition (ours; the paper's exact formula is not public in our notes):
    F(S) = sum of the accumulated squared gradients of the lora_a columns and lora_b rows of the
           ranks in S (the empirical Fisher diagonal, traced over those parameters);
    FI-ratio = F(active + candidate) / F(active),
  the candidate being the next inactive rank (random lora_a column, zero lora_b row), whose
  gradients come from the probed backward pass. This is the quantity of the authors' released
  code as ported by third parties (MIGROS "SeLoRA" port of https://anonymous.4open.science/r/
  SeLoRA-980D): the squared-gradient norm of the LoRA weights with one trial rank appended,
  divided by the one without it; here both are measured on the same batches. It is >= 1, and
  exceeds lambda when one more rank would carry more than (lambda - 1) of the layer's current
  gradient information, which is why lambda is typically 1.0-1.3. 0 when F(active) is 0 or the
  layer is at its maximum rank.
  """
  masks = _masks(selora_vars)
  ratios = {}
  for path, f in _lora_layers(fisher_state).items():
    m = masks[path]
    per_rank = jnp.sum(f["lora_a"], axis=0) + jnp.sum(f["lora_b"], axis=1)  # [R]
    current = jnp.sum(per_rank * (m > 0))
    cand = _candidate(m)
    with_cand = current + jnp.sum(per_rank * cand)
    ok = (current > 0) & (jnp.sum(cand) > 0)
    ratios[path] = jnp.where(ok, with_cand / jnp.where(ok, current, 1.0), 0.0)
  return ratios


def selora_grow(params, selora_vars, fisher_state, threshold):
  """Activates the next rank of every layer whose FI-ratio exceeds `threshold` (lambda).

  The new rank's lora_b row is (re)set to zero so the output does not change; its lora_a column
  keeps its random initialisation. Returns (params, selora_vars, number of layers grown).
  Reset the Fisher sums afterwards (`selora_fisher_init`).
  """
  ratios = selora_fi_ratios(selora_vars, fisher_state)
  lora = _lora_layers(params)
  flat_vars = traverse_util.flatten_dict(selora_vars)
  layers, grown = {}, jnp.zeros((), jnp.int32)
  for path, ratio in ratios.items():
    m = flat_vars[path + ("mask",)]
    new = _candidate(m) * (ratio > threshold)
    flat_vars[path + ("mask",)] = jnp.maximum(m, new)
    b = lora[path]["lora_b"]
    layers[path] = {"lora_a": lora[path]["lora_a"],
                    "lora_b": jnp.where(new[:, None] > 0, jnp.zeros_like(b), b)}
    grown = grown + (jnp.sum(new) > 0).astype(jnp.int32)
  return _with_layers(params, layers), traverse_util.unflatten_dict(flat_vars), grown
