"""diffusers UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) in flax.linen: NHWC, same parameter tree.

Call convention:

  module.apply({'params': params}, sample, timesteps, encoder_hidden_states,
               cluster_ids=None, added_cond_kwargs=None)  -> prediction [B, H, W, out_channels]

  sample                 [B, H, W, in_channels] (NHWC). H, W need not be multiples of 2**levels.
  timesteps              scalar or [B], int or float.
  encoder_hidden_states  [B, L, cross_attention_dim] (text encoder states).
  cluster_ids            int32 [B] or None: each sample's adapter cluster, passed to the
                         feed-forward of every transformer block; None reproduces the base model.
  added_cond_kwargs      SDXL (`addition_embed_type="text_time"`) only:
                         {'text_embeds': [B, D], 'time_ids': [B, N]}.
  Pass the last two by keyword (they are positional too so that `example_inputs` can give them).
  The output is in the compute dtype. With `mutable=['intermediates']`, the mid-block output is sown
  as ('intermediates', 'bottleneck').

Build with `from_config(config_dict)` from a diffusers `config.json` (options that are not ported
raise a ValueError naming the field), load weights with `convert.load_diffusers(folder)`.
`tiny_config()` is the small text-conditioned UNet of the CPU demo.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import adapters
from grasp_jax.models import attention
from grasp_jax.models import blocks

class Transformer2DModel(nn.Module):
  """diffusers Transformer2DModel on NHWC input: norm, proj_in, transformer_blocks, proj_out.

  Head width is channels // heads, as in the UNet blocks.
  """
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast: bool = False
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, context, cluster_ids=None):
    b, height, width, c = x.shape
    dim_head = c // self.heads
    inner = self.heads * dim_head
    h = blocks.group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      h = adapters.Dense(inner, kernel_axes=(None, "embed"), dtype=self.dtype,
                         name="proj_in")(h.reshape(b, height * width, c))
    else:
      h = blocks.conv2d(inner, 1, dtype=self.dtype, name="proj_in")(h).reshape(b, height * width, inner)
    block = _RematTransformerBlock if self.remat else attention.BasicTransformerBlock
    for i in range(self.num_layers):
      h = block(self.heads, dim_head, upcast=self.upcast, adapter=self.adapter, dtype=self.dtype,
                name=f"transformer_blocks_{i}")(h, context, cluster_ids)
    if self.use_linear_projection:
      h = adapters.Dense(c, kernel_axes=("embed", None), dtype=self.dtype,
                         name="proj_out")(h).reshape(b, height, width, c)
    else:
      h = blocks.conv2d(c, 1, dtype=self.dtype, name="proj_out")(h.reshape(b, height, width, inner))
    return h + x


_RematTransformerBlock = nn.remat(attention.BasicTransformerBlock)
_RematResnet = nn.remat(blocks.ResnetBlock2D)


@dataclasses.dataclass(frozen=True)
class _Shared:
  """Settings every block of one UNet shares."""
  groups: int
  eps: float
  time_scale_shift: str
  use_linear_projection: bool
  upcast_attention: bool
  adapter: adapters.AdapterConfig
  dtype: Any
  remat: bool

  def resnet(self, out_channels, name, output_scale_factor=1.0):
    cls = _RematResnet if self.remat else blocks.ResnetBlock2D
    return cls(out_channels, self.groups, self.eps, self.time_scale_shift, output_scale_factor,
               self.dtype, name=name)

  def transformer(self, heads, num_layers, name):
    return Transformer2DModel(heads, num_layers, self.groups, self.use_linear_projection,
                              self.upcast_attention, self.adapter, self.dtype, self.remat,
                              name=name)


class DownBlock2D(nn.Module):
  """diffusers DownBlock2D, or CrossAttnDownBlock2D when `transformer_layers` (per layer) is set."""
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: tuple
  add_downsample: bool
  downsample_padding: int
  shared: _Shared

  @nn.compact
  def __call__(self, x, temb, context, cluster_ids):
    outputs = []
    for i in range(self.num_layers):
      x = self.shared.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.transformer_layers:
        x = self.shared.transformer(self.heads, self.transformer_layers[i],
                                    f"attentions_{i}")(x, context, cluster_ids)
      outputs.append(x)
    if self.add_downsample:
      x = blocks.Downsample2D(self.downsample_padding, self.shared.dtype, name="downsamplers_0")(x)
      outputs.append(x)
    return x, outputs


class UpBlock2D(nn.Module):
  """diffusers UpBlock2D, or CrossAttnUpBlock2D when `transformer_layers` (per layer) is set."""
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: tuple
  add_upsample: bool
  shared: _Shared

  @nn.compact
  def __call__(self, x, skips, temb, context, cluster_ids, upsample_size):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self.shared.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.transformer_layers:
        x = self.shared.transformer(self.heads, self.transformer_layers[i],
                                    f"attentions_{i}")(x, context, cluster_ids)
    if self.add_upsample:
      x = blocks.Upsample2D(self.shared.dtype, name="upsamplers_0")(x, upsample_size)
    return x


class UNetMidBlock2DCrossAttn(nn.Module):
  """diffusers UNetMidBlock2DCrossAttn: resnets.0, attentions.0, resnets.1."""
  heads: int
  transformer_layers: int
  output_scale_factor: float
  shared: _Shared

  @nn.compact
  def __call__(self, x, temb, context, cluster_ids):
    c = x.shape[-1]
    x = self.shared.resnet(c, "resnets_0", self.output_scale_factor)(x, temb)
    x = self.shared.transformer(self.heads, self.transformer_layers, "attentions_0")(
        x, context, cluster_ids)
    return self.shared.resnet(c, "resnets_1", self.output_scale_factor)(x, temb)


class UNet2DConditionModel(nn.Module):
  """The diffusers UNet2DConditionModel; fields are the normalised config (see `from_config`).

  Per-block tuples follow `down_block_types`; the up path uses them reversed, as diffusers does.
  `in_channels`, `cross_attention_dim` and `projection_class_embeddings_input_dim` only check inputs
  (the layers infer their input widths).
  """
  in_channels: int
  out_channels: int
  block_out_channels: tuple
  down_block_types: tuple
  up_block_types: tuple
  layers_per_block: tuple  # per down block; each up block has one more
  heads: tuple  # per block: diffusers' `attention_head_dim` (really the number of heads)
  down_transformer_layers: tuple  # per down block, per layer; () for blocks without attention
  mid_transformer_layers: int
  up_transformer_layers: tuple  # per up block, per layer
  cross_attention_dim: int
  time_embed_dim: int
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  resnet_time_scale_shift: str = "default"
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  center_input_sample: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  addition_embed_type: str | None = None  # None or "text_time" (SDXL)
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: Any = None  # compute dtype; parameters stay float32
  remat: bool = False  # rematerialise resnets and transformer blocks in the backward pass

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, cluster_ids=None,
               added_cond_kwargs=None):
    self._check_inputs(sample, encoder_hidden_states)
    b = sample.shape[0]
    if self.center_input_sample:
      sample = 2 * sample - 1.0
    t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (b,))
    t_emb = blocks.timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
    emb = blocks.TimestepEmbedding(self.time_embed_dim, self.dtype, name="time_embedding")(t_emb)
    if self.addition_embed_type == "text_time":
      emb = emb + self._text_time_embedding(added_cond_kwargs, b)

    shared = _Shared(self.norm_num_groups, self.norm_eps, self.resnet_time_scale_shift,
                     self.use_linear_projection, self.upcast_attention, self.adapter, self.dtype,
                     self.remat)
    h = blocks.conv2d(self.block_out_channels[0], self.conv_in_kernel, dtype=self.dtype,
               name="conv_in")(sample)
    skips = [h]
    n = len(self.block_out_channels)
    for i in range(n):
      h, outputs = DownBlock2D(self.block_out_channels[i], self.layers_per_block[i], self.heads[i],
                               self.down_transformer_layers[i], i < n - 1, self.downsample_padding,
                               shared, name=f"down_blocks_{i}")(h, emb, encoder_hidden_states,
                                                                cluster_ids)
      skips.extend(outputs)

    h = UNetMidBlock2DCrossAttn(self.heads[-1], self.mid_transformer_layers,
                                self.mid_block_scale_factor, shared, name="mid_block")(
                                    h, emb, encoder_hidden_states, cluster_ids)
    self.sow("intermediates", "bottleneck", h)

    for i in range(n):
      num_layers = self.layers_per_block[n - 1 - i] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      final = i == n - 1
      h = UpBlock2D(self.block_out_channels[n - 1 - i], num_layers, self.heads[n - 1 - i],
                    self.up_transformer_layers[i], not final, shared, name=f"up_blocks_{i}")(
                        h, block_skips, emb, encoder_hidden_states, cluster_ids,
                        None if final else skips[-1].shape[1:3])

    h = nn.silu(blocks.group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
    return blocks.conv2d(self.out_channels, self.conv_out_kernel, dtype=self.dtype, name="conv_out")(h)

  def _check_inputs(self, sample, encoder_hidden_states):
    if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
      raise ValueError(f"sample must be NHWC with {self.in_channels} channels, got shape "
                       f"{sample.shape}")
    context = encoder_hidden_states
    if context.ndim != 3 or context.shape[-1] != self.cross_attention_dim:
      raise ValueError(f"encoder_hidden_states must be [B, L, {self.cross_attention_dim}], got "
                       f"shape {context.shape}")

  def _text_time_embedding(self, added_cond_kwargs, b):
    """SDXL: add_embedding(concat(text_embeds, sinusoids(time_ids)))."""
    missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
    if missing:
      raise ValueError(f"addition_embed_type 'text_time' needs added_cond_kwargs {missing}")
    text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"], jnp.float32)
    time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
    time_embeds = blocks.timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                     self.flip_sin_to_cos, self.freq_shift).reshape(b, -1)
    add = jnp.concatenate([text_embeds, time_embeds], axis=-1)
    if add.shape[-1] != self.projection_class_embeddings_input_dim:
      raise ValueError(f"text_embeds {text_embeds.shape} + embedded time_ids {time_ids.shape} give "
                       f"{add.shape[-1]} features, projection_class_embeddings_input_dim is "
                       f"{self.projection_class_embeddings_input_dim}")
    return blocks.TimestepEmbedding(self.time_embed_dim, self.dtype, name="add_embedding")(add)


# diffusers UNet2DConditionModel.__init__ defaults (diffusers 0.39), for fields a config.json omits.
_DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None,
    addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64)

# Fields whose other values change the architecture in ways not ported here. (resnet_skip_time_act,
# resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention and
# addition_embed_type_num_heads are ignored by diffusers for the supported block types.)
_SUPPORTED = dict(
    mid_block_type=("UNetMidBlock2DCrossAttn",), dropout=(0,), act_fn=("silu", "swish"),
    encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), num_attention_heads=(None,),
    dual_cross_attention=(False,), class_embed_type=(None,), num_class_embeds=(None,),
    addition_embed_type=(None, "text_time"), resnet_time_scale_shift=("default", "scale_shift"),
    time_embedding_type=("positional",), time_embedding_act_fn=(None,), timestep_post_act=(None,),
    time_cond_proj_dim=(None,), attention_type=("default",), class_embeddings_concat=(False,))
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _config_error(field, value, why):
  return ValueError(f"UNet2DConditionModel config: {field}={value!r} {why}")


def from_config(config, *, adapter=adapters.AdapterConfig(), dtype=None, remat=False):
  """A diffusers UNet2DConditionModel config dict (config.json) -> UNet2DConditionModel."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
  if unknown:
    raise ValueError(f"UNet2DConditionModel config: unknown field(s) {unknown}")
  c = dict(_DEFAULTS)
  c.update({k: v for k, v in config.items() if not k.startswith("_")})
  for field, allowed in _SUPPORTED.items():
    if c[field] not in allowed:
      raise _config_error(field, c[field], f"is not supported (supported: {allowed})")
  only_cross = c["only_cross_attention"]
  if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]):
    raise _config_error("only_cross_attention", only_cross, "is not supported (only False)")
  if not isinstance(c["norm_num_groups"], int):
    raise _config_error("norm_num_groups", c["norm_num_groups"], "is not supported (need an int)")

  down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
  n = len(down)
  for field, types, allowed in (("down_block_types", down, _DOWN_TYPES),
                                ("up_block_types", up, _UP_TYPES)):
    if any(t not in allowed for t in types):
      raise _config_error(field, list(types), f"is not supported (block types: {allowed})")
  if len(up) != n or len(c["block_out_channels"]) != n:
    raise _config_error("up_block_types", list(up), "and block_out_channels must match "
                        f"down_block_types in length ({n})")

  def per_block(field):
    value = c[field]
    if isinstance(value, int):
      return (value,) * n
    if len(value) != n:
      raise _config_error(field, value, f"needs one entry per block ({n})")
    return tuple(value)

  layers = per_block("layers_per_block")
  cross_dims = per_block("cross_attention_dim")
  if len(set(cross_dims)) != 1:
    raise _config_error("cross_attention_dim", c["cross_attention_dim"],
                        "is not supported (blocks must share one cross-attention width)")

  def per_layer(field, value, num_layers, has_attention):
    if not has_attention:
      return ()
    out = (value,) * num_layers if isinstance(value, int) else tuple(value)
    if len(out) != num_layers:
      raise _config_error(field, c[field], f"needs {num_layers} entries for a block")
    return out

  tl = per_block("transformer_layers_per_block")
  nested = any(not isinstance(t, int) for t in tl)
  reverse = c["reverse_transformer_layers_per_block"]
  if reverse is None:
    if nested:
      raise _config_error("reverse_transformer_layers_per_block", None,
                          "must be given when transformer_layers_per_block is nested")
    reverse = tl[::-1]
  elif len(reverse) != n:
    raise _config_error("reverse_transformer_layers_per_block", reverse, f"needs {n} entries")
  down_tl = tuple(per_layer("transformer_layers_per_block", tl[i], layers[i],
                            down[i] == "CrossAttnDownBlock2D") for i in range(n))
  up_tl = tuple(per_layer("reverse_transformer_layers_per_block", reverse[i], layers[n - 1 - i] + 1,
                          up[i] == "CrossAttnUpBlock2D") for i in range(n))
  mid_tl = tl[-1] if isinstance(tl[-1], int) else tl[-1][0]

  text_time = c["addition_embed_type"] == "text_time"
  if text_time:
    for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
      if not isinstance(c[field], int):
        raise _config_error(field, c[field], "must be an int for addition_embed_type 'text_time'")

  return UNet2DConditionModel(
      in_channels=c["in_channels"], out_channels=c["out_channels"],
      block_out_channels=tuple(c["block_out_channels"]), down_block_types=down, up_block_types=up,
      layers_per_block=layers, heads=per_block("attention_head_dim"),
      down_transformer_layers=down_tl, mid_transformer_layers=mid_tl, up_transformer_layers=up_tl,
      cross_attention_dim=cross_dims[0],
      time_embed_dim=c["time_embedding_dim"] or 4 * c["block_out_channels"][0],
      norm_num_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
      use_linear_projection=c["use_linear_projection"], upcast_attention=c["upcast_attention"],
      flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"],
      resnet_time_scale_shift=c["resnet_time_scale_shift"],
      downsample_padding=c["downsample_padding"],
      mid_block_scale_factor=c["mid_block_scale_factor"],
      center_input_sample=c["center_input_sample"], conv_in_kernel=c["conv_in_kernel"],
      conv_out_kernel=c["conv_out_kernel"], addition_embed_type=c["addition_embed_type"],
      addition_time_embed_dim=c["addition_time_embed_dim"] if text_time else None,
      projection_class_embeddings_input_dim=(c["projection_class_embeddings_input_dim"]
                                             if text_time else None),
      adapter=adapter, dtype=dtype, remat=remat)


