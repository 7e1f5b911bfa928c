"""SD3 MMDiT (diffusers `SD3Transformer2DModel`) in Flax linen, for flow matching.

Call convention (NHWC in and out):

  v = module.apply({'params': p}, x, context, pooled, timestep, *, cluster_ids=None)

  x:           [B, H, W, in_channels] latents or pixels; H, W multiples of `patch_size`.
  context:     [B, L, joint_attention_dim] token embeddings (diffusers `encoder_hidden_states`).
  pooled:      [B, pooled_projection_dim] pooled text embedding (`pooled_projections`).
  timestep:    [B] or scalar, float, on diffusers' scale (sigma * 1000 for flow matching).
  cluster_ids: int32 [B] -> the adapter site of every FeedForward (`ff`, and `ff_context` unless
               `context_adapter=False`); None reproduces the frozen base.
  v:           [B, H, W, out_channels] velocity prediction, in the compute dtype.

With `mutable=['intermediates']` the image tokens [B, N, D] after the middle block
(index (num_layers - 1) // 2) are sown as 'bottleneck'.

Parameter names mirror the PyTorch modules, so `convert.load_diffusers(folder)` loads a diffusers
checkpoint. The 2-D sincos table (`pos_embed.pos_embed`, a fixed buffer) is recomputed here.
Supported: SD3 (qk_norm None) and SD3.5 (qk_norm 'rms_norm', `dual_attention_layers`), plus
qk_norm 'layer_norm'.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.models import adapters
from grasp_jax.models import attention
from grasp_jax.models import blocks

QK_NORMS = (None, "rms_norm", "layer_norm")
_EPS = 1e-6  # Every norm of the SD3 transformer uses this epsilon.


def pos_embed_table(dim, height, width, base_size, max_size=None):
  """Fixed 2-D sincos positional table [height * width, dim] for a grid of patches (numpy).

  Follows diffusers' PatchEmbed: coordinates are `arange(n) / (n / base_size)` in float32 with
  n = `max_size` (then the centre `height x width` crop) or n = height / width when there is no
  maximum; the first half of the channels encodes the column, the second half the row; the
  frequencies are float64.
  """
  if dim % 4:
    raise ValueError(f"the sincos positional embedding needs a width divisible by 4, got {dim}")
  if max_size:
    if height > max_size or width > max_size:
      raise ValueError(f"a {height}x{width} patch grid exceeds pos_embed_max_size={max_size}")
    coords = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
    top, left = (max_size - height) // 2, (max_size - width) // 2
    rows, cols = coords[top:top + height], coords[left:left + width]
  else:
    rows = np.arange(height, dtype=np.float32) / np.float32(height / base_size)
    cols = np.arange(width, dtype=np.float32) / np.float32(width / base_size)
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def sincos(pos):
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  r, c = np.meshgrid(rows, cols, indexing="ij")
  return np.concatenate([sincos(c.ravel()), sincos(r.ravel())], axis=1).astype(np.float32)


def _layer_norm(x):
  """Parameter-free LayerNorm (eps 1e-6) with float32 statistics."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


class PatchEmbed(nn.Module):
  """diffusers PatchEmbed: `proj` conv with kernel = stride = patch, plus the sincos table."""
  embed_dim: int
  patch_size: int
  base_size: int
  pos_embed_max_size: int | None
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    b, height, width, _ = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"input {height}x{width} is not a multiple of patch_size={p}")
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                name="proj")(x)
    h, w = height // p, width // p
    pos = pos_embed_table(self.embed_dim, h, w, self.base_size, self.pos_embed_max_size)
    return x.reshape(b, h * w, self.embed_dim) + jnp.asarray(pos, x.dtype)


class CombinedTimestepTextProjEmbeddings(nn.Module):
  """Conditioning vector: MLP(sinusoid(t)) + MLP(pooled text)."""
  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, timestep, pooled):
    t = blocks.TimestepEmbedding(self.features, self.dtype, name="timestep_embedder")(
        blocks.timestep_embedding(timestep, 256, True, 0).astype(self.dtype))
    return t + blocks.TimestepEmbedding(self.features, self.dtype, name="text_embedder")(pooled)


