"""diffusers remote code: Stable Diffusion (1/2) and SD3 pipelines whose backbone carries GRASP's cluster
adapters (grasp_adapters.py) and that route each prompt to its cluster. Copied, with routing.py,
into a pipeline export (grasp_jax/inference/pipeline_export.py); not imported by grasp_jax.

  pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
  pipe("chest x-ray showing hernia")                  # cluster of the classes the prompt names
  pipe("a free-text prompt", cluster_id="tail")       # or a cluster (id or name; a list: per prompt)
  pipe("a free-text prompt", unknown="healthy")       # cluster of prompts that name no class

Routing reads the folder's partition.json (routing.py); the rest is the stock pipeline. An MoE
backbone routes by itself (its learned router), so it takes no cluster.
"""
import json
import os

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers import StableDiffusionPipeline

from .routing import Router


class _Routed:
  _backbone = "unet"

  @property
  def router(self):
    if getattr(self, "_router", None) is None:
      with open(os.path.join(self.name_or_path, "partition.json")) as f:
        self._router = Router(json.load(f))
    return self._router

  def cluster_ids(self, prompts, cluster_id=None, unknown=None):
    """The cluster id of each prompt."""
    if cluster_id is None:
      return [self.router.route(p, unknown)[1] for p in prompts]
    ids = cluster_id if isinstance(cluster_id, (list, tuple)) else [cluster_id] * len(prompts)
    if len(ids) != len(prompts):
      raise ValueError(f"{len(ids)} cluster ids for {len(prompts)} prompts")
    return [self.router.cluster_id(k) for k in ids]

  def __call__(self, prompt=None, *args, cluster_id=None, unknown=None, num_images_per_prompt=1,
               **kwargs):
    backbone = getattr(self, self._backbone)
    if backbone.adapter_method == "moe":
      ids = [0]  # Any ids: they only switch the router on.
    elif prompt is None:
      if cluster_id is None:
        raise ValueError("without `prompt` (prompt_embeds given) pass `cluster_id`")
      ids = self.cluster_ids([None] * len(kwargs["prompt_embeds"]), cluster_id)
    else:
      ids = self.cluster_ids([prompt] if isinstance(prompt, str) else prompt, cluster_id, unknown)
    backbone.set_cluster_ids(torch.tensor(ids).repeat_interleave(num_images_per_prompt))
    try:
      return super().__call__(prompt, *args, num_images_per_prompt=num_images_per_prompt,
                              **kwargs)
    finally:
      backbone.set_cluster_ids(None)


class GraspStableDiffusionPipeline(_Routed, StableDiffusionPipeline):
  pass


class GraspStableDiffusion3Pipeline(_Routed, StableDiffusion3Pipeline):
  _backbone = "transformer"
  # Trained without T5 (its tokens were zeros, as with text_encoder_3=None): none is shipped.
  _optional_components = StableDiffusion3Pipeline._optional_components + [
      "text_encoder_3", "tokenizer_3"]