def example_inputs(module):
  """Smallest inputs that build every parameter: for `jax.eval_shape(module.init, rng, *inputs)`."""
  side = 2 ** (len(module.block_out_channels) - 1)
  inputs = (jnp.zeros((1, side, side, module.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, module.cross_attention_dim)), None)
  if module.addition_embed_type != "text_time":
    return inputs
  text_dim = module.projection_class_embeddings_input_dim - module.addition_time_embed_dim
  return inputs + ({"text_embeds": jnp.zeros((1, text_dim)), "time_ids": jnp.zeros((1, 1))},)


def tiny_config(**overrides):
  """The CPU demo's small text-conditioned UNet as a diffusers config dict.

  28x28 grey images padded/resized to 32x32 (in/out_channels 1), conditioned on MiniLM sentence
  embeddings (cross_attention_dim 384). Attention only at 16x16 and 8x8, as SDXL skips it at full
  resolution. `overrides` replace fields (diffusers names); works with `from_config` here and with
  `diffusers.UNet2DConditionModel.from_config`.
  """
  config = dict(
      _class_name="UNet2DConditionModel", sample_size=32, in_channels=1, out_channels=1,
      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
      block_out_channels=[32, 64, 128], layers_per_block=1, norm_num_groups=8,
      attention_head_dim=4, cross_attention_dim=384, use_linear_projection=True)
  unknown = sorted(set(overrides) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f"tiny_config: unknown UNet2DConditionModel field(s) {unknown}")
  config.update(overrides)
  return config
