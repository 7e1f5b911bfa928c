"""Result files: JSON-safe trees and atomic writes, so a crash never leaves half a file."""
import hashlib
import json
import math
import os

import numpy as np


def jsonable(tree):
  """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
  if isinstance(tree, dict):
    return {str(k): jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in (tree.tolist() if isinstance(tree, np.ndarray) else tree)]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if math.isfinite(tree) else None
  if isinstance(tree, (np.integer, np.bool_)):
    return tree.item()
  return tree


def write_bytes(path, data):
  """Writes `data` to `path` through a temporary file and a rename (atomic on POSIX)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path, tree, indent=1):
  """Writes `jsonable(tree)` as JSON to `path` atomically."""
  write_bytes(path, json.dumps(jsonable(tree), indent=indent).encode())


def read_json(path):
  """The JSON at `path`; a corrupt file is an error naming it."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); move it away to start afresh") from e


def folder_hash(path):
  """sha256 over a model folder's config and weight files: identifies the frozen base."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    if name.endswith((".json", ".safetensors")):
      h.update(name.encode())
      with open(os.path.join(path, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
          h.update(chunk)
  return h.hexdigest()