class AdaModulation(nn.Module):
  """SiLU -> `linear` -> `num` chunks [B, 1, D] of shift/scale/gate vectors.

  The linear of diffusers' AdaLayerNormZero (num=6: shift, scale, gate for attention then MLP),
  SD35AdaLayerNormZeroX (num=9: plus shift, scale, gate of `attn2`) and AdaLayerNormContinuous
  (num=2: scale, shift); their LayerNorms carry no parameters and are applied by the caller.
  """
  num: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, emb):
    out = adapters.Dense(self.num * emb.shape[-1], kernel_axes=("embed", None), dtype=self.dtype,
                         name="linear")(nn.silu(emb))
    return jnp.split(out[:, None, :], self.num, axis=-1)


class JointAttention(nn.Module):
  """diffusers Attention with JointAttnProcessor2_0: one softmax over [image; context] tokens.

  context_pre_only: False -> both streams are updated (`to_out_0`, `to_add_out`); True -> the
  context only supplies keys and values (last block); None -> plain self-attention over the
  image tokens without context projections (SD3.5's `attn2`).
  """
  num_heads: int
  head_dim: int
  context_pre_only: bool | None = False
  qk_norm: str | None = None
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: jnp.dtype = jnp.float32

  def _project(self, x, name, norm_name=None):
    inner = self.num_heads * self.head_dim
    y = adapters.Dense(inner, kernel_axes=("embed", "heads"), adapter=self.adapter,
                       dtype=self.dtype, name=name)(x)
    if norm_name is None or self.qk_norm is None:
      return y
    # Per-head norm over head_dim (diffusers norm_q / norm_k / norm_added_q / norm_added_k).
    kw = dict(epsilon=_EPS, dtype=self.dtype, name=norm_name,
              scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))
    if self.qk_norm == "rms_norm":
      norm = nn.RMSNorm(**kw)
    elif self.qk_norm == "layer_norm":
      norm = nn.LayerNorm(use_fast_variance=False,
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          **kw)
    else:
      raise ValueError(f"qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
    b, n, _ = y.shape
    return norm(y.reshape(b, n, self.num_heads, self.head_dim)).reshape(b, n, inner)

  @nn.compact
  def __call__(self, x, context=None):
    dim = x.shape[-1]
    q = self._project(x, "to_q", "norm_q")
    k = self._project(x, "to_k", "norm_k")
    v = self._project(x, "to_v")
    if self.context_pre_only is not None:
      cq = self._project(context, "add_q_proj", "norm_added_q")
      k = jnp.concatenate([k, self._project(context, "add_k_proj", "norm_added_k")], axis=1)
      v = jnp.concatenate([v, self._project(context, "add_v_proj")], axis=1)
      # diffusers discards the context rows of the last block's output, so their queries are
      # skipped (add_q_proj still exists for the checkpoint; XLA removes the unused product).
      if not self.context_pre_only:
        q = jnp.concatenate([q, cq], axis=1)
    out = attention.dot_product_attention(q, k, v, self.num_heads)
    n = x.shape[1]
    x_out = adapters.Dense(dim, kernel_axes=("heads", "embed"), adapter=self.adapter,
                           dtype=self.dtype, name="to_out_0")(out[:, :n])
    if self.context_pre_only is None:
      return x_out
    if self.context_pre_only:
      return x_out, None
    c_out = adapters.Dense(context.shape[-1], kernel_axes=("heads", "embed"), adapter=self.adapter,
                           dtype=self.dtype, name="to_add_out")(out[:, n:])
    return x_out, c_out


class JointTransformerBlock(nn.Module):
  """diffusers JointTransformerBlock: adaLN-Zero modulated joint attention and two FFNs.

  Returns (context, x); context is None after a `context_pre_only` block (the last one).
  """
  num_heads: int
  head_dim: int
  context_pre_only: bool = False
  qk_norm: str | None = None
  dual_attention: bool = False
  context_adapter: bool = True
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb, cluster_ids=None):
    attn_kw = dict(num_heads=self.num_heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                   adapter=self.adapter, dtype=self.dtype)
    ff_kw = dict(activation="gelu-approximate", adapter=self.adapter, dtype=self.dtype)
    mods = AdaModulation(9 if self.dual_attention else 6, self.dtype, name="norm1")(temb)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    x_norm = _layer_norm(x)
    if self.context_pre_only:
      c_scale, c_shift = AdaModulation(2, self.dtype, name="norm1_context")(temb)
    else:
      c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaModulation(
          6, self.dtype, name="norm1_context")(temb)
    attn_x, attn_c = JointAttention(context_pre_only=self.context_pre_only, name="attn",
                                    **attn_kw)(x_norm * (1 + scale) + shift,
                                               _layer_norm(context) * (1 + c_scale) + c_shift)
    x = x + gate * attn_x
    if self.dual_attention:
      shift2, scale2, gate2 = mods[6:]
      x = x + gate2 * JointAttention(context_pre_only=None, name="attn2", **attn_kw)(
          x_norm * (1 + scale2) + shift2)
    ff = attention.FeedForward(name="ff", **ff_kw)
    x = x + gate_mlp * ff(_layer_norm(x) * (1 + scale_mlp) + shift_mlp, cluster_ids)
    if self.context_pre_only:
      return None, x
    context = context + c_gate * attn_c
    ff_context = attention.FeedForward(name="ff_context", **ff_kw)
    context = context + c_gate_mlp * ff_context(
        _layer_norm(context) * (1 + c_scale_mlp) + c_shift_mlp,
        cluster_ids if self.context_adapter else None)
    return context, x


