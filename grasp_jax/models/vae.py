"""diffusers `AutoencoderKL` as a Flax linen module (NHWC), loadable from a diffusers folder.

Submodules carry the PyTorch names, so `convert.load_diffusers(folder)` maps the checkpoint:

  module, params = convert.load_diffusers("sd/vae")
  dist = module.apply({"params": params}, images, method=module.encode)    # images [B,H,W,C]
  z = dist.sample(rng)                                                       # or dist.mode()
  images = module.apply({"params": params}, z, method=module.decode)
  latents = module.apply({"params": params}, images, rng, method=module.encode_latents)
  images = module.apply({"params": params}, latents, method=module.decode_latents)

`encode_latents` / `decode_latents` apply the config's `scaling_factor` and `shift_factor`:
`latents = (z - shift) * scale`, which is what a diffusion backbone trains on (per-channel
`latents_mean` / `latents_std`, present in a few newer configs, are not applied).
Images are in [-1, 1], channels last. Only DownEncoderBlock2D / UpDecoderBlock2D blocks exist.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models import adapters
from grasp_jax.models import attention
from grasp_jax.models import blocks



@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior; `logvar` is clamped to [-30, 20] as in diffusers."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, rng):
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, I)) per example, summed over latent pixels and channels."""
    return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block attention: group norm, single-head attention over pixels, residual."""
  groups: int
  head_dim: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = blocks.group_norm(self.groups, 1e-6, self.dtype, "group_norm")(x).reshape(b, h * w, c)
    dense = lambda axes, name: adapters.Dense(c, kernel_axes=axes, dtype=self.dtype, name=name)
    q, k, v = (dense(("embed", "heads"), n)(y) for n in ("to_q", "to_k", "to_v"))
    # diffusers builds this block with upcast_softmax=True.
    y = attention.dot_product_attention(q, k, v, c // self.head_dim, upcast=True)
    y = dense(("heads", "embed"), "to_out_0")(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """UNetMidBlock2D as used by the VAE: resnet, (attention), resnet."""
  groups: int
  act_fn: str
  add_attention: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = blocks.ResnetBlock2D(c, self.groups, 1e-6, dtype=self.dtype, act_fn=self.act_fn, name="resnets_0")(x)
    if self.add_attention:
      x = SpatialSelfAttention(self.groups, c, self.dtype, name="attentions_0")(x)
    return blocks.ResnetBlock2D(c, self.groups, 1e-6, dtype=self.dtype, act_fn=self.act_fn, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  """DownEncoderBlock2D: resnets, then (except in the last block) a stride-2 conv."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int
  act_fn: str
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = blocks.ResnetBlock2D(self.out_channels, self.groups, 1e-6, dtype=self.dtype, act_fn=self.act_fn,
                      name=f"resnets_{j}")(x)
    if self.add_downsample:
      # diffusers pads right/bottom by one, then a stride-2 conv (downsample_padding=0).
      x = blocks.Downsample2D(0, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  """UpDecoderBlock2D: resnets, then (except in the last block) nearest 2x upsampling + conv."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int
  act_fn: str
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = blocks.ResnetBlock2D(self.out_channels, self.groups, 1e-6, dtype=self.dtype, act_fn=self.act_fn,
                      name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = blocks.Upsample2D(self.dtype, name="upsamplers_0")(x, (2 * x.shape[1], 2 * x.shape[2]))
    return x


class Encoder(nn.Module):
  """diffusers vae.Encoder with DownEncoderBlock2D blocks; outputs 2 * latent channels."""
  out_channels: int
  block_out_channels: tuple
  layers_per_block: int
  groups: int
  act_fn: str
  add_attention: bool
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    x = blocks.conv2d(self.block_out_channels[0], 3, dtype=self.dtype, name="conv_in")(x)
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      x = DownEncoderBlock(ch, self.layers_per_block, i < last, self.groups, self.act_fn,
                           self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.act_fn, self.add_attention, self.dtype, name="mid_block")(x)
    x = blocks.ACTIVATIONS[self.act_fn](blocks.group_norm(self.groups, 1e-6, self.dtype, "conv_norm_out")(x))
    return blocks.conv2d(self.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """diffusers vae.Decoder with UpDecoderBlock2D blocks (layers_per_block + 1 resnets each)."""
  out_channels: int
  block_out_channels: tuple
  layers_per_block: int
  groups: int
  act_fn: str
  add_attention: bool
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, z):
    x = blocks.conv2d(self.block_out_channels[-1], 3, dtype=self.dtype, name="conv_in")(z)
    x = MidBlock(self.groups, self.act_fn, self.add_attention, self.dtype, name="mid_block")(x)
    channels = tuple(reversed(self.block_out_channels))
    for i, ch in enumerate(channels):
      x = UpDecoderBlock(ch, self.layers_per_block + 1, i < len(channels) - 1, self.groups,
                         self.act_fn, self.dtype, name=f"up_blocks_{i}")(x)
    x = blocks.ACTIVATIONS[self.act_fn](blocks.group_norm(self.groups, 1e-6, self.dtype, "conv_norm_out")(x))
    return blocks.conv2d(self.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL. Call `encode`, `decode`, `encode_latents`, `decode_latents`."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: jnp.dtype | None = None

  def setup(self):
    common = dict(block_out_channels=self.block_out_channels,
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  act_fn=self.act_fn, add_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = blocks.conv2d(2 * self.latent_channels, 1, dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = blocks.conv2d(self.latent_channels, 1, dtype=self.dtype)

  def encode(self, x):
    """Images [B,H,W,C] -> the posterior over latents [B,H/f,W/f,latent_channels]."""
    h = self.encoder(x)
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z):
    """Unscaled latents [B,h,w,latent_channels] -> images [B,H,W,out_channels]."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def scale_latents(self, z):
    return (z - self.shift_factor) * self.scaling_factor

  def unscale_latents(self, latents):
    return latents / self.scaling_factor + self.shift_factor

  def encode_latents(self, x, rng=None):
    """Images -> scaled latents for the backbone; posterior mean when `rng` is None."""
    dist = self.encode(x)
    return self.scale_latents(dist.mode() if rng is None else dist.sample(rng))

  def decode_latents(self, latents):
    """Scaled latents (what the backbone produces) -> images."""
    return self.decode(self.unscale_latents(latents))

  def __call__(self, x, rng=None):
    """Reconstruction (posterior mean when `rng` is None); also what `init` traces."""
    dist = self.encode(x)
    return self.decode(dist.mode() if rng is None else dist.sample(rng))


def from_config(config):
  """AutoencoderKL from a diffusers `config.json` dict; rejects features this port lacks."""
  for field, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
    bad = [t for t in config.get(field, ()) if t != allowed]
    if bad:
      raise ValueError(f"AutoencoderKL config: {field} {bad} not supported (only {allowed})")
  channels = tuple(config.get("block_out_channels", (64,)))
  for field in ("down_block_types", "up_block_types"):
    if field in config and len(config[field]) != len(channels):
      raise ValueError(f"AutoencoderKL config: {field} has {len(config[field])} entries but "
                       f"block_out_channels has {len(channels)}")
  act = config.get("act_fn", "silu")
  if act not in blocks.ACTIVATIONS:
    raise ValueError(f"AutoencoderKL config: act_fn {act!r} not in {sorted(blocks.ACTIVATIONS)}")
  groups = config.get("norm_num_groups", 32)
  if any(c % groups for c in channels):
    raise ValueError(f"AutoencoderKL config: block_out_channels {channels} not divisible by "
                     f"norm_num_groups={groups}")
  return AutoencoderKL(
      in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
      block_out_channels=channels, layers_per_block=config.get("layers_per_block", 1),
      act_fn=act, latent_channels=config.get("latent_channels", 4), norm_num_groups=groups,
      scaling_factor=config.get("scaling_factor", 0.18215),
      shift_factor=config.get("shift_factor") or 0.0,
      use_quant_conv=config.get("use_quant_conv", True),
      use_post_quant_conv=config.get("use_post_quant_conv", True),
      mid_block_add_attention=config.get("mid_block_add_attention", True))


def example_inputs(module):
  size = 2 ** (len(module.block_out_channels) - 1)
  return (jnp.zeros((1, size, size, module.in_channels), jnp.float32),)


_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                     ".proj_attn.": ".to_out.0."}


def rename(key):
  """Older diffusers VAE folders name the mid-block attention query/key/value/proj_attn."""
  if ".attentions." in key:
    for old, new in _LEGACY_ATTENTION.items():
      key = key.replace(old, new)
  return key
