"""Pieces shared by the transformers-style text encoders (CLIP, BERT): activations, norms,
embeddings and the attention block, named as transformers names them."""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import adapters
from grasp_jax.models import attention

# transformers' ACT2FN names.
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
}


def check_activation(name, source):
  if name not in ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act {name!r} not in {sorted(ACTIVATIONS)}")


def layer_norm(eps, name, dtype=None):
  return nn.LayerNorm(
      epsilon=eps, use_fast_variance=False, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def embed(num, features, axes, name, dtype=None):
  return nn.Embed(num, features, dtype=dtype, name=name,
                  embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(0.02), axes))


class MultiHeadAttention(nn.Module):
  """Self-attention whose q/k/v (and optional output) projections carry the checkpoint's names."""
  num_heads: int
  qkv_names: tuple
  out_name: str | None = None  # BERT keeps its output projection in a sibling module
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    q, k, v = (adapters.Dense(width, kernel_axes=("embed", "heads"), dtype=self.dtype,
                              name=n)(x) for n in self.qkv_names)
    y = attention.dot_product_attention(q, k, v, self.num_heads, mask=mask)
    if self.out_name:
      y = adapters.Dense(width, kernel_axes=("heads", "embed"), dtype=self.dtype,
                         name=self.out_name)(y)
    return y




def fields(cls, config, **overrides):
  """A config dataclass from a transformers config dict (unknown keys dropped)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in config.items() if k in names}, **overrides)


def example_inputs(module):
  length = min(8, module.config.max_position_embeddings)
  return (jnp.zeros((1, length), jnp.int32),)