class MMDiT(nn.Module):
  """SD3 / SD3.5 MMDiT; fields as in the diffusers config (see the module docstring for the call).

  `caption_projection_dim` is not a field: it must equal the width heads * head_dim.
  context_adapter: False keeps the adapter site of `ff_context` off (image stream only).
  """
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int | None = 96
  dual_attention_layers: tuple = ()
  qk_norm: str | None = None
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  context_adapter: bool = True
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, context, pooled, timestep, *, cluster_ids=None):
    dim = self.num_attention_heads * self.attention_head_dim
    b, height, width, _ = x.shape
    p = self.patch_size
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
    h = PatchEmbed(dim, p, self.sample_size // p, self.pos_embed_max_size, self.dtype,
                   name="pos_embed")(x.astype(self.dtype))
    temb = CombinedTimestepTextProjEmbeddings(dim, self.dtype, name="time_text_embed")(
        timestep, pooled.astype(self.dtype))
    ctx = adapters.Dense(dim, kernel_axes=(None, "embed"), dtype=self.dtype,
                         name="context_embedder")(context.astype(self.dtype))
    block = nn.remat(JointTransformerBlock) if self.remat else JointTransformerBlock
    for i in range(self.num_layers):
      ctx, h = block(self.num_attention_heads, self.attention_head_dim,
                     context_pre_only=i == self.num_layers - 1, qk_norm=self.qk_norm,
                     dual_attention=i in self.dual_attention_layers,
                     context_adapter=self.context_adapter, adapter=self.adapter, dtype=self.dtype,
                     name=f"transformer_blocks_{i}")(h, ctx, temb, cluster_ids)
      if i == (self.num_layers - 1) // 2:
        self.sow("intermediates", "bottleneck", h)
    scale, shift = AdaModulation(2, self.dtype, name="norm_out")(temb)
    h = _layer_norm(h) * (1 + scale) + shift
    h = adapters.Dense(p * p * self.out_channels, kernel_axes=("embed", None), dtype=self.dtype,
                       name="proj_out")(h)
    h = h.reshape(b, height // p, width // p, p, p, self.out_channels)
    return h.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, self.out_channels)


