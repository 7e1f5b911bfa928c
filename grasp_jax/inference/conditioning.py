"""Text conditioning of a run: prompts -> the backbone's condition inputs, once per prompt.

`load_conditioner(config, workdir)` dispatches on `config.text.encoder`:

  'minilm'    the bundled sentence encoder (the demo): context = the unit sentence embedding as a
              single token [1, 384], pooled = the same vector.
  'pipeline'  the text encoders of the diffusers folder `config.model.pretrained`, fed to the
              denoiser as the diffusers 0.39 pipelines' `encode_prompt` does (no clip_skip, no
              attention mask, CLIP prompts padded/truncated to the tokenizer's 77 tokens):
    SD 1.x/2.x  (text_encoder) context = last_hidden_state [77, D]; pooled = its pooled_output
                [D] (carried along, unused by the UNet).
    SDXL        (text_encoder + text_encoder_2) context = both penultimate hidden states
                concatenated on features [77, D1 + D2]; pooled = text_encoder_2's text_embeds;
                time_ids = (original h, w, crop top, left, target h, w) = (S, S, 0, 0, S, S) for
                the training resolution S. The UNet takes the last two as
                `added_cond_kwargs={'text_embeds': pooled, 'time_ids': time_ids}`. The
                unconditional input is all zeros when the pipeline has
                `force_zeros_for_empty_prompt` (SDXL's default), as at SDXL inference.
    SD3         (text_encoder, text_encoder_2: CLIP-L/G with projection; text_encoder_3: T5)
                context = both penultimate states concatenated, zero-padded to T5's width
                (= the transformer's joint_attention_dim), then T5's last_hidden_state of the
                prompt tokenized to `t5_length` tokens (diffusers' max_sequence_length, 256):
                [77 + t5_length, joint_attention_dim]; pooled = both text_embeds concatenated.
                `config.text.t5`: 'encoder' (the default when the folder has text_encoder_3)
                or 'zeros': `t5_length` zero tokens, diffusers' `text_encoder_3=None` path
                (SD3 was trained with T5 dropped at times; saves T5-XXL's 4.7B params).
  a path      a diffusers pipeline folder (as 'pipeline'), or one transformers CLIP text-encoder
              folder (SD 1.x convention; tokenizer in the folder or its `tokenizer` sibling).

Cache. Each distinct prompt is encoded once; its rows are kept in a `TextEmbeddingCache` in
`config.text.cache_dtype` (float16 by default; MiniLM rows stay float32) and returned as float32.
Only the prompt-dependent part is stored (SD3's zero padding and SDXL's time ids are added at
lookup), so per 10k distinct prompts in float16 the cache holds: SD 1.x 1.2 GB, SD 2.x 1.6 GB,
SDXL 3.2 GB, SD3 3.2 GB with zero T5 tokens, 24 GB with T5 (its 256 x 4096 states add 21 GB).
Many distinct prompts (MIMIC-CXR impressions, ~100k) therefore want
`config.text.cache=False`, which re-encodes every batch (small next to the backbone's step for
CLIP; T5-XXL's forward is not small).

Frozen params. `frozen_dtype` (config.model.frozen_dtype) is the storage dtype of the text
encoders' params (bfloat16 halves T5-XXL's 19 GB); they compute in float32 either way.
"""
import json
import os

from absl import logging
import numpy as np

from grasp_jax.models.text import cache as text_cache
from grasp_jax.models.text import encoders

_CLIP_SLOTS = ("text_encoder", "text_encoder_2")
# Encoders whose text_embeds (CLIPTextModelWithProjection) are the pooled condition.
_PROJECTED = {"sd": (), "sdxl": ("text_encoder_2",), "sd3": _CLIP_SLOTS}


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _as_float32(rows):
  return {k: np.asarray(v, np.float32) for k, v in rows.items()}


