"""Complete diffusers pipeline folders for PyTorch users: `DiffusionPipeline.from_pretrained(dir)`.

Built on the run's base pipeline (`config.model.pretrained`, a diffusers folder with
model_index.json): its text encoder(s), tokenizer(s) and VAE come unchanged (hard-linked where the
file system allows, else copied); the scheduler is the one our sampler follows step for step
(config.sample.sampler -> DDIMScheduler, DPMSolverMultistepScheduler (dpmsolver++, order 2) or
FlowMatchEulerDiscreteScheduler) with the run's schedule, so the default `pipe(prompt)` samples as
`python -m grasp_jax.sample` does; the backbone (unet/ or transformer/) holds the trained model:

  full / lora / selora  pipeline/: the merged weights (export.merge) in the base's stock
                        pipeline class (SD3 trained on zero T5 tokens: without T5,
                        so pass text_encoder_3=None, tokenizer_3=None to from_pretrained);
                        lora/pytorch_lora_weights.safetensors: the same deltas in diffusers' PEFT
                        LoRA format, for `base_pipe.load_lora_weights(dir)` (needs peft). The
                        scale alpha/r and SeLoRA's rank mask are folded into lora_B, and every
                        layer keeps the static rank R, so diffusers' default alpha = r is exact.
  grasp / moe           pipeline/: the base weights once (linked unchanged) plus
                        adapters.safetensors (all K adapters; MoE: + the router), read together
                        through a shard index; remote code (grasp_adapters.py in the backbone
                        folder, grasp_pipeline.py + routing.py at the top) and partition.json with
                        the routing phrases. `DiffusionPipeline.from_pretrained(dir,
                        trust_remote_code=True)`; `pipe(prompt)` routes the prompt to its cluster
                        (or takes `cluster_id=`). The per-cluster widened-FFN model folders of
                        export.export_diffusers remain the merged alternative for GRASP.
"""
import json
import os
import shutil

import flax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from grasp_jax.inference import conditioning
from grasp_jax.inference import export
from grasp_jax.inference import generator
from grasp_jax.models import backbone

_REMOTE = os.path.join(os.path.dirname(__file__), "remote")
_ROUTING = os.path.join(os.path.dirname(__file__), "routing.py")
_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Our samplers (config.sample.sampler) -> the diffusers scheduler each follows.
SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp2m": "DPMSolverMultistepScheduler",
              "euler": "FlowMatchEulerDiscreteScheduler"}
# SD3's T5 encoder, left out when the run conditioned on zero T5 tokens (config.text.t5 'zeros',
# diffusers' text_encoder_3=None).
_NO_T5 = ("text_encoder_3", "tokenizer_3")
# Stock pipeline -> its routed GRASP/MoE subclass in remote/grasp_pipeline.py.
_ROUTED = {"StableDiffusionPipeline": "GraspStableDiffusionPipeline",
           "StableDiffusion3Pipeline": "GraspStableDiffusion3Pipeline"}


def _read(path):
  with open(path) as f:
    return json.load(f)


def _write(path, tree):
  with open(path, "w") as f:
    json.dump(tree, f, indent=2)


def _link_or_copy(src, dst):
  try:
    os.link(src, dst)
  except OSError:  # Another file system, or no hard links.
    shutil.copy2(src, dst)


def base_pipeline(config):
  """config.model.pretrained when it is a diffusers pipeline folder (model_index.json): what a
  pipeline export is built on. None otherwise (the demo's own base is a lone UNet)."""
  folder = config.model.pretrained
  return folder if folder and os.path.exists(os.path.join(folder, "model_index.json")) else None


def scheduler_config(config, schedule, folder):
  """The diffusers scheduler config of our sampler with the run's schedule (and the betas of the
  base pipeline `folder`)."""
  base = _read(os.path.join(folder, "scheduler", "scheduler_config.json"))
  out = {"_class_name": SCHEDULERS[config.sample.sampler],
         "num_train_timesteps": int(schedule.num_train_timesteps)}
  if config.sample.sampler == "euler":
    return {**out, "shift": float(schedule.shift)}
  # The betas as the base pipeline defines them (model.make_schedule read the same file).
  out.update({k: base[k] for k in ("beta_schedule", "beta_start", "beta_end", "trained_betas",
                                   "rescale_betas_zero_snr") if k in base})
  out.update(prediction_type=schedule.prediction_type, steps_offset=schedule.steps_offset,
             clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range,
             set_alpha_to_one=schedule.set_alpha_to_one)
  if schedule.timestep_spacing is not None:
    out["timestep_spacing"] = schedule.timestep_spacing
  if config.sample.sampler == "dpmpp2m":
    out.update(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
               final_sigmas_type="zero")
  return out


