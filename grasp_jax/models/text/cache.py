"""TextEmbeddingCache: each distinct prompt encoded once, rows kept in numpy tables.

  cache = TextEmbeddingCache(minilm.encode); cache.lookup(prompts); cache.save("w/text.npz")
"""
import os

import numpy as np

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

