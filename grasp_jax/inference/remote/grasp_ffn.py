"""diffusers remote code for GRASP cluster folders: copied into every folder export.py writes.

Not imported by grasp_jax (it needs torch + diffusers). A cluster-k folder holds the base with
cluster k's adapter absorbed into FeedForwards r units wider than the stock 4x width, which no
diffusers config field can express. These subclasses build the stock model, swap in the wider
stock `FeedForward`s named in config.json's `_grasp_jax`, and leave loading to diffusers, so

  from diffusers import AutoModel
  model = AutoModel.from_pretrained(folder, trust_remote_code=True)

(config.json's `auto_map`) or `GraspUNet2DConditionModel.from_pretrained(folder)` loads it with
diffusers' own strict shape checks.
"""
from diffusers import SD3Transformer2DModel
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward


class _WidenedFeedForwards:
  """`from_config` (which `from_pretrained` calls before loading weights) widens the FFNs."""

  @classmethod
  def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
    out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
    model = out[0] if return_unused_kwargs else out
    meta = dict(config)["_grasp_jax"]
    for name, width in meta["ff_inner_dim"].items():
      old = model.get_submodule(name)
      parent, _, attr = name.rpartition(".")
      setattr(model.get_submodule(parent), attr, FeedForward(
          old.net[0].proj.in_features, old.net[2].out_features, inner_dim=width,
          activation_fn=meta["ff_activation_fn"]))
    return out


class GraspUNet2DConditionModel(_WidenedFeedForwards, UNet2DConditionModel):
  pass


class GraspSD3Transformer2DModel(_WidenedFeedForwards, SD3Transformer2DModel):
  pass