def lora_state_dict(params, module, prefix, selora=None):
  """diffusers' PEFT LoRA keys ('<prefix>.<module>.lora_A.weight' [r, in], 'lora_B.weight'
  [out, r]) of every LoRA'd Dense, scale and SeLoRA mask folded into lora_B."""
  cfg = module.adapter
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  masks = {p[:-1]: np.asarray(m) for p, m in
           flax.traverse_util.flatten_dict(flax.linen.unbox(selora or {})).items()}
  state = {}
  for path, a in flat.items():
    if path[-1] != "lora_a":
      continue
    scope = path[:-1]
    b = np.asarray(flat[scope + ("lora_b",)], np.float64) * cfg.lora_scale
    if cfg.method == "selora":
      if scope not in masks:
        raise ValueError(f"SeLoRA layer {'/'.join(scope)} has no mask in the 'selora' collection")
      b = b * masks[scope][:, None]
    name = f"{prefix}.{export.torch_name(scope)}"
    state[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
    state[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.astype(np.float32).T)
  if not state:
    raise ValueError("no lora_a/lora_b leaves in params (pass base + trained LoRA params)")
  return state


def _adapter_state(params):
  """The adapter banks in torch names ('<ffn>.adapter.down', ...), Flax layout kept."""
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  state = {}
  for scope in export.ffn_scopes(params):
    name = export.torch_name(scope)
    for path, value in flat.items():
      if path[:len(scope) + 1] == scope + ("adapter",):
        state[f"{name}.adapter.{path[-1]}"] = np.ascontiguousarray(np.asarray(value, np.float32))
  return state


def _adapted_backbone(src, dst, params, module, base_config):
  """dst: the base backbone folder's weights linked, adapters.safetensors, a shard index over
  both, the remote code and config.json with the adapter description."""
  os.makedirs(dst)
  index_file = os.path.join(src, _WEIGHTS + ".index.json")
  if os.path.exists(index_file):
    weight_map = dict(_read(index_file)["weight_map"])
  elif os.path.exists(os.path.join(src, _WEIGHTS)):
    with safe_open(os.path.join(src, _WEIGHTS), "np") as f:
      weight_map = dict.fromkeys(f.keys(), _WEIGHTS)
  else:
    raise FileNotFoundError(f"{src} holds no {_WEIGHTS} (nor its shard index)")
  for name in sorted(set(weight_map.values())):
    _link_or_copy(os.path.join(src, name), os.path.join(dst, name))
  adapters = _adapter_state(params)
  save_file(adapters, os.path.join(dst, "adapters.safetensors"), metadata={"format": "pt"})
  weight_map.update(dict.fromkeys(adapters, "adapters.safetensors"))
  _write(os.path.join(dst, _WEIGHTS + ".index.json"), {"metadata": {}, "weight_map": weight_map})
  shutil.copy(os.path.join(_REMOTE, "grasp_adapters.py"), dst)
  cfg = module.adapter
  sites = sorted({k.rsplit(".adapter.", 1)[0] for k in adapters})
  _write(os.path.join(dst, "config.json"), {**base_config, "_grasp_jax": {
      "method": cfg.method, "num_clusters": cfg.num_clusters, "rank": cfg.rank,
      "activation": cfg.activation, "moe_mode": cfg.moe_mode, "adapter_sites": sites}})
  return f"Adapted{base_config['_class_name']}"


def export_pipeline(params, module, config, partition, schedule, out_dir, *, selora=None):
  """Writes OUT/pipeline/ (and OUT/lora/ for lora/selora); returns {'pipeline': dir, 'lora': dir
  or None}.

  params: base + trained params (host arrays). module: the Flax backbone. config: the run config
  (config.model.pretrained must be a diffusers pipeline folder). partition: the run's (GRASP
  routing). schedule: the run's (model.make_schedule). selora: the 'selora' collection.
  """
  base = base_pipeline(config)
  if base is None:
    raise ValueError(f"config.model.pretrained={config.model.pretrained!r} is not a diffusers "
                     "pipeline folder (model_index.json): a pipeline export reuses its text "
                     "encoders, tokenizers and VAE")
  index = _read(os.path.join(base, "model_index.json"))
  method, sub = module.adapter.method, backbone.SUBFOLDERS[config.model.backbone]
  base_config = {k: v for k, v in _read(os.path.join(base, sub, "config.json")).items()
                 if k != "_grasp_jax"}
  out_dir = os.path.abspath(out_dir)
  path, tmp = os.path.join(out_dir, "pipeline"), os.path.join(out_dir, "pipeline.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  if conditioning.t5_mode(base, config.text.t5) == "zeros":  # Trained on zero T5 tokens: none
    for name in _NO_T5:                                        # shipped.
      if name in index:
        index[name] = [None, None]
  for name, entry in index.items():  # The unchanged components.
    if isinstance(entry, list) and entry[0] and name not in (sub, "scheduler"):
      shutil.copytree(os.path.join(base, name), os.path.join(tmp, name),
                      copy_function=_link_or_copy)
  os.makedirs(os.path.join(tmp, "scheduler"))
  sched = scheduler_config(config, schedule, base)
  _write(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
  index["scheduler"] = ["diffusers", sched["_class_name"]]
  lora = None
  if method in ("grasp", "moe"):
    if index["_class_name"] not in _ROUTED:
      raise ValueError(f"{base}: a {index['_class_name']} has no GRASP pipeline; known: "
                       f"{sorted(_ROUTED)}")
    index[sub] = ["grasp_adapters", _adapted_backbone(
        os.path.join(base, sub), os.path.join(tmp, sub), params, module, base_config)]
    index["_class_name"] = ["grasp_pipeline", _ROUTED[index["_class_name"]]]
    for name in (os.path.join(_REMOTE, "grasp_pipeline.py"), _ROUTING):
      shutil.copy(name, tmp)
    _write(os.path.join(tmp, "partition.json"),
           generator.routing_table(partition, config.data))
  else:
    merged, _ = export.merge(params, module, selora=selora)
    export.write_model_folder(os.path.join(tmp, sub), merged, base_config, module,
                              {"method": export.method_of(config)[0],
                               "stock_from_pretrained": True})
    if method in ("lora", "selora"):
      lora = os.path.join(out_dir, "lora")
      os.makedirs(lora, exist_ok=True)
      save_file(lora_state_dict(params, module, sub, selora),
                os.path.join(lora, "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
  _write(os.path.join(tmp, "model_index.json"), index)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)  # A reader never sees a half-written folder under the final name.
  return {"pipeline": path, "lora": lora}
