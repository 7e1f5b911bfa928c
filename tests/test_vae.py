"""Flax AutoencoderKL vs the diffusers PyTorch reference, loaded through models/convert.py."""
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from grasp_jax.models import convert
from grasp_jax.models import vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    # SD-1.x style: quant convs, mid-block attention, 4 latent channels.
    "sd": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
               norm_num_groups=4, scaling_factor=0.18215),
    # SD3/Flux style: no quant convs, 16 latent channels with a shift; deeper, no attention.
    "flow": dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=16,
                 norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False,
                 mid_block_add_attention=False),
}
HEIGHT, WIDTH = 16, 24  # non-square, to catch H/W mix-ups


def _save_torch_vae(config, folder):
  n = len(config["block_out_channels"])
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **config)
  # Non-trivial norm affine parameters so a scale/bias mix-up cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (folder, torch model), for every config."""
  out = {}
  for name, config in CONFIGS.items():
    folder = str(tmp_path_factory.mktemp(f"vae_{name}"))
    out[name] = folder, _save_torch_vae(config, folder)
  return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, saved):
  folder, ref = saved[request.param]
  module, params = convert.load_diffusers(folder)
  return request.param, folder, ref, module, params


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def outputs(case):
  """One jitted run per config: posterior, decoded z, and scaled sampled latents."""
  name, _, _, module, params = case
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
  f = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
  z = rng.normal(size=(2, HEIGHT // f, WIDTH // f, CONFIGS[name]["latent_channels"]))
  z = z.astype(np.float32)
  key = jax.random.PRNGKey(3)

  @jax.jit
  def run(params, x, z):
    apply = lambda *args, method: module.apply({"params": params}, *args, method=method)
    return (apply(x, method=module.encode), apply(z, method=module.decode),
            apply(x, key, method=module.encode_latents))

  dist, image, latents = run(params, x, z)
  return dict(x=x, z=z, key=key, dist=dist, image=image, latents=latents)


def test_encode_decode_match_diffusers(case, outputs):
  ref = case[2]
  with torch.no_grad():
    dist = ref.encode(_nchw(outputs["x"])).latent_dist
    ref_image = ref.decode(_nchw(outputs["z"])).sample
  for ours, theirs in ((outputs["dist"].mean, dist.mean), (outputs["dist"].logvar, dist.logvar),
                       (outputs["image"], ref_image)):
    theirs = _nhwc(theirs)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))


def test_sampling_and_latent_scaling(case, outputs):
  name, _, _, module, _ = case
  scale, shift = CONFIGS[name]["scaling_factor"], CONFIGS[name].get("shift_factor", 0.0)
  mean, logvar = np.asarray(outputs["dist"].mean), np.asarray(outputs["dist"].logvar)
  eps = np.asarray(jax.random.normal(outputs["key"], mean.shape))
  z = mean + np.exp(0.5 * logvar) * eps
  np.testing.assert_allclose(outputs["latents"], (z - shift) * scale, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(module.unscale_latents(module.scale_latents(z)), z, atol=1e-5)
  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(outputs["dist"].kl(), kl, rtol=1e-5)


def test_export_roundtrip(case):
  """convert.flax_to_torch gives back the diffusers state dict (for `save_diffusers`)."""
  ref_state = {k: v.numpy() for k, v in case[2].state_dict().items()}
  state = convert.flax_to_torch(case[4])
  assert sorted(state) == sorted(ref_state)
  for key, value in state.items():
    np.testing.assert_array_equal(value, ref_state[key], err_msg=key)


def _break(folder, tmp_path, edit_state=None, edit_config=None):
  """A copy of `folder` with its state dict or config edited."""
  out = tmp_path / "broken"
  out.mkdir()
  state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  if edit_state:
    edit_state(state)
  if edit_config:
    edit_config(config)
  save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
  (out / "config.json").write_text(json.dumps(config))
  return str(out)


def test_missing_key_is_named(case, tmp_path):
  key = "decoder.up_blocks.0.resnets.1.conv1.weight"
  folder = _break(case[1], tmp_path, edit_state=lambda s: s.pop(key))
  with pytest.raises(convert.CheckpointMismatchError, match="decoder/up_blocks_0/resnets_1/conv1"):
    convert.load_diffusers(folder)


def test_config_mismatch_is_named(case, tmp_path):
  def more_latents(config):
    config["latent_channels"] += 2
  folder = _break(case[1], tmp_path, edit_config=more_latents)
  with pytest.raises(convert.CheckpointMismatchError, match="mis-shaped.*decoder.conv_in.weight"):
    convert.load_diffusers(folder)


def test_unsupported_block_type_rejected():
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    vae.from_config({"block_out_channels": [8], "down_block_types": ["AttnDownEncoderBlock2D"]})


def test_params_have_logical_axes():
  module = vae.from_config({"block_out_channels": [8, 16], "norm_num_groups": 4,
                            "down_block_types": ["DownEncoderBlock2D"] * 2})
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *vae.example_inputs(module))
  leaves = jax.tree.leaves(abstract["params"],
                           is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert leaves and all(isinstance(x, flax.linen.LogicallyPartitioned) for x in leaves)


def test_legacy_attention_names():
  assert vae.rename("encoder.mid_block.attentions.0.proj_attn.weight") == \
      "encoder.mid_block.attentions.0.to_out.0.weight"
  assert vae.rename("decoder.mid_block.attentions.0.query.bias") == \
      "decoder.mid_block.attentions.0.to_q.bias"
  assert vae.rename("encoder.down_blocks.0.resnets.0.conv1.weight") == \
      "encoder.down_blocks.0.resnets.0.conv1.weight"


def test_load_without_torch(saved):
  """Loading a diffusers VAE folder needs numpy + safetensors only."""
  code = ("import sys\n"
          "from grasp_jax.models import convert\n"
          f"module, params = convert.load_diffusers({saved['sd'][0]!r})\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr
