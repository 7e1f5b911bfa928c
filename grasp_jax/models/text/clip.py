"""CLIP text transformer (`CLIPTextModel`, `CLIPTextModelWithProjection`) with transformers'
parameter names, so `convert.load_text_encoder(folder)` loads a saved folder with numpy only:

  module, params = convert.load_text_encoder("sd/text_encoder")
  out = module.apply({"params": params}, input_ids)            # CLIPTextOutput
  out.last_hidden_state, out.pooled_output, out.penultimate_hidden_state, out.text_embeds
"""
import dataclasses

import flax
import jax
import flax.linen as nn
import jax.numpy as jnp

from grasp_jax.models import adapters
from grasp_jax.models.text import layers

# ---------------------------------------------------------------------------------------------
# CLIP text transformer (transformers CLIPTextModel / CLIPTextModelWithProjection).


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' CLIPTextConfig this port uses (same defaults)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int | None = None  # set only for CLIPTextModelWithProjection


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array  # [B, T, D] after the final layer norm
  pooled_output: jax.Array  # [B, D] at the EOS token
  penultimate_hidden_state: jax.Array  # [B, T, D] transformers' hidden_states[-2] (SD2/SDXL)
  text_embeds: jax.Array | None = None  # [B, P] projected pooled output (WithProjection only)


class _MLP(nn.Module):
  """fc1 -> activation -> fc2 (CLIP's `mlp`)."""
  hidden: int
  act: str
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    h = adapters.Dense(self.hidden, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                       name="fc1")(x)
    return adapters.Dense(x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype,
                          name="fc2")(layers.ACTIVATIONS[self.act](h))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: self_attn, layer_norm1/2, mlp.fc1/fc2."""
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    h = layers.layer_norm(c.layer_norm_eps, "layer_norm1", self.dtype)(x)
    x = x + layers.MultiHeadAttention(c.num_attention_heads, ("q_proj", "k_proj", "v_proj"),
                                "out_proj", self.dtype, name="self_attn")(h, mask)
    h = layers.layer_norm(c.layer_norm_eps, "layer_norm2", self.dtype)(x)
    return x + _MLP(c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(h)


class _CLIPEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    tokens = layers.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "token_embedding",
                    self.dtype)(input_ids)
    positions = layers.embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
                       "position_embedding", self.dtype)(jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


class _CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    """-> (output of the last layer, its input = transformers' hidden_states[-2])."""
    penultimate = x
    for i in range(self.config.num_hidden_layers):
      penultimate = x
      x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
    return x, penultimate


class CLIPTextTransformer(nn.Module):
  """transformers' CLIPTextTransformer (`text_model`): causal pre-LN encoder, EOS pooling."""
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    b, t = input_ids.shape
    if t > c.max_position_embeddings:
      raise ValueError(f"sequence length {t} > max_position_embeddings {c.max_position_embeddings}")
    x = _CLIPEmbeddings(c, self.dtype, name="embeddings")(input_ids)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x, penultimate = _CLIPEncoder(c, self.dtype, name="encoder")(x, mask)
    x = layers.layer_norm(c.layer_norm_eps, "final_layer_norm", self.dtype)(x)
    if c.eos_token_id == 2:
      # Legacy configs carry a wrong eos id; transformers then pools at the largest token id,
      # which is the EOS token of the original CLIP vocabulary.
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first EOS (pad may equal EOS)
    return x, x[jnp.arange(b), eos], penultimate


class CLIPTextModel(nn.Module):
  """CLIPTextModel, or CLIPTextModelWithProjection when `config.projection_dim` is set."""
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    """input_ids [B, T] int -> CLIPTextOutput. SD pipelines pass no attention_mask."""
    last, pooled, penultimate = CLIPTextTransformer(self.config, self.dtype, name="text_model")(
        input_ids, attention_mask)
    embeds = None
    if self.config.projection_dim:
      embeds = adapters.Dense(self.config.projection_dim, use_bias=False,
                              kernel_axes=("embed", None), dtype=self.dtype,
                              name="text_projection")(pooled)
    return CLIPTextOutput(last, pooled, penultimate, embeds)




def from_config(config):
  """CLIPTextModel[WithProjection] from a transformers `config.json` dict."""
  arch = (config.get("architectures") or [None])[0]
  if "text_config" in config:
    raise ValueError("config.json describes a full CLIPModel; save its text model "
                     "(CLIPTextModel / CLIPTextModelWithProjection) instead")
  with_projection = arch == "CLIPTextModelWithProjection"
  clip = layers.fields(CLIPTextConfig, {k: v for k, v in config.items() if k != "projection_dim"},
                       projection_dim=config.get("projection_dim", 512) if with_projection else None)
  layers.check_activation(clip.hidden_act, f"{arch} config")
  return CLIPTextModel(clip)


def example_inputs(module):
  return layers.example_inputs(module)


def rename(key):
  """Drops the position_ids buffer."""
  return None if key.endswith("position_ids") else key
