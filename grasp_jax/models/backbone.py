"""The backbones' calling convention, in one place for training, sampling and diagnostics.

Every backbone is used as `model_fn(variables, x_t, t, cond, cluster_ids) -> (pred, mutated)`,
where `cond` holds the text condition (`context`, `pooled`, and SDXL's `time_ids`).
"""
import importlib

# config.model.backbone -> the Flax module file and the diffusers pipeline subfolder.
LIBS = {"unet": "grasp_jax.models.unet", "dit": "grasp_jax.models.dit"}
SUBFOLDERS = {"unet": "unet", "dit": "transformer"}


def lib(backbone):
  """The backbone's module file (`from_config`, `tiny_config`, `example_inputs`)."""
  return importlib.import_module(LIBS[backbone])


def call_args(backbone, x_t, t, cond):
  """Positional arguments of each backbone's call convention."""
  if backbone == "unet":
    return (x_t, t, cond["context"])
  return (x_t, cond["context"], cond["pooled"], t)


def call_kwargs(backbone, cond):
  """Keyword arguments besides cluster_ids: SDXL's added_cond_kwargs (pooled text, time ids)."""
  if backbone == "unet" and "time_ids" in cond:
    return {"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}
  return {}


def model_fn_for(module, backbone):
  """Adapts a backbone to `model_fn(variables, x_t, t, cond, cluster_ids) -> (pred, mutated)`."""
  def model_fn(variables, x_t, t, cond, cluster_ids):
    return module.apply(variables, *call_args(backbone, x_t, t, cond), cluster_ids=cluster_ids,
                        mutable=["intermediates", "losses"], **call_kwargs(backbone, cond))
  return model_fn
