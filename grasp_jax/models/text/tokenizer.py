"""Tokenisers from a model folder (the `tokenizers` library; no transformers)."""
import json
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors


# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py).
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_MAX_MERGES = 49152 - 256 - 2  # merges the original CLIP tokenizer reads


def read_json(path):
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _special_tokens(folder):
  out = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    for key, value in read_json(os.path.join(folder, name)).items():
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
  """A `tokenizers.Tokenizer` from `tokenizer.json` (any model: CLIP, BERT, T5's unigram), or
  CLIP `vocab.json` + `merges.txt`.

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
  elif os.path.exists(os.path.join(path, "spiece.model")):
    # Reading a sentencepiece model needs the sentencepiece package; its tokenizer.json does not.
    raise FileNotFoundError(
        f"{path}: only spiece.model, no tokenizer.json; write one once with transformers: "
        f"T5TokenizerFast.from_pretrained({path!r}).save_pretrained({path!r})")
  else:
    raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
  if max_length is None:
    limit = read_json(os.path.join(path, "tokenizer_config.json")).get("model_max_length", 77)
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


