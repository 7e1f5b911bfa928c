"""Attention and the feed-forward layer that hosts the adapter site (shared by UNet and MMDiT)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models import adapters


def dot_product_attention(q, k, v, num_heads, *, mask=None, upcast=False):
  """Multi-head attention on flattened heads: q [B,N,H*D], k/v [B,M,H*D] -> [B,N,H*D].

  Goes through jax.nn.dot_product_attention so GPUs can pick the fused cuDNN kernel.
  `upcast` computes the softmax in fp32 (diffusers' `upcast_attention`).
  """
  b, n, inner = q.shape
  head_dim = inner // num_heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim)
  dtype = q.dtype
  if upcast:
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  out = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask)
  return out.reshape(b, n, inner).astype(dtype)


class FeedForward(nn.Module):
  """diffusers FeedForward (`net.0.proj`, `net.2`) plus the residual adapter site.

  activation: 'geglu' (SD UNets), 'gelu-approximate' (SD3), 'gelu'.
  Output: `ffn(x) + adapter(x, cluster_ids)`; the adapter delta is zero for methods without one.
  """
  dim_out: int | None = None
  mult: int = 4
  inner_dim: int | None = None
  activation: str = "geglu"
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, cluster_ids=None):
    dim = x.shape[-1]
    inner = self.inner_dim or dim * self.mult
    h = _GatedGELU(inner, self.activation, self.adapter, self.dtype, name="net_0")(x)
    out = adapters.Dense(self.dim_out or dim, kernel_axes=("mlp", "embed"), adapter=self.adapter,
                         dtype=self.dtype, name="net_2")(h)
    return out + adapters.FFNAdapter(self.adapter, name="adapter")(x, cluster_ids)


class _GatedGELU(nn.Module):
  """diffusers GEGLU / GELU activation modules: a `proj` Dense then the (gated) GELU."""
  inner: int
  activation: str
  adapter: adapters.AdapterConfig
  dtype: jnp.dtype | None

  @nn.compact
  def __call__(self, x):
    if self.activation not in ("geglu", "gelu", "gelu-approximate"):
      raise ValueError(f"unknown feed-forward activation {self.activation!r}")
    width = 2 * self.inner if self.activation == "geglu" else self.inner
    h = adapters.Dense(width, kernel_axes=("embed", "mlp"), adapter=self.adapter,
                       dtype=self.dtype, name="proj")(x)
    if self.activation == "geglu":
      h, gate = jnp.split(h, 2, axis=-1)
      return h * jax.nn.gelu(gate, approximate=False)
    return jax.nn.gelu(h, approximate=self.activation == "gelu-approximate")