class Conditioner:
  """prompts -> condition dict of float32 numpy arrays [B, ...], encoded once per prompt.

  `lookup(prompts)` behaves as `TextEmbeddingCache.lookup`. encode: list[str] -> dict of rows
  (what is cached); complete: rows -> the backbone's inputs (float32). With `cache=None` every
  lookup re-encodes. `zero_null`: the unconditional input is zeros (SDXL), except time_ids.
  """

  def __init__(self, encode, complete=_as_float32, cache=None, zero_null=False):
    self._encode, self._complete, self.cache, self.zero_null = encode, complete, cache, zero_null

  def lookup(self, prompts):
    prompts = list(prompts)
    rows = self.cache.lookup(prompts) if self.cache is not None else self._encode(prompts)
    return self._complete(rows)

  def null_condition(self):
    """The unconditional (classifier-free guidance) input, leaves without the batch axis."""
    cond = {k: v[0] for k, v in self.lookup([""]).items()}
    if self.zero_null:
      cond = {k: v if k == "time_ids" else np.zeros_like(v) for k, v in cond.items()}
    return cond

  def save(self, path):
    """Writes the cache (an .npz) when there is one."""
    if self.cache is not None:
      self.cache.save(path)


# ---------------------------------------------------------------------------------------------
# diffusers pipeline folders.

def pipeline_kind(folder):
  """'sd', 'sdxl' or 'sd3' from a diffusers pipeline folder's layout."""
  has = lambda sub: os.path.isdir(os.path.join(folder, sub))
  if has("transformer"):
    return "sd3"
  if has("text_encoder_2"):
    return "sdxl"
  if has("text_encoder"):
    return "sd"
  raise ValueError(f"{folder}: not a diffusers pipeline folder with CLIP text encoders "
                   "(no text_encoder/ or text_encoder_2/ subfolder)")


T5_MODES = ("", "zeros", "encoder")


def t5_mode(folder, t5=""):
  """'encoder' or 'zeros': where a pipeline's T5 tokens come from (see the module docstring).

  t5: config.text.t5; '' -> 'encoder' when the folder has text_encoder_3/, else 'zeros'.
  """
  if t5 not in T5_MODES:
    raise ValueError(f"config.text.t5={t5!r}: expected one of {T5_MODES}")
  has_t5 = os.path.isdir(os.path.join(folder, "text_encoder_3"))
  if t5 == "encoder" and not has_t5:
    raise ValueError(f"config.text.t5='encoder': {folder} has no text_encoder_3/ (T5); use "
                     "t5='zeros' for zero T5 tokens, or an SD3 pipeline folder with T5")
  return t5 or ("encoder" if has_t5 else "zeros")


