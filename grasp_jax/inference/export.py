"""Export: the trained part (+ partition table + run config) and merged diffusers model folders.

Two products, both written by `stages.export_run` at the end of training and by `--mode=export`:

  export_adapters   `adapters.safetensors` (the trainable leaves, flat '/'-joined keys prefixed
                    by their collection: 'params/...', and SeLoRA's 'selora/.../mask'),
                    `partition.json` and `config.json`; `load_adapters` reads them back.
  export_diffusers  model folders in the diffusers layout (`config.json` +
                    `diffusion_pytorch_model.safetensors`, plus buffers such as SD3's
                    `pos_embed.pos_embed`) holding the fine-tuned model with its adapters merged.

Complete pipeline folders for diffusers users (one backbone plus the K adapters for GRASP and
MoE; LoRA files) are pipeline_export.py's, built on the pieces here.

What is mergeable, and what diffusers' stock PyTorch `from_pretrained` loads (diffusers 0.39):

  full            nothing to merge; one `merged/` folder. Stock `from_pretrained`: yes.
  lora / selora   exact: `W + A diag(mask) B * alpha/r` (mask = SeLoRA's active ranks, ones for
                  LoRA); the same for every cluster, so one `merged/` folder. Stock
                  `from_pretrained`: yes, identical shapes to the base.
  grasp           `ffn(x) + up_k(act(down_k(x)))` cannot be folded into an FFN of the stock
                  width, but it is *exactly* an FFN r hidden units wider when `act` is the FFN's
                  own nonlinearity:
                    GEGLU (SD UNets, `h = a * gelu(g)`, `[a; g] = proj(x)`): r units with
                      a = 0.x + 1 and g = down_k x + down_bias_k (needs activation 'gelu', erf);
                    GELU-tanh (SD3): r units with proj = down_k (needs activation 'gelu_tanh');
                  and `net.2` gains the columns up_k, its bias += up_bias_k. One folder per
                  cluster: `cluster_<k>_<name>/`.
                  Loaded by diffusers' PyTorch `from_pretrained` through remote code that
                  ships in the folder (`grasp_ffn.py`, `auto_map` in config.json; the widths
                  are under `_grasp_jax`, which diffusers' config parsing ignores):

                    from diffusers import AutoModel
                    model = AutoModel.from_pretrained(folder, trust_remote_code=True)

                  The stock classes (`UNet2DConditionModel.from_pretrained(folder)`) refuse it
                  with diffusers' own shape-mismatch error: no diffusers config field sets the
                  FFN width of these models (`Transformer2DModel` never passes `ff_inner_dim`
                  to `BasicTransformerBlock`; `JointTransformerBlock` fixes 4x), so a wrong
                  model is never loaded silently. (Our own `convert.load_diffusers` does not
                  read widened folders; the Flax model uses the adapters directly.)
  moe             not mergeable: a learned router mixes the experts per token, so no cluster
                  (nor any single weight set) is the model; export_diffusers raises.
"""
import json
import os
import re
import shutil
import sys

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from grasp_jax import partition as partition_lib
from grasp_jax.models import convert
from grasp_jax.models import trainable as trainable_lib

ADAPTERS_FILE = "adapters.safetensors"
_FORMAT = "grasp_jax.adapters/1"
# The FFN nonlinearity of each backbone, and the adapter activation it can absorb exactly.
_FFN_ACTIVATION = {"UNet2DConditionModel": "geglu", "MMDiT": "gelu-approximate"}
_ABSORBABLE = {"geglu": "gelu", "gelu-approximate": "gelu_tanh"}
_ADAPTER_LEAVES = ("down", "down_bias", "up", "up_bias")
_REMOTE_CODE = os.path.join(os.path.dirname(__file__), "remote", "grasp_ffn.py")


class NotMergeableError(ValueError):
  """The trained model has no exact merged form in the diffusers layout."""


# ---------------------------------------------------------------------------------------------
# Adapters: the trainable part, partition table and run config.

def _config_json(config):
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(indent=2, sort_keys=True)
  return json.dumps(config, indent=2, sort_keys=True)


def method_of(config):
  """(method name, adapter kind) of a run config."""
  try:
    m = config["method"]
    return m["name"], m["adapter"]
  except (KeyError, TypeError, AttributeError):
    raise ValueError("run config lacks method.name / method.adapter (see configs/common.py "
                     "method_config)") from None


