"""BERT encoder (`BertModel`: MiniLM and other sentence-transformers) with transformers' names."""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import adapters
from grasp_jax.models.text import layers

# ---------------------------------------------------------------------------------------------
# BERT (transformers BertModel without the pooler), used by the MiniLM sentence encoder.


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of transformers' BertConfig this port uses (same defaults)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


class _BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    x = (layers.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "word_embeddings",
                self.dtype)(input_ids)
         + layers.embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
                  "position_embeddings", self.dtype)(jnp.arange(input_ids.shape[1]))[None]
         + layers.embed(c.type_vocab_size, c.hidden_size, (None, "embed"), "token_type_embeddings",
                  self.dtype)(token_type_ids))
    return layers.layer_norm(c.layer_norm_eps, "LayerNorm", self.dtype)(x)


class _BertAddNorm(nn.Module):
  """`dense`, residual add, `LayerNorm`: BERT's post-LN sublayer output."""
  eps: float
  kernel_axes: tuple
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, h, residual):
    h = adapters.Dense(residual.shape[-1], kernel_axes=self.kernel_axes, dtype=self.dtype,
                       name="dense")(h)
    return layers.layer_norm(self.eps, "LayerNorm", self.dtype)(h + residual)


class _BertAttention(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    y = layers.MultiHeadAttention(c.num_attention_heads, ("query", "key", "value"), None, self.dtype,
                            name="self")(x, mask)
    return _BertAddNorm(c.layer_norm_eps, ("heads", "embed"), self.dtype, name="output")(y, x)


class _BertIntermediate(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    h = adapters.Dense(self.config.intermediate_size, kernel_axes=("embed", "mlp"),
                       dtype=self.dtype, name="dense")(x)
    return layers.ACTIVATIONS[self.config.hidden_act](h)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    x = _BertAttention(self.config, self.dtype, name="attention")(x, mask)
    h = _BertIntermediate(self.config, self.dtype, name="intermediate")(x)
    return _BertAddNorm(self.config.layer_norm_eps, ("mlp", "embed"), self.dtype,
                        name="output")(h, x)


class _BertEncoder(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, mask)
    return x


class BertModel(nn.Module):
  """transformers BertModel up to last_hidden_state (the unused pooler is not loaded)."""
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    """input_ids [B, T] int -> last_hidden_state [B, T, D]; masked keys get no attention."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    x = _BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids)
    return _BertEncoder(self.config, self.dtype, name="encoder")(x, mask)


def mean_pool(hidden, mask):
  """Average of hidden [B, T, D] over the tokens where mask [B, T] is 1 (sentence-transformers)."""
  m = mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)



def from_config(config):
  """BertModel from a transformers `config.json` dict."""
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"BertModel config: position_embedding_type "
                     f"{config['position_embedding_type']!r} not supported (only 'absolute')")
  bert = layers.fields(BertConfig, config)
  layers.check_activation(bert.hidden_act, "BertModel config")
  return BertModel(bert)


def example_inputs(module):
  return layers.example_inputs(module)


def rename(key):
  """Drops position_ids buffers and the unused pooler; strips a `bert.` prefix."""
  if key.endswith("position_ids") or key.startswith(("pooler.", "bert.pooler.")):
    return None
  return key.removeprefix("bert.")