class PipelineTextEncoder:
  """The text encoders of a diffusers pipeline folder (see the module docstring).

  `__call__(prompts)` -> the prompt-dependent rows (float32 numpy): {'context': [N, 77, D],
  'pooled': [N, P]} (+ 't5': [N, t5_length, joint_dim] for SD3 with T5); `complete(rows)` ->
  the backbone's inputs (SD3's padded context, SDXL's time_ids). image_size: SDXL's training
  resolution (its time_ids). t5, t5_length: SD3's T5 mode and tokens (diffusers'
  `max_sequence_length`). frozen_dtype: the params' storage dtype. `tag` names what the rows
  hold: the kind, and T5's length when used.
  """

  def __init__(self, folder, *, image_size=None, t5="", t5_length=256, frozen_dtype="float32",
               batch_size=64):
    folder = str(folder)
    self.folder, self.kind = folder, pipeline_kind(folder)
    mode = t5_mode(folder, t5)
    slots = [s for s in _CLIP_SLOTS if os.path.isdir(os.path.join(folder, s))]
    if self.kind == "sd":
      slots = ["text_encoder"]
    elif self.kind == "sd3" and slots != list(_CLIP_SLOTS):
      raise ValueError(f"{folder}: an SD3 pipeline needs text_encoder/ and text_encoder_2/ "
                       f"(found {slots})")
    self.encoders = [encoders.load_clip_text_encoder(os.path.join(folder, s),
                                                     batch_size=batch_size,
                                                     param_dtype=frozen_dtype)
                     for s in slots]
    for slot, enc in zip(slots, self.encoders):
      if slot in _PROJECTED[self.kind] and enc.module.config.projection_dim is None:
        raise ValueError(f"{folder}/{slot}: a {self.kind} pipeline needs a "
                         "CLIPTextModelWithProjection here (its text_embeds are the pooled "
                         "condition)")
    self.time_ids = self.joint_dim = self.t5 = None
    self.tag = self.kind
    if self.kind == "sdxl":
      if not image_size:
        raise ValueError("an SDXL pipeline needs image_size (the pixel resolution of its "
                         "time_ids)")
      self.time_ids = np.array([image_size, image_size, 0, 0, image_size, image_size],
                               np.float32)
    if self.kind == "sd3":
      self.joint_dim = _read_json(os.path.join(folder, "transformer", "config.json")).get(
          "joint_attention_dim", 4096)
      self.t5_length = int(t5_length)
      width = sum(e.module.config.hidden_size for e in self.encoders)
      if width > self.joint_dim:
        raise ValueError(f"{folder}: CLIP widths sum to {width} > transformer "
                         f"joint_attention_dim {self.joint_dim}")
      if mode == "encoder":
        if self.t5_length < 1:
          raise ValueError(f"config.text.t5_length={t5_length}: T5 needs at least one token")
        self.t5 = encoders.load_t5_text_encoder(
            os.path.join(folder, "text_encoder_3"), self.t5_length, batch_size=batch_size,
            param_dtype=frozen_dtype)
        if self.t5.module.config.d_model != self.joint_dim:
          raise ValueError(f"{folder}: T5 width {self.t5.module.config.d_model} != transformer "
                           f"joint_attention_dim {self.joint_dim}")
        self.tag = f"sd3+t5x{self.t5_length}"
      elif os.path.isdir(os.path.join(folder, "text_encoder_3")):
        logging.info("%s/text_encoder_3 (T5) is not used (config.text.t5='zeros'): its tokens "
                     "are zeros, as in diffusers with text_encoder_3=None", folder)

  @property
  def zero_null(self):
    """SDXL pipelines' `force_zeros_for_empty_prompt` (default True)."""
    if self.kind != "sdxl":
      return False
    index = os.path.join(self.folder, "model_index.json")
    return bool(_read_json(index).get("force_zeros_for_empty_prompt", True)
                if os.path.exists(index) else True)

  def __call__(self, prompts):
    prompts = list(prompts)
    outs = [enc(prompts) for enc in self.encoders]
    if self.kind == "sd":
      return {"context": outs[0]["last_hidden_state"], "pooled": outs[0]["pooled_output"]}
    context = np.concatenate([o["penultimate_hidden_state"] for o in outs], axis=-1)
    if self.kind == "sdxl":
      return {"context": context, "pooled": outs[-1]["text_embeds"]}
    rows = {"context": context,
            "pooled": np.concatenate([o["text_embeds"] for o in outs], axis=-1)}
    if self.t5 is not None:
      rows["t5"] = self.t5(prompts)["last_hidden_state"]
    return rows

  def complete(self, rows):
    out = _as_float32(rows)
    n = out["context"].shape[0]
    if self.kind == "sdxl":
      out["time_ids"] = np.broadcast_to(self.time_ids, (n, len(self.time_ids))).copy()
    elif self.kind == "sd3":
      clip = out["context"]
      out["context"] = np.zeros((n, clip.shape[1] + self.t5_length, self.joint_dim), np.float32)
      out["context"][:, :clip.shape[1], :clip.shape[2]] = clip
      if "t5" in out:
        out["context"][:, clip.shape[1]:] = out.pop("t5")
    return out


