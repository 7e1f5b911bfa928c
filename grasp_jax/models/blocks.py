"""Convolutional building blocks shared by the UNet and the VAE, with diffusers' names and torch's
numerics (zero padding, two-pass group-norm variance, nearest resize, float32 sinusoids)."""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from grasp_jax.models import adapters

# diffusers' activation names.
ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}
CONV_AXES = (None, None, "conv_in", "conv_out")


def conv2d(features, kernel_size, *, stride=1, padding=None, dtype=None, name=None):
  """nn.Conv with torch's zero padding ((k-1)//2 per side unless given) and logical axis names."""
  pad = (kernel_size - 1) // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel_size, kernel_size), strides=stride, padding=pad, dtype=dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                 name=name)


def group_norm(groups, eps, dtype, name):
  """nn.GroupNorm over NHWC with exact (two-pass) variance, as torch computes it."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                      name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
  """diffusers `get_timestep_embedding`: [N] -> [N, dim] float32 sinusoids."""
  half = dim // 2
  # Frequencies in float32 arithmetic, as torch computes them (they multiply t up to ~1000).
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  freqs = np.exp(exponent / np.float32(half - freq_shift))
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def resize_nearest(x, size):
  """torch `F.interpolate(mode='nearest', size=size)` on NHWC: source index floor(i * in / out)."""
  for axis, n_out in zip((1, 2), size):
    n_in = x.shape[axis]
    if n_out == 2 * n_in:
      x = jnp.repeat(x, 2, axis=axis)
    elif n_out != n_in:
      scale = np.float32(n_in) / np.float32(n_out)
      index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32)
      x = jnp.take(x, np.minimum(index, n_in - 1), axis=axis)
  return x


class TimestepEmbedding(nn.Module):
  """diffusers TimestepEmbedding (linear_1, SiLU, linear_2)."""
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = adapters.Dense(self.features, kernel_axes=(None, "mlp"), dtype=self.dtype,
                       name="linear_1")(x)
    return adapters.Dense(self.features, kernel_axes=("mlp", "embed"), dtype=self.dtype,
                          name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D: norm1, conv1, time_emb_proj, norm2, conv2 (+ conv_shortcut).

  Without `temb` (the VAE's blocks) there is no time_emb_proj."""
  out_channels: int
  groups: int
  eps: float
  time_scale_shift: str = "default"  # or "scale_shift"
  output_scale_factor: float = 1.0
  dtype: Any = None
  act_fn: str = "silu"

  @nn.compact
  def __call__(self, x, temb=None):
    act = ACTIVATIONS[self.act_fn]
    h = act(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv2d(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
    norm2 = group_norm(self.groups, self.eps, self.dtype, "norm2")
    if temb is None:
      h = norm2(h)
    else:
      scale_shift = self.time_scale_shift == "scale_shift"
      t = adapters.Dense(self.out_channels * (2 if scale_shift else 1),
                         kernel_axes=(None, "conv_out"), dtype=self.dtype,
                         name="time_emb_proj")(act(temb))[:, None, None, :]
      if scale_shift:
        scale, shift = jnp.split(t, 2, axis=-1)
        h = norm2(h) * (1 + scale) + shift
      else:
        h = norm2(h + t)
    h = conv2d(self.out_channels, 3, dtype=self.dtype, name="conv2")(act(h))
    if x.shape[-1] != self.out_channels:
      x = conv2d(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """diffusers Downsample2D with a conv: 3x3, stride 2; padding 0 means torch's (0, 1, 0, 1) pad."""
  padding: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    p = self.padding
    pad = ((p, p), (p, p)) if p else ((0, 1), (0, 1))
    return conv2d(x.shape[-1], 3, stride=2, padding=pad, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """diffusers Upsample2D: nearest resize to `size` (the skip's size, usually 2x), then 3x3 conv."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x, size):
    return conv2d(x.shape[-1], 3, dtype=self.dtype, name="conv")(resize_nearest(x, size))