def _flat(tree, prefix):
  return {"/".join((prefix,) + tuple(map(str, path))): np.ascontiguousarray(np.asarray(v))
          for path, v in flax.traverse_util.flatten_dict(nn.unbox(tree)).items()}


def export_adapters(params, config, partition, out_dir, *, selora=None):
  """Writes the trainable part of `params`, `partition.json` and `config.json` to `out_dir`.

  params: the 'params' collection (base + trained leaves, or only the trained ones), on host.
  config: the run config (ConfigDict or dict); `method.trainable` (regexes on '/'-joined paths)
    picks the leaves: adapters for grasp/moe, lora_* for lora/selora, everything for full.
  partition: partition.Partition.
  selora: the 'selora' collection (rank masks); required for method 'selora'.
  Returns the path of `adapters.safetensors`.
  """
  name, _ = method_of(config)
  trainable, _ = trainable_lib.split(nn.unbox(params), tuple(config["method"]["trainable"]))
  tensors = _flat(trainable, "params")
  if name == "selora":
    if not selora:
      raise ValueError("export_adapters: method 'selora' needs the 'selora' collection (rank "
                       "masks) as selora=")
    tensors.update(_flat(selora, "selora"))
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, ADAPTERS_FILE)
  save_file(tensors, path, metadata={"format": _FORMAT, "method": name})
  partition.save(os.path.join(out_dir, "partition.json"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(_config_json(config))
  return path


def load_adapters(out_dir):
  """Reads an `export_adapters` folder -> (variables, partition, config).

  variables: {'params': trained subtree} plus {'selora': masks} for SeLoRA; put the subtree
    back onto a base with `trainable_lib.merge(variables['params'], frozen)`.
  config: the run config as an ml_collections.ConfigDict (tuples come back as lists).
  """
  path = os.path.join(out_dir, ADAPTERS_FILE)
  for name in (ADAPTERS_FILE, "partition.json", "config.json"):
    if not os.path.exists(os.path.join(out_dir, name)):
      raise FileNotFoundError(f"{os.path.join(out_dir, name)} not found: not an export_adapters "
                              "folder")
  flat = load_file(path)
  variables = {}
  for key, value in flat.items():
    collection, _, rest = key.partition("/")
    if collection not in ("params", "selora") or not rest:
      raise ValueError(f"{path}: unexpected tensor key {key!r} (expected 'params/...' or "
                       "'selora/...')")
    variables.setdefault(collection, {})[tuple(rest.split("/"))] = value
  variables = {c: flax.traverse_util.unflatten_dict(v) for c, v in variables.items()}
  part = partition_lib.Partition.load(os.path.join(out_dir, "partition.json"))
  with open(os.path.join(out_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return variables, part, config


# ---------------------------------------------------------------------------------------------
# Merging into the base architecture (numpy, float64 sums).

def _lora_merged(flat, scale, masks):
  """Folds every `lora_a`/`lora_b` pair into its `kernel`; returns the flat tree without them."""
  out = {p: v for p, v in flat.items() if p[-1] not in ("lora_a", "lora_b")}
  for path, a in flat.items():
    if path[-1] != "lora_a":
      continue
    scope = path[:-1]
    b = flat[scope + ("lora_b",)].astype(np.float64)
    if masks is not None:
      if scope not in masks:
        raise ValueError(f"SeLoRA layer {'/'.join(scope)} has no mask in the 'selora' "
                         "collection")
      b = b * masks[scope].astype(np.float64)[:, None]
    kernel = flat[scope + ("kernel",)]
    delta = a.astype(np.float64) @ b * scale
    out[scope + ("kernel",)] = (kernel.astype(np.float64) + delta).astype(kernel.dtype)
  return out


def _widened_ffn(ff, k, ffn_activation):
  """One FeedForward scope with cluster k's adapter folded in as r extra hidden units."""
  a = {n: np.asarray(ff["adapter"][n][k], np.float64) for n in _ADAPTER_LEAVES}
  proj, net2 = ff["net_0"]["proj"], ff["net_2"]
  kernel, bias = proj["kernel"], proj["bias"]
  dtype, r = kernel.dtype, a["down"].shape[1]
  inner = net2["kernel"].shape[0]
  if ffn_activation == "geglu":
    if kernel.shape[1] != 2 * inner:
      raise ValueError(f"GEGLU proj width {kernel.shape[1]} is not 2 x net_2 input {inner}")
    c = kernel.shape[0]
    # [a; g] halves each gain r units: a = 1 (zero weights, bias 1), g = the adapter's down.
    kernel = np.concatenate([kernel[:, :inner], np.zeros((c, r)), kernel[:, inner:], a["down"]],
                            axis=1)
    bias = np.concatenate([bias[:inner], np.ones(r), bias[inner:], a["down_bias"]])
  else:
    if kernel.shape[1] != inner:
      raise ValueError(f"GELU proj width {kernel.shape[1]} differs from net_2 input {inner}")
    kernel = np.concatenate([kernel, a["down"]], axis=1)
    bias = np.concatenate([bias, a["down_bias"]])
  return {"net_0": {"proj": {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}},
          "net_2": {"kernel": np.concatenate([net2["kernel"], a["up"]], axis=0).astype(dtype),
                    "bias": (net2["bias"] + a["up_bias"]).astype(dtype)}}


def ffn_scopes(params):
  """Paths of the FeedForward scopes that hold a GRASP/MoE adapter."""
  flat = flax.traverse_util.flatten_dict(params)
  return sorted({p[:-2] for p in flat if len(p) >= 2 and p[-2] == "adapter"})


def torch_name(scope):
  """Flax scope path -> the PyTorch module name (e.g. 'transformer_blocks.0.ff')."""
  key, = convert.flax_to_torch(flax.traverse_util.unflatten_dict({scope + ("bias",): np.zeros(0)}))
  return key[:-len(".bias")]


def merge(params, module, *, cluster=None, selora=None):
  """`params` (base + adapters) -> (Flax params in the diffusers layout, widened FFN widths).

  module: the backbone the params belong to (its `adapter` config says what to merge).
  cluster: the GRASP cluster id to fold in (required for grasp, unused otherwise).
  selora: the 'selora' collection (required for selora).
  The second value maps PyTorch FeedForward names to their new inner width (grasp only, else {}).
  Raises NotMergeableError for MoE and for GRASP activations the FFN cannot absorb.
  """
  cfg = module.adapter
  params = jax.tree.map(np.asarray, nn.unbox(params))
  if cfg.method == "none":
    return params, {}
  if cfg.method in ("lora", "selora"):
    masks = None
    if cfg.method == "selora":
      if not selora:
        raise ValueError("merge: method 'selora' needs the 'selora' collection (rank masks)")
      masks = {p[:-1]: np.asarray(m) for p, m in
               flax.traverse_util.flatten_dict(nn.unbox(selora)).items() if p[-1] == "mask"}
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(_lora_merged(flat, cfg.lora_scale, masks)), {}
  if cfg.method == "moe":
    raise NotMergeableError(
        "method 'moe' is not mergeable: its learned router weights the K experts per token, so "
        "neither a cluster nor any fixed weight set reproduces the model; use the adapter export")
  # grasp
  backbone = type(module).__name__
  if backbone not in _FFN_ACTIVATION:
    raise NotMergeableError(f"GRASP merge: unknown backbone {backbone}; known: "
                            f"{sorted(_FFN_ACTIVATION)}")
  ffn_activation = _FFN_ACTIVATION[backbone]
  needed = _ABSORBABLE[ffn_activation]
  if cfg.activation != needed:
    raise NotMergeableError(
        f"GRASP merge: AdapterConfig.activation={cfg.activation!r} cannot be folded exactly into "
        f"{backbone}'s {ffn_activation!r} feed-forward; only activation={needed!r} (the FFN's "
        "own nonlinearity) becomes extra FFN hidden units. Train with that activation to get a "
        "merged export; the adapter export is unaffected")
  if cluster is None or not 0 <= int(cluster) < cfg.num_clusters:
    raise ValueError(f"GRASP merge needs cluster in 0..{cfg.num_clusters - 1}, got {cluster!r}")
  scopes = ffn_scopes(params)
  if not scopes:
    raise ValueError("GRASP merge: params hold no '.../adapter/down' leaves (pass base + "
                     "adapters, e.g. trainable_lib.merge(trainable, frozen))")
  flat = flax.traverse_util.flatten_dict(params)
  widths = {}
  for scope in scopes:
    ff = flax.traverse_util.unflatten_dict(
        {p[len(scope):]: v for p, v in flat.items() if p[:len(scope)] == scope})
    flat = {p: v for p, v in flat.items() if p[:len(scope)] != scope}
    wide = _widened_ffn(ff, int(cluster), ffn_activation)
    flat.update({scope + p: v for p, v in flax.traverse_util.flatten_dict(wide).items()})
    widths[torch_name(scope)] = int(wide["net_2"]["kernel"].shape[0])
  return flax.traverse_util.unflatten_dict(flat), widths


# ---------------------------------------------------------------------------------------------
# diffusers folders.

def _folder_name(k, name):
  return f"cluster_{k}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'unnamed'}"


def write_model_folder(path, params, base_config, module, meta):
  lib = sys.modules[type(module).__module__]
  state = convert.flax_to_torch(params)
  state.update({k: np.ascontiguousarray(v) for k, v in
                getattr(lib, "buffers", lambda m: {})(module).items()})
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(state, os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
  extra = {}
  if meta["method"] == "grasp":  # Widened FFNs: diffusers loads them through remote code.
    shutil.copy(_REMOTE_CODE, tmp)
    extra["auto_map"] = {"AutoModel": f"grasp_ffn.Grasp{base_config['_class_name']}"}
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump({**base_config, **extra, "_grasp_jax": meta}, f, indent=2)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)  # A reader never sees a half-written folder under the final name.
  return path


def export_diffusers(params, module, config, partition, base_folder, out_dir, clusters=None, *,
                     selora=None):
  """Writes merged diffusers model folders under `out_dir`; returns their paths.

  params: base + trained params (host arrays), e.g. `trainable_lib.merge(trainable, frozen)`.
  module: the Flax backbone (`module.adapter` says how to merge).
  config: the run config; its method must agree with `module.adapter.method`.
  partition: names the cluster folders.
  base_folder: the diffusers folder of the frozen base (its config.json is the new folders').
  clusters: GRASP cluster ids or names to write (default: all); other methods take None.
  selora: the 'selora' collection, for SeLoRA.
  Folders: grasp -> cluster_<k>_<name>/ (widened FFNs + remote code: diffusers'
  `AutoModel.from_pretrained(folder, trust_remote_code=True)`); lora/selora/full -> merged/
  (stock `from_pretrained`).
  Raises NotMergeableError for MoE and unabsorbable GRASP activations.
  """
  method = module.adapter.method
  _, adapter_kind = method_of(config)
  if adapter_kind != method:
    raise ValueError(f"config.method.adapter={adapter_kind!r} but the module carries "
                     f"{method!r} adapters")
  if method != "grasp" and clusters is not None:
    raise ValueError(f"clusters={clusters!r}: method {method!r} has one merged model, not one "
                     "per cluster")
  if method == "grasp" and partition.num_clusters != module.adapter.num_clusters:
    raise ValueError(f"partition has {partition.num_clusters} clusters, the adapter bank "
                     f"{module.adapter.num_clusters}")
  ids = range(partition.num_clusters) if clusters is None else \
      [partition.cluster_id(c) for c in clusters]
  base_config_file = os.path.join(base_folder, "config.json")
  if not os.path.exists(base_config_file):
    raise FileNotFoundError(f"{base_config_file} not found: base_folder must be the diffusers "
                            "folder of the frozen base model")
  with open(base_config_file) as f:
    base_config = {k: v for k, v in json.load(f).items() if k != "_grasp_jax"}
  os.makedirs(out_dir, exist_ok=True)
  if method != "grasp":
    merged, _ = merge(params, module, selora=selora)
    meta = {"method": method_of(config)[0], "stock_from_pretrained": True}
    return [write_model_folder(os.path.join(out_dir, "merged"), merged, base_config, module, meta)]
  paths = []
  for k in ids:
    merged, widths = merge(params, module, cluster=k, selora=selora)
    meta = {"method": "grasp", "cluster": k, "cluster_name": partition.cluster_names[k],
            "classes": list(partition.classes_of(k)), "stock_from_pretrained": False,
            "ff_activation_fn": _FFN_ACTIVATION[type(module).__name__], "ff_inner_dim": widths}
    paths.append(write_model_folder(os.path.join(out_dir, _folder_name(k, partition.cluster_names[k])),
                               merged, base_config, module, meta))
  return paths