def pipeline_conditioner(folder, *, image_size=None, t5="", t5_length=256,
                         frozen_dtype="float32", cache=True, cache_dtype="float16",
                         cache_path=None, batch_size=64):
  """A Conditioner for a diffusers pipeline folder (or one CLIP text-encoder folder).

  cache: keep each prompt's rows (in `cache_dtype`); cache_path: an .npz to start from when it
  exists (written by `Conditioner.save`; refused if made by another encoder or dtype).
  """
  folder = str(folder).rstrip("/")
  if os.path.exists(os.path.join(folder, "config.json")):  # One transformers CLIP folder.
    if t5 == "encoder":
      raise ValueError(f"config.text.t5='encoder': {folder} is one CLIP text encoder, not an "
                       "SD3 pipeline folder with text_encoder_3/")
    clip = encoders.load_clip_text_encoder(folder, batch_size=batch_size,
                                           param_dtype=frozen_dtype)

    def encode(prompts):
      out = clip(list(prompts))
      return {"context": out["last_hidden_state"], "pooled": out["pooled_output"]}

    complete, zero_null, kind = _as_float32, False, "clip"
  else:
    encoder = PipelineTextEncoder(folder, image_size=image_size, t5=t5, t5_length=t5_length,
                                  frozen_dtype=frozen_dtype, batch_size=batch_size)
    encode, complete, zero_null, kind = (encoder, encoder.complete, encoder.zero_null,
                                         encoder.tag)
  if not cache:
    return Conditioner(encode, complete, None, zero_null)
  if str(cache_dtype) not in ("float16", "float32"):
    raise ValueError(f"config.text.cache_dtype={cache_dtype!r}: expected float16 or float32")
  dtype = np.dtype(cache_dtype)

  def encode_for_cache(prompts):
    rows = {k: np.asarray(v).astype(dtype) for k, v in encode(prompts).items()}
    bad = [k for k, v in rows.items() if not np.all(np.isfinite(v))]
    if bad:
      raise ValueError(f"text embeddings {bad} of {folder} overflow {dtype.name}; set "
                       "config.text.cache_dtype='float32'")
    return rows

  if str(frozen_dtype) != "float32":  # Rounded params give other rows.
    kind += f"@{frozen_dtype}"
  tag = f"{kind}:{os.path.abspath(folder)}:{dtype.name}"
  store = (text_cache.TextEmbeddingCache.load(cache_path, encode_for_cache, tag=tag, missing_ok=True)
           if cache_path else text_cache.TextEmbeddingCache(encode_for_cache, tag=tag))
  return Conditioner(encode_for_cache, complete, store, zero_null)


# ---------------------------------------------------------------------------------------------
# From a run's config.

def minilm_conditioner(cache=True, cache_path=None):
  """The demo's MiniLM sentence embeddings (float32 cache, as the demo has always used)."""
  encoder = encoders.load_minilm()

  def encode(prompts):
    pooled = encoder.encode(list(prompts))
    return {"context": pooled[:, None, :], "pooled": pooled}

  if not cache:
    return Conditioner(encode)
  store = (text_cache.TextEmbeddingCache.load(cache_path, encode, tag="minilm", missing_ok=True)
           if cache_path else text_cache.TextEmbeddingCache(encode, tag="minilm"))
  return Conditioner(encode, cache=store)


def load_conditioner(config, workdir):
  """The run's Conditioner from `config.text` (see the module docstring).

  The cache starts from WORKDIR/text_cache.npz when it exists.
  """
  t = config.text
  cache_path = os.path.join(workdir, "text_cache.npz") if workdir else None
  if t.encoder == "minilm":
    if t.t5 == "encoder":
      raise ValueError("config.text.t5='encoder' needs config.text.encoder='pipeline' (an SD3 "
                       "pipeline with text_encoder_3/), not 'minilm'")
    return minilm_conditioner(t.cache, cache_path)
  folder = config.model.pretrained if t.encoder == "pipeline" else t.encoder
  if not folder:
    raise ValueError("config.text.encoder='pipeline' reads the text encoders of "
                     "config.model.pretrained, which is empty")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"config.text.encoder: {folder!r} is not a folder")
  return pipeline_conditioner(folder, image_size=config.data.image_size, t5=t.t5,
                              t5_length=t.t5_length, frozen_dtype=config.model.frozen_dtype,
                              cache=t.cache, cache_dtype=t.cache_dtype, cache_path=cache_path)
