"""models/dit.py against diffusers' SD3Transformer2DModel (PyTorch), plus loading and structure."""
import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from grasp_jax.models import attention, convert, dit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# name -> (diffusers config, input height x width).
CASES = {
    # The demo config: 1 channel, patch 4, MiniLM widths, grid == pos_embed_max_size.
    "tiny": (dit.tiny_config(), (32, 32)),
    # SD3.5-style: rms qk-norm, dual attention; non-square input cropped from a larger grid whose
    # coordinates are non-integer (base 8, max 12); out_channels != in_channels.
    "sd35": (dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                  caption_projection_dim=32, pooled_projection_dim=20, pos_embed_max_size=12,
                  dual_attention_layers=(0, 1), qk_norm="rms_norm"), (16, 12)),
    # No pos_embed_max_size: diffusers recomputes the table for an input grid unlike sample_size.
    "nomax": (dict(sample_size=8, patch_size=1, in_channels=3, out_channels=3, num_layers=2,
                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                   caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=None,
                   qk_norm="layer_norm"), (6, 10)),
}


def _torch_model(config, seed=0):
  torch.manual_seed(seed)
  model = diffusers.SD3Transformer2DModel.from_config(config).eval()
  with torch.no_grad():  # Move every weight off its init (norm scales of 1, zero biases).
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(config, height, width, batch=2, tokens=5):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, height, width, config["in_channels"]), np.float32)
  context = rng.standard_normal((batch, tokens, config["joint_attention_dim"]), np.float32)
  pooled = rng.standard_normal((batch, config["pooled_projection_dim"]), np.float32)
  timestep = np.array([10.0, 700.0], np.float32)[:batch]
  return x, context, pooled, timestep


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  config, (height, width) = CASES[request.param]
  model = _torch_model(config)
  x, context, pooled, timestep = _inputs(config, height, width)
  middle = {}

  def keep_image_tokens(mod, args, out):  # A block returns (context, image tokens).
    middle["h"] = out[1].numpy()

  hook = model.transformer_blocks[(config["num_layers"] - 1) // 2].register_forward_hook(
      keep_image_tokens)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(context),
                torch.from_numpy(pooled), torch.from_numpy(timestep)).sample.numpy()
  hook.remove()
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder, safe_serialization=True)
  module, params = convert.load_diffusers(folder)
  out, state = jax.jit(lambda p, *a: module.apply({"params": p}, *a, mutable=["intermediates"]))(
      params, x, context, pooled, timestep)
  return dict(name=request.param, config=config, folder=folder, module=module, params=params,
              inputs=(x, context, pooled, timestep), ref=ref.transpose(0, 2, 3, 1),
              ref_middle=middle["h"], out=np.asarray(out),
              middle=np.asarray(state["intermediates"]["bottleneck"][0]),
              buffer=model.pos_embed.pos_embed.numpy() if config["pos_embed_max_size"] else None)


def test_matches_diffusers(case):
  assert case["out"].shape == case["ref"].shape
  scale = np.abs(case["ref"]).max()
  assert np.abs(case["out"] - case["ref"]).max() <= 1e-4 * scale


def test_bottleneck_is_middle_block_output(case):
  scale = np.abs(case["ref_middle"]).max()
  assert np.abs(case["middle"] - case["ref_middle"]).max() <= 1e-4 * scale


def test_pos_embed_buffer_matches_diffusers(case):
  ours = dit.buffers(case["module"])
  if case["buffer"] is None:
    assert ours == {} and "pos_embed.pos_embed" not in load_file(
        os.path.join(case["folder"], "diffusion_pytorch_model.safetensors"))
  else:
    np.testing.assert_allclose(ours["pos_embed.pos_embed"], case["buffer"], atol=1e-5)


@pytest.mark.parametrize("case", ["sd35"], indirect=True)
def test_remat_and_bf16(case):
  """remat changes nothing; bf16 compute stays near the fp32 reference."""
  params, inputs, ref = case["params"], case["inputs"], case["ref"]
  run = lambda module: jax.jit(module.apply)({"params": params}, *inputs)
  out = run(case["module"].clone(remat=True))
  np.testing.assert_allclose(out, case["out"], atol=1e-5 * np.abs(ref).max())
  out = run(case["module"].clone(dtype=jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out, np.float32) - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("small"))
  _torch_model(CASES["sd35"][0]).save_pretrained(folder, safe_serialization=True)
  return folder


def test_bad_key_is_named(small_folder, tmp_path):
  state = load_file(os.path.join(small_folder, "diffusion_pytorch_model.safetensors"))
  state["transformer_blocks.1.attn.to_qq.weight"] = state.pop(
      "transformer_blocks.1.attn.to_q.weight")
  save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(small_folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.load_diffusers(str(tmp_path))
  assert "transformer_blocks.1.attn.to_qq.weight" in str(err.value)
  assert "transformer_blocks_1/attn/to_q/kernel" in str(err.value)


def test_loading_does_not_import_torch(small_folder):
  code = ("import sys; from grasp_jax.models import convert; "
          f"convert.load_diffusers({small_folder!r}); "
          "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
          "assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-2000:]


def _abstract_init(module, *args, **kwargs):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)


def test_every_param_has_logical_axes():
  module = dit.from_config(CASES["sd35"][0])
  params = _abstract_init(module, *dit.example_inputs(module))["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                        for x in leaves)
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  assert "transformer_blocks_0/attn2/norm_q/scale" in flat  # SD3.5 pieces are present,
  assert "transformer_blocks_2/attn/to_add_out/kernel" not in flat  # the last block is pre-only.


@pytest.mark.parametrize("context_adapter", [True, False])
def test_cluster_ids_reach_every_feedforward(context_adapter):
  module = dit.from_config(dit.tiny_config(num_layers=3), context_adapter=context_adapter)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, attention.FeedForward) and context.method_name == "__call__":
      ids = args[1] if len(args) > 1 else kwargs.get("cluster_ids")
      seen[context.module.scope.path] = ids is not None
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    _abstract_init(module, *dit.example_inputs(module), cluster_ids=jnp.zeros((1,), jnp.int32))
  expected = {("transformer_blocks_%d" % i, "ff"): True for i in range(3)}
  expected.update({("transformer_blocks_%d" % i, "ff_context"): context_adapter for i in range(2)})
  assert seen == expected


@pytest.mark.parametrize("field,value", [("qk_norm", "l2"), ("caption_projection_dim", 48),
                                         ("dual_attention_layers", [0, 7]), ("foo", 1)])
def test_unsupported_config_is_named(field, value):
  with pytest.raises(ValueError, match=field):
    dit.from_config(dit.tiny_config(**{field: value}))


def test_bad_input_shape_is_named():
  module = dit.from_config(dit.tiny_config())
  x, context, pooled, timestep = dit.example_inputs(module)
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    _abstract_init(module, jnp.zeros((1, 64, 32, 1)), context, pooled, timestep)
  with pytest.raises(ValueError, match="patch_size"):
    _abstract_init(module, jnp.zeros((1, 30, 32, 1)), context, pooled, timestep)


def test_tiny_config_is_a_diffusers_config():
  config = json.loads(json.dumps(dit.tiny_config()))
  model = diffusers.SD3Transformer2DModel.from_config(config)
  module = dit.from_config(dict(model.config))
  assert module.in_channels == 1 and module.joint_attention_dim == 384