_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
           "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "out_channels",
           "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def from_config(config, **fields):
  """A diffusers SD3Transformer2DModel config dict -> MMDiT; `fields` set adapter/dtype/remat."""
  cfg = {k: v for k, v in config.items() if not k.startswith("_")}
  where = "SD3Transformer2DModel config"
  unknown = sorted(set(cfg) - set(_FIELDS) - {"caption_projection_dim"})
  if unknown:
    raise ValueError(f"{where}: unsupported field(s) {unknown}")
  kwargs = {k: cfg[k] for k in _FIELDS if k in cfg}
  defaults = MMDiT()
  get = lambda k: kwargs.get(k, getattr(defaults, k))
  if kwargs.get("out_channels", 0) is None:
    kwargs["out_channels"] = get("in_channels")
  width = get("num_attention_heads") * get("attention_head_dim")
  caption = cfg.get("caption_projection_dim", 1152)
  if caption != width:
    raise ValueError(f"{where}: caption_projection_dim={caption} must equal num_attention_heads "
                     f"* attention_head_dim = {width} (the joint blocks need equal widths)")
  if width % 4:
    raise ValueError(f"{where}: width num_attention_heads * attention_head_dim = {width} must be "
                     "divisible by 4 (2-D sincos positional embedding)")
  if get("qk_norm") not in QK_NORMS:
    raise ValueError(f"{where}: qk_norm={get('qk_norm')!r} is not supported (one of {QK_NORMS})")
  dual = tuple(get("dual_attention_layers") or ())
  if any(not isinstance(i, int) or not 0 <= i < get("num_layers") for i in dual):
    raise ValueError(f"{where}: dual_attention_layers={list(dual)} must be block indices in "
                     f"[0, num_layers={get('num_layers')})")
  kwargs["dual_attention_layers"] = dual
  return MMDiT(**kwargs, **fields)


def example_inputs(module):
  """Smallest-shape inputs for `jax.eval_shape(module.init, key, *example_inputs(module))`."""
  p = module.patch_size
  side = max(module.sample_size // p, 1)
  if module.pos_embed_max_size:
    side = min(side, module.pos_embed_max_size)
  return (jnp.zeros((1, side * p, side * p, module.in_channels)),
          jnp.zeros((1, 8, module.joint_attention_dim)),
          jnp.zeros((1, module.pooled_projection_dim)),
          jnp.zeros((1,)))


def buffers(module):
  """Non-parameter tensors diffusers saves with the weights (for export): the sincos table."""
  m = module.pos_embed_max_size
  if not m:  # diffusers keeps the table out of the checkpoint then.
    return {}
  dim = module.num_attention_heads * module.attention_head_dim
  return {"pos_embed.pos_embed": pos_embed_table(dim, m, m, module.sample_size // module.patch_size,
                                                 m)[None]}


def rename(key):
  """Drops the fixed positional buffer that diffusers saves (it is recomputed here)."""
  return None if key == "pos_embed.pos_embed" else key


def tiny_config(**overrides):
  """A small diffusers-style SD3 config for CPU demos and tests.

  32x32 single-channel input, patch 4 (64 image tokens), width 128, 4 blocks; text embeddings
  from MiniLM (384-d tokens and pooled vector).
  """
  config = dict(_class_name="SD3Transformer2DModel", sample_size=32, patch_size=4, in_channels=1,
                out_channels=1, num_layers=4, attention_head_dim=32, num_attention_heads=4,
                joint_attention_dim=384, caption_projection_dim=128, pooled_projection_dim=384,
                pos_embed_max_size=8, dual_attention_layers=(), qk_norm=None)
  config.update(overrides)
  if "caption_projection_dim" not in overrides:
    config["caption_projection_dim"] = (config["num_attention_heads"] *
                                        config["attention_head_dim"])
  return config
