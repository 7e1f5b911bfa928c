"""models/unet.py against diffusers' PyTorch UNet2DConditionModel, via convert.load_diffusers."""
import functools
import os
import shutil
import subprocess
import sys

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch

from grasp_jax.models import attention
from grasp_jax.models import convert
from grasp_jax.models import unet

diffusers.utils.logging.set_verbosity_error()

_TINY = dict(in_channels=4, out_channels=4, sample_size=16, block_out_channels=[32, 64],
             cross_attention_dim=32, norm_num_groups=8, layers_per_block=1)
CONFIGS = {
    # SD 1.x layout: int attention_head_dim (= heads), conv proj_in/proj_out.
    "sd1": unet.tiny_config(**_TINY, attention_head_dim=8, use_linear_projection=False,
                            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    # SD 2.x layout: per-block heads, linear projections, upcast attention; plus the odd options
    # (sin/cos order, freq shift, scale-shift resnets, centring, 1x1 in/out convs, downsample
    # padding 0) and an odd-sized input that makes the up path resize to the skip's size.
    "sd2": unet.tiny_config(**{**_TINY, "layers_per_block": 2}, attention_head_dim=[2, 4],
                            use_linear_projection=True, upcast_attention=True,
                            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                            flip_sin_to_cos=False, freq_shift=1,
                            resnet_time_scale_shift="scale_shift", center_input_sample=True,
                            mid_block_scale_factor=2.0, conv_in_kernel=1,
                            conv_out_kernel=1, downsample_padding=0),
    # SDXL layout: no attention at full resolution, several transformer layers, text_time embedding.
    "sdxl": unet.tiny_config(**{**_TINY, "layers_per_block": [1, 2]}, attention_head_dim=[2, 4],
                             use_linear_projection=True, transformer_layers_per_block=[1, 2],
                             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                             addition_embed_type="text_time", addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=32 + 6 * 8),
}
SIZES = {"sd1": (16, 16), "sd2": (15, 17), "sdxl": (16, 16)}


def _torch_unet(config, seed=0):
  """A random diffusers UNet; norm scales/biases are perturbed so a scale<->bias mix-up shows."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(name, seed=0):
  rng = np.random.RandomState(seed)
  h, w = SIZES[name]
  inputs = dict(sample=rng.randn(2, 4, h, w).astype(np.float32), timesteps=np.array([3, 999]),
                context=rng.randn(2, 5, 32).astype(np.float32), added=None)
  if CONFIGS[name].get("addition_embed_type") == "text_time":
    inputs["added"] = dict(text_embeds=rng.randn(2, 32).astype(np.float32),
                           time_ids=np.array([[16, 16, 0, 0, 16, 16], [32, 24, 2, 3, 16, 16]],
                                             np.float32))
  return inputs


def _run(name, path):
  """Runs the diffusers model and the converted Flax model on the same inputs (one jit)."""
  model = _torch_unet(CONFIGS[name])
  model.save_pretrained(path)
  module, params = convert.load_diffusers(path)
  x = _inputs(name)
  captured = {}
  model.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
  with torch.no_grad():
    added = x["added"] and {k: torch.from_numpy(v) for k, v in x["added"].items()}
    ref = model(torch.from_numpy(x["sample"]), torch.from_numpy(x["timesteps"]),
                torch.from_numpy(x["context"]), added_cond_kwargs=added).sample.numpy()
  apply = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))
  out, state = apply({"params": params}, x["sample"].transpose(0, 2, 3, 1), x["timesteps"],
                     x["context"], added_cond_kwargs=x["added"])
  return dict(name=name, path=path, module=module, ref=ref,
              out=np.asarray(out).transpose(0, 3, 1, 2), ref_mid=captured["mid"].numpy(),
              mid=np.asarray(state["intermediates"]["bottleneck"][0]).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> parity run, computed once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = _run(name, str(tmp_path_factory.mktemp(name)))
    return cache[name]
  return get


@pytest.fixture(params=sorted(CONFIGS))
def parity(request, runs):
  return runs(request.param)


def test_output_matches_diffusers(parity):
  ref, out = parity["ref"], parity["out"]
  assert out.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 0.1
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * scale)


def test_bottleneck_is_mid_block_output(parity):
  ref = parity["ref_mid"]
  np.testing.assert_allclose(parity["mid"], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_every_parameter_has_logical_axes(parity):
  module = parity["module"]
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *unet.example_inputs(module))
  leaves = jax.tree.leaves(abstract["params"],
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  bad = [leaf for leaf in leaves
         if not isinstance(leaf, nn.LogicallyPartitioned) or len(leaf.names) != leaf.value.ndim]
  assert leaves and not bad


def test_cluster_ids_reach_every_feed_forward(runs):
  """Every transformer block's FeedForward receives cluster_ids (traced only, no compile)."""
  module = runs("sd1")["module"]
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, attention.FeedForward) and context.method_name == "__call__":
      seen.append(args[1])
    return next_fun(*args, **kwargs)

  x = _inputs("sd1")
  cluster_ids = np.array([0, 1], np.int32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *unet.example_inputs(module))
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(module.apply, cluster_ids=cluster_ids), variables,
                   x["sample"].transpose(0, 2, 3, 1), x["timesteps"], x["context"])
  # sd1: one transformer block in down_blocks.0, mid_block and each of up_blocks.1's two layers.
  assert len(seen) == 4
  assert all(s is not None and s.shape == (2,) for s in seen)


