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


def layer_norm(eps, dtype, name):
  """nn.LayerNorm with exact (two-pass) variance, as torch computes it, and logical axis names."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class Attention(nn.Module):
  """diffusers `Attention` (to_q, to_k, to_v, to_out.0): self-, or cross-attention on `context`."""
  heads: int
  dim_head: int
  upcast: bool = False
  qkv_bias: bool = False
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head

    def dense(features, axes, use_bias, name):
      return adapters.Dense(features, use_bias=use_bias, kernel_axes=axes, adapter=self.adapter,
                            dtype=self.dtype, name=name)

    q = dense(inner, ("embed", "heads"), self.qkv_bias, "to_q")(x)
    k = dense(inner, ("embed", "heads"), self.qkv_bias, "to_k")(context)
    v = dense(inner, ("embed", "heads"), self.qkv_bias, "to_v")(context)
    out = dot_product_attention(q, k, v, self.heads, upcast=self.upcast)
    return dense(x.shape[-1], ("heads", "embed"), True, "to_out_0")(out)


class BasicTransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock (layer_norm type): self-attn, cross-attn, feed-forward.

  Parameters: norm1, attn1, norm2, attn2 (only with `cross_attention`), norm3, ff.
  `cluster_ids` goes to the feed-forward adapter site; None reproduces the base block.
  """
  heads: int
  dim_head: int
  cross_attention: bool = True
  upcast: bool = False
  activation: str = "geglu"
  norm_eps: float = 1e-5
  adapter: adapters.AdapterConfig = adapters.AdapterConfig()
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, cluster_ids=None):
    def attn(name):
      return Attention(self.heads, self.dim_head, upcast=self.upcast, adapter=self.adapter,
                       dtype=self.dtype, name=name)

    x = x + attn("attn1")(layer_norm(self.norm_eps, self.dtype, "norm1")(x))
    if self.cross_attention:
      if context is None:
        raise ValueError("BasicTransformerBlock with cross_attention needs `context`")
      x = x + attn("attn2")(layer_norm(self.norm_eps, self.dtype, "norm2")(x), context)
    ff = FeedForward(activation=self.activation, adapter=self.adapter, dtype=self.dtype, name="ff")
    return x + ff(layer_norm(self.norm_eps, self.dtype, "norm3")(x), cluster_ids)
