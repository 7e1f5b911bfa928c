"""diffusers / transformers safetensors <-> Flax parameter trees, with numpy only (no torch).

Our modules name their submodules after the PyTorch ones, so the mapping is one convention:
`down_blocks.0.attentions.1.proj_in.weight` <-> `down_blocks_0/attentions_1/proj_in/kernel`.
Which Flax leaf a PyTorch `weight` becomes (kernel / scale / embedding) and its layout are read
off the abstract parameter tree of the module, so every checkpoint key is checked for presence
and shape against the module it is loaded into.

Each model file registered below provides:
  from_config(config: dict) -> flax module         (config.json of the checkpoint)
  example_inputs(module) -> tuple                  (shapes for jax.eval_shape(module.init, ...))
  rename(key: str) -> str | None   (optional)      (checkpoint-specific key fixes; None drops it)
"""
import importlib
import json
import os
import re

import flax
import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

_DIFFUSERS = {
    "UNet2DConditionModel": "grasp_jax.models.unet",
    "SD3Transformer2DModel": "grasp_jax.models.dit",
    "AutoencoderKL": "grasp_jax.models.vae",
}
_TRANSFORMERS = {
    "CLIPTextModel": "grasp_jax.models.text.clip",
    "CLIPTextModelWithProjection": "grasp_jax.models.text.clip",
    "BertModel": "grasp_jax.models.text.bert",
    "T5EncoderModel": "grasp_jax.models.text.t5",
}


# PyTorch ModuleList attribute names: `resnets_0` <-> `resnets.0` (but `linear_1` stays).
_LIST_ITEM = re.compile(r"(down_blocks|up_blocks|attentions|resnets|downsamplers|upsamplers|"
                        r"transformer_blocks|net|layers|layer|to_out)_(\d+)")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the module it is loaded into; names every bad key."""


def read_safetensors(folder, stem):
  """Reads `stem.safetensors` or the shards listed in `stem.safetensors.index.json`."""
  single = os.path.join(folder, f"{stem}.safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    return load_file(single)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(load_file(os.path.join(folder, shard)))
    return state
  raise FileNotFoundError(f"neither {single} nor {index} exists")


def _flax_path(key):
  """'a.0.b.weight' -> ('a_0', 'b'), 'weight'."""
  parts = key.split(".")
  out = []
  for p in parts[:-1]:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out), parts[-1]


def _to_flax_leaf(name, array, expected):
  """Maps a PyTorch leaf to (flax leaf name, array) given the expected module scope."""
  if name == "bias":
    return "bias", array
  if name == "weight":
    if "kernel" in expected:
      if array.ndim == 2:
        return "kernel", array.T
      if array.ndim == 4:  # OIHW -> HWIO
        return "kernel", array.transpose(2, 3, 1, 0)
      return "kernel", array
    if "scale" in expected:
      return "scale", array
    if "embedding" in expected:
      return "embedding", array
  return name, array


def torch_to_flax(state_dict, abstract_params, rename=None, dtype=None, source="checkpoint"):
  """Converts a PyTorch-named state dict onto the structure of `abstract_params`."""
  flat_expected = flax.traverse_util.flatten_dict(nn.unbox(abstract_params))
  scopes = {}
  for path in flat_expected:
    scopes.setdefault(path[:-1], set()).add(path[-1])
  out, unexpected, misshaped = {}, [], []
  for key, array in state_dict.items():
    new_key = rename(key) if rename else key
    if new_key is None:
      continue
    scope, name = _flax_path(new_key)
    leaf, value = _to_flax_leaf(name, np.asarray(array), scopes.get(scope, ()))
    path = scope + (leaf,)
    if path not in flat_expected:
      unexpected.append(key)
      continue
    if tuple(value.shape) != tuple(flat_expected[path].shape):
      misshaped.append(f"{key}: {tuple(array.shape)} -> {'/'.join(path)} expects "
                       f"{tuple(flat_expected[path].shape)}")
      continue
    out[path] = value.astype(dtype or flat_expected[path].dtype)
  missing = ["/".join(p) for p in flat_expected if p not in out]
  if missing or unexpected or misshaped:
    lines = [f"{source} does not match the module:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) +
                     (" ..." if len(items) > 20 else ""))
    raise CheckpointMismatchError("\n".join(lines))
  return flax.traverse_util.unflatten_dict(out)


def flax_to_torch(params):
  """Inverse of `torch_to_flax` (for export): Flax tree -> PyTorch-named numpy state dict."""
  state = {}
  for path, value in flax.traverse_util.flatten_dict(nn.unbox(params)).items():
    value = np.asarray(value)
    *scope, leaf = path
    if leaf == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1) if value.ndim == 4 \
          else value
      leaf = "weight"
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    parts = []
    for s in scope:
      m = _LIST_ITEM.fullmatch(s)
      parts.extend([m.group(1), m.group(2)] if m else [s])
    state[".".join(parts + [leaf])] = np.ascontiguousarray(value)
  return state


def _load(path, registry, stem, dtype):
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{config_file} not found: expected a saved model folder")
  with open(config_file) as f:
    config = json.load(f)
  class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
  if class_name not in registry:
    raise ValueError(f"{config_file}: class {class_name!r} is not supported "
                     f"(supported: {sorted(registry)})")
  lib = importlib.import_module(registry[class_name])
  module = lib.from_config(config)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *lib.example_inputs(module))
  state = read_safetensors(path, stem)
  params = torch_to_flax(state, abstract["params"], getattr(lib, "rename", None), dtype,
                         source=path)
  return module, params


def load_diffusers(path, dtype=None):
  """A diffusers model folder -> (flax module, params). Dispatches on `_class_name`."""
  return _load(path, _DIFFUSERS, "diffusion_pytorch_model", dtype)


def load_text_encoder(path, dtype=None):
  """A transformers text-encoder folder -> (flax module, params). Dispatches on `architectures`."""
  return _load(path, _TRANSFORMERS, "model", dtype)


def save_diffusers(path, params, config):
  """Writes params in the diffusers folder layout (`config.json` + safetensors)."""
  os.makedirs(path, exist_ok=True)
  save_file(flax_to_torch(params), os.path.join(path, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
