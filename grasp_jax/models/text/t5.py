"""The T5 encoder (transformers T5EncoderModel): SD3's third text encoder (t5-v1_1-xxl).

Modules mirror the transformers parameter names, so `convert.load_text_encoder(folder)` loads a
saved `T5EncoderModel` folder (config.json + model[.safetensors.index.json]) with numpy only:

  module, params = convert.load_text_encoder("sd3/text_encoder_3")
  module.apply({"params": params}, input_ids, attention_mask).last_hidden_state   # [B, L, D]

T5 differs from CLIP/BERT: RMS layer norms (no mean subtraction, no bias), no biases anywhere,
unscaled attention logits plus a learned, bucketed relative-position bias that the first block
computes and every block shares. `dtype` sets the matmul precision only: the residual stream and
the norms stay fp32, as T5 activations outgrow half precision (use bf16, not fp16).
"""
import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.models import adapters
from grasp_jax.models.text import layers


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of transformers' T5Config the encoder uses (same defaults)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  dense_act_fn: str = "relu"  # derived from feed_forward_proj by `from_config`
  is_gated_act: bool = False


@flax.struct.dataclass
class T5EncoderOutput:
  last_hidden_state: jax.Array  # [B, L, D] after the final layer norm


def relative_position_buckets(query_length, key_length, num_buckets, max_distance):
  """[query_length, key_length] int32 buckets of (key position - query position), bidirectional.

  Half the buckets per direction; distances below a quarter of `num_buckets` get their own
  bucket, longer ones share log-spaced buckets up to `max_distance`. Computed with numpy at trace
  time (lengths are static) in float32 like torch, so the truncation to an integer does not
  depend on the accelerator's log.
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  max_exact = half // 2
  dist = np.abs(rel)
  log_ratio = (np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
               / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + log_ratio.astype(np.int64), half - 1)
  return ((rel > 0) * half + np.where(dist < max_exact, dist, large)).astype(np.int32)


def _rms_norm(eps, name):
  """T5LayerNorm, always in fp32."""
  return nn.RMSNorm(epsilon=eps, dtype=jnp.float32, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


def _dense(features, axes, dtype, name):
  return adapters.Dense(features, use_bias=False, kernel_axes=axes, dtype=dtype, name=name)


class T5Attention(nn.Module):
  """Self-attention (q, k, v, o; block 0 also owns `relative_attention_bias`)."""
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask, position_bias):
    """-> (output [B, L, D], position bias [1, H, L, L] fp32 for the following blocks)."""
    c = self.config
    b, t, _ = x.shape
    inner = c.num_heads * c.d_kv
    q, k, v = (_dense(inner, ("embed", "heads"), self.dtype, n)(x).reshape(b, t, c.num_heads,
                                                                          c.d_kv)
               for n in ("q", "k", "v"))
    if self.has_relative_attention_bias:
      buckets = relative_position_buckets(t, t, c.relative_attention_num_buckets,
                                          c.relative_attention_max_distance)
      table = layers.embed(c.relative_attention_num_buckets, c.num_heads, (None, None),
                          "relative_attention_bias")
      position_bias = table(buckets).astype(jnp.float32).transpose(2, 0, 1)[None]
    # T5 folds the 1/sqrt(d_kv) scaling into its initialisation: logits are not scaled.
    y = jax.nn.dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0)
    return _dense(x.shape[-1], ("heads", "embed"), self.dtype, "o")(y.reshape(b, t, inner)), \
        position_bias


class _SelfAttentionLayer(nn.Module):
  """T5LayerSelfAttention (`layer.0`): pre-norm self-attention with a residual."""
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask, position_bias):
    h = _rms_norm(self.config.layer_norm_epsilon, "layer_norm")(x)
    y, position_bias = T5Attention(self.config, self.has_relative_attention_bias, self.dtype,
                                   name="SelfAttention")(h, mask, position_bias)
    return x + y, position_bias


class _DenseActDense(nn.Module):
  """T5DenseActDense (wi, wo) or T5DenseGatedActDense (act(wi_0) * wi_1, wo)."""
  config: T5Config
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    act = layers.ACTIVATIONS[c.dense_act_fn]
    if c.is_gated_act:
      h = (act(_dense(c.d_ff, ("embed", "mlp"), self.dtype, "wi_0")(x))
           * _dense(c.d_ff, ("embed", "mlp"), self.dtype, "wi_1")(x))
    else:
      h = act(_dense(c.d_ff, ("embed", "mlp"), self.dtype, "wi")(x))
    return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, "wo")(h)


class _FeedForwardLayer(nn.Module):
  """T5LayerFF (`layer.1`): pre-norm feed-forward with a residual."""
  config: T5Config
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    h = _rms_norm(self.config.layer_norm_epsilon, "layer_norm")(x)
    return x + _DenseActDense(self.config, self.dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask, position_bias):
    x, position_bias = _SelfAttentionLayer(self.config, self.has_relative_attention_bias,
                                           self.dtype, name="layer_0")(x, mask, position_bias)
    return _FeedForwardLayer(self.config, self.dtype, name="layer_1")(x), position_bias


class _T5Stack(nn.Module):
  """The encoder stack (`encoder`): blocks, then the final layer norm."""
  config: T5Config
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    position_bias = None
    for i in range(self.config.num_layers):
      x, position_bias = T5Block(self.config, i == 0, self.dtype, name=f"block_{i}")(
          x, mask, position_bias)
    return _rms_norm(self.config.layer_norm_epsilon, "final_layer_norm")(x)


class T5EncoderModel(nn.Module):
  """transformers T5EncoderModel: `shared` token embedding, then the `encoder` stack."""
  config: T5Config
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    """input_ids [B, L] int -> T5EncoderOutput; masked keys get no attention.

    SD3 pipelines pass no attention_mask (padding tokens are attended to).
    """
    c = self.config
    x = layers.embed(c.vocab_size, c.d_model, ("vocab", "embed"), "shared")(input_ids)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    h = _T5Stack(c, self.dtype, name="encoder")(x.astype(jnp.float32), mask)
    return T5EncoderOutput(h.astype(self.dtype or jnp.float32))


# ---------------------------------------------------------------------------------------------
# Hooks for models/convert.py.


def from_config(config):
  """T5EncoderModel from a transformers `config.json` dict."""
  proj = config.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"T5 config: feed_forward_proj {proj!r} is not '{{act}}' or 'gated-{{act}}'")
  # As transformers: 'gated-gelu' means gelu_new, and explicit dense_act_fn / is_gated_act
  # entries in config.json override what feed_forward_proj implies.
  derived = {"dense_act_fn": "gelu_new" if proj == "gated-gelu" else parts[-1],
             "is_gated_act": len(parts) == 2}
  t5 = layers.fields(T5Config, {**derived, **config})
  if t5.dense_act_fn not in layers.ACTIVATIONS:
    raise ValueError(f"T5 config: dense_act_fn {t5.dense_act_fn!r} not in "
                     f"{sorted(layers.ACTIVATIONS)}")
  return T5EncoderModel(t5)


def example_inputs(module):
  return (jnp.zeros((1, 8), jnp.int32),)


def rename(key):
  """`encoder.embed_tokens` is transformers' tied alias of `shared`: checkpoints hold either."""
  return "shared.weight" if key == "encoder.embed_tokens.weight" else key