def _rewrite(src, dst, edit):
  shutil.copytree(src, dst)
  file = os.path.join(dst, "diffusion_pytorch_model.safetensors")
  state = load_file(file)
  edit(state)
  save_file(state, file)
  return dst


def test_checkpoint_mismatch_names_the_key(runs, tmp_path):
  src = runs("sd1")["path"]
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

  def drop(state):
    del state[key]

  def extra(state):
    state["down_blocks.0.attentions.0.bogus.weight"] = np.zeros((3,), np.float32)

  def reshape(state):
    state[key] = np.zeros((32, 33), np.float32)

  for edit, expected in ((drop, "missing .*attn2/to_k/kernel"),
                         (extra, "unexpected .*down_blocks.0.attentions.0.bogus.weight"),
                         (reshape, f"mis-shaped .*{key}")):
    path = _rewrite(src, str(tmp_path / edit.__name__), edit)
    with pytest.raises(convert.CheckpointMismatchError, match=expected):
      convert.load_diffusers(path)


def test_export_round_trips(runs):
  """convert.flax_to_torch gives back the diffusers state dict exactly (for save_diffusers)."""
  path = runs("sdxl")["path"]
  state = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  _, params = convert.load_diffusers(path)
  exported = convert.flax_to_torch(params)
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_load_without_torch(runs):
  path = runs("sdxl")["path"]
  code = ("import sys; from grasp_jax.models import convert; "
          f"m, p = convert.load_diffusers({path!r}); "
          "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "ok" in result.stdout


def test_tiny_config_matches_diffusers_tree(tmp_path):
  """The demo UNet: diffusers builds the same config, and its checkpoint loads into ours."""
  config = unet.tiny_config()
  model = diffusers.UNet2DConditionModel.from_config(config)
  model.save_pretrained(str(tmp_path))
  module, params = convert.load_diffusers(str(tmp_path))
  assert (module.in_channels, module.cross_attention_dim) == (1, 384)
  n_params = sum(np.size(v) for v in jax.tree.leaves(params))
  assert n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("override, field", [
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(only_cross_attention=[False, True, False]), "only_cross_attention"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(num_attention_heads=4), "num_attention_heads"),
    (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type"),
    (dict(down_block_types=["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]),
     "down_block_types"),
    (dict(attention_head_dim=[4, 4]), "attention_head_dim"),
    (dict(transformer_layers_per_block=[1, [1, 2], 1]), "reverse_transformer_layers_per_block"),
    (dict(addition_embed_type="text_time"), "addition_time_embed_dim"),
    (dict(dropout=0.1), "dropout"),
])
def test_unsupported_config_is_named(override, field):
  with pytest.raises(ValueError, match=field):
    unet.from_config(unet.tiny_config(**override))


def test_unknown_config_field_is_named():
  with pytest.raises(ValueError, match="not_a_field"):
    unet.from_config({**unet.tiny_config(), "not_a_field": 1})
  with pytest.raises(ValueError, match="typo_field"):
    unet.tiny_config(typo_field=1)


def test_remat_bfloat16_variant(runs):
  """remat keeps the parameter tree (checkpoints still load); bf16 compute stays near fp32."""
  parity = runs("sd1")
  base = parity["module"]
  module = unet.from_config(CONFIGS["sd1"], dtype=jnp.bfloat16, remat=True)

  def tree(m):
    abstract = jax.eval_shape(m.init, jax.random.PRNGKey(0), *unet.example_inputs(m))
    return jax.tree.structure(abstract)
  assert tree(module) == tree(base)
  _, params = convert.load_diffusers(parity["path"])
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
  x = _inputs("sd1")
  out = jax.jit(module.apply)({"params": params}, x["sample"].transpose(0, 2, 3, 1),
                              x["timesteps"], x["context"])
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
  ref = parity["ref"]
  np.testing.assert_allclose(out, ref, rtol=0, atol=0.05 * np.abs(ref).max())
