"""export.py: merged diffusers folders, loaded by diffusers' PyTorch models, against our Flax models
with the adapters applied; the adapter export round trip; what cannot be merged."""
import json
import os
import types

import flax
import jax
import numpy as np
import pytest

from configs import common
from grasp_jax.inference import export
from grasp_jax.run import stages
from grasp_jax import partition as partition_lib
from grasp_jax.models import adapters
from grasp_jax.models import convert
from grasp_jax.models import dit
from grasp_jax.models import unet
from grasp_jax.models import trainable as trainable_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

diffusers.utils.logging.set_verbosity_error()

UNET = unet.tiny_config(block_out_channels=[8, 16], norm_num_groups=4, cross_attention_dim=8,
                        attention_head_dim=2, sample_size=8,
                        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
SD3 = dit.tiny_config(sample_size=8, patch_size=2, num_layers=2, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=6,
                      pos_embed_max_size=6)
PARTITION = partition_lib.Partition(
    class_names=("No Finding", "Effusion", "Hernia", "Edema"), class_to_cluster=(0, 1, 2, 1),
    cluster_names=("healthy", "head", "tail / few"), class_counts=(500, 80, 3, 20))
K = PARTITION.num_clusters


def _run_config(method, rank):
  config = common.base_config()
  config.method = common.method_config(method, num_clusters=K, rank=rank)
  return config


def _random_variables(module, args, seed, mask=None):
  """Every parameter random and away from its init (zero biases and `up`, unit norm scales)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args[:-1], **args[-1]))
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract["params"]))
  params = {p: (0.3 * rng.standard_normal(s.shape) + (p[-1] == "scale")).astype(np.float32)
            for p, s in flat.items()}
  variables = {"params": flax.traverse_util.unflatten_dict(params)}
  if "selora" in abstract and mask is not None:
    # SeLoRA's active ranks: an inactive rank's (nonzero) lora_b must not reach the export.
    variables["selora"] = jax.tree.map(lambda m: np.asarray(mask, np.float32),
                                       flax.linen.unbox(abstract["selora"]))
  return variables


def _unet_inputs(batch=2):
  rng = np.random.default_rng(7)
  return (rng.standard_normal((batch, 8, 8, 1), np.float32), np.array([3, 500]),
          rng.standard_normal((batch, 3, 8), np.float32))


def _sd3_inputs(batch=2):
  rng = np.random.default_rng(8)
  return (rng.standard_normal((batch, 8, 8, 1), np.float32),
          rng.standard_normal((batch, 5, 8), np.float32),
          rng.standard_normal((batch, 6), np.float32), np.array([10.0, 700.0], np.float32))


BACKBONES = {
    "unet": dict(lib=unet, config=UNET, cls=lambda: diffusers.UNet2DConditionModel,
                 inputs=_unet_inputs, init=lambda x: (*x, {"cluster_ids": np.zeros(2, np.int32)})),
    "sd3": dict(lib=dit, config=SD3, cls=lambda: diffusers.SD3Transformer2DModel,
                inputs=_sd3_inputs, init=lambda x: (*x, {"cluster_ids": np.zeros(2, np.int32)})),
}


def _torch_forward(model, backbone, inputs):
  x = torch.from_numpy(inputs[0].transpose(0, 3, 1, 2))
  with torch.no_grad():
    if backbone == "unet":
      out = model(x, torch.from_numpy(inputs[1]), torch.from_numpy(inputs[2])).sample
    else:
      out = model(x, *(torch.from_numpy(a) for a in inputs[1:])).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _load_widened(folder):
  """diffusers' own loader, through the remote code the GRASP folder ships."""
  return diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()


def _setup(backbone, adapter, tmp_path, mask=None):
  """Flax module + random variables, the base diffusers folder, the run config."""
  b = BACKBONES[backbone]
  module = b["lib"].from_config(b["config"], adapter=adapter)
  inputs = b["inputs"]()
  variables = _random_variables(module, b["init"](inputs), seed=1, mask=mask)
  base = str(tmp_path / "base")
  flat = flax.traverse_util.flatten_dict(variables["params"])
  base_params = {p: v for p, v in flat.items() if "adapter" not in p and p[-1][:5] != "lora_"}
  convert.save_diffusers(base, flax.traverse_util.unflatten_dict(base_params), b["config"])
  method = {"none": "full"}.get(adapter.method, adapter.method)
  return module, variables, inputs, base, _run_config(method, adapter.rank)


def _flax_apply(module, backbone):
  if backbone == "unet":
    return jax.jit(lambda v, x, t, c, ids: module.apply(v, x, t, c, cluster_ids=ids))
  return jax.jit(lambda v, x, c, p, t, ids: module.apply(v, x, c, p, t, cluster_ids=ids))


def _close(out, ref):
  assert out.shape == ref.shape
  return np.abs(out - ref).max() / np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# GRASP: one folder per cluster, widened FFNs, exact; loaded by AutoModel + the shipped code.

@pytest.mark.parametrize("backbone,activation", [("unet", "gelu"), ("sd3", "gelu_tanh")])
def test_grasp_cluster_export_matches_flax(backbone, activation, tmp_path):
  adapter = adapters.AdapterConfig(method="grasp", num_clusters=K, rank=3, activation=activation)
  module, variables, inputs, base, config = _setup(backbone, adapter, tmp_path)
  folders = export.export_diffusers(variables["params"], module, config, PARTITION, base,
                                    str(tmp_path / "out"))
  assert [os.path.basename(f) for f in folders] == [
      "cluster_0_healthy", "cluster_1_head", "cluster_2_tail_few"]
  apply = _flax_apply(module, backbone)
  cls = BACKBONES[backbone]["cls"]()
  base_out = np.asarray(apply(variables, *inputs, np.full(2, -1, np.int32)))  # -1: no adapter.
  outs = []
  for k, folder in enumerate(folders):
    ref = np.asarray(apply(variables, *inputs, np.full(2, k, np.int32)))
    out = _torch_forward(_load_widened(folder), backbone, inputs)
    assert _close(out, ref) < 1e-4, f"cluster {k}"
    assert _close(base_out, ref) > 1e-2  # The adapter matters at this tolerance.
    outs.append(out)
  assert _close(outs[0], outs[2]) > 1e-2
  # Stock from_pretrained refuses the wider FFN (diffusers' own shape check), never loads wrong.
  with pytest.raises(Exception, match="expected shape|size mismatch"):
    cls.from_pretrained(folders[0])


def test_grasp_clusters_by_name_and_metadata(tmp_path):
  adapter = adapters.AdapterConfig(method="grasp", num_clusters=K, rank=3)
  module, variables, _, base, config = _setup("unet", adapter, tmp_path)
  folder, = export.export_diffusers(variables["params"], module, config, PARTITION, base,
                                    str(tmp_path / "out"), clusters=["tail / few"])
  with open(os.path.join(folder, "config.json")) as f:
    meta = json.load(f)["_grasp_jax"]
  assert meta["cluster"] == 2 and meta["classes"] == ["Hernia"]
  # Every transformer block's FFN (width 16, all at the lower resolution): 4 * 16 + rank units.
  assert meta["ff_inner_dim"] == {
      f"{b}.transformer_blocks.0.ff": 4 * 16 + 3
      for b in ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                "up_blocks.0.attentions.1")}


# ---------------------------------------------------------------------------------------------
# LoRA / SeLoRA / full: one merged folder, loaded by stock from_pretrained.

@pytest.mark.parametrize("backbone,method", [("unet", "lora"), ("unet", "selora"),
                                             ("unet", "none"), ("sd3", "lora")])
def test_merged_export_loads_with_from_pretrained(backbone, method, tmp_path):
  adapter = adapters.AdapterConfig(method=method, num_clusters=K, rank=3, lora_alpha=6.0)
  module, variables, inputs, base, config = _setup(backbone, adapter, tmp_path, mask=[1, 0, 1])
  folder, = export.export_diffusers(variables["params"], module, config, PARTITION, base,
                                    str(tmp_path / "out"), selora=variables.get("selora"))
  assert os.path.basename(folder) == "merged"
  model = BACKBONES[backbone]["cls"]().from_pretrained(folder).eval()
  ids = np.zeros(2, np.int32)
  ref = np.asarray(_flax_apply(module, backbone)(variables, *inputs, ids))
  assert _close(_torch_forward(model, backbone, inputs), ref) < 1e-4
  if method != "none":  # The deltas matter at this tolerance: the base folder is far off.
    base_model = BACKBONES[backbone]["cls"]().from_pretrained(base).eval()
    assert _close(_torch_forward(base_model, backbone, inputs), ref) > 1e-2


# ---------------------------------------------------------------------------------------------
# What cannot be merged.

def _random_params(backbone, adapter):
  b = BACKBONES[backbone]
  module = b["lib"].from_config(b["config"], adapter=adapter)
  return module, _random_variables(module, b["init"](b["inputs"]()), seed=2)["params"]


def test_moe_is_not_mergeable():
  module, params = _random_params("unet", adapters.AdapterConfig(method="moe", num_clusters=K))
  with pytest.raises(export.NotMergeableError, match="router"):
    export.merge(params, module)


@pytest.mark.parametrize("backbone,activation", [("unet", "relu"), ("unet", "gelu_tanh"),
                                                 ("sd3", "gelu")])
def test_unabsorbable_grasp_activation_is_named(backbone, activation):
  adapter = adapters.AdapterConfig(method="grasp", num_clusters=K, activation=activation)
  module, params = _random_params(backbone, adapter)
  with pytest.raises(export.NotMergeableError, match=f"activation='{activation}'"):
    export.merge(params, module, cluster=0)


def test_method_mismatch_and_bad_cluster_are_named(tmp_path):
  adapter = adapters.AdapterConfig(method="grasp", num_clusters=K)
  module, params = _random_params("unet", adapter)
  with pytest.raises(ValueError, match="config.method.adapter='lora'"):
    export.export_diffusers(params, module, _run_config("lora", 8), PARTITION, str(tmp_path),
                            str(tmp_path / "out"))
  with pytest.raises(ValueError, match="unknown cluster 'nope'"):
    export.export_diffusers(params, module, _run_config("grasp", 8), PARTITION, str(tmp_path),
                            str(tmp_path / "out"), clusters=["nope"])


# ---------------------------------------------------------------------------------------------
# Adapter export round trip.

@pytest.mark.parametrize("method", ["grasp", "selora", "full"])
def test_adapters_round_trip(method, tmp_path):
  kind = {"full": "none"}.get(method, method)
  module, params = _random_params("unet", adapters.AdapterConfig(method=kind, num_clusters=K))
  masks = None
  if method == "selora":
    masks = {"down_blocks_1": {"mask": np.array([1, 1, 0, 0, 0, 0, 0, 0], np.float32)}}
  config = _run_config(method, 8)
  export.export_adapters(params, config, PARTITION, str(tmp_path), selora=masks)
  variables, part, loaded_config = export.load_adapters(str(tmp_path))
  assert part == PARTITION
  assert json.loads(loaded_config.to_json()) == json.loads(config.to_json_best_effort())
  picked = {"grasp": {"adapter"}, "selora": {"lora_a", "lora_b"}}.get(method)
  want = {p: v for p, v in flax.traverse_util.flatten_dict(params).items()
          if picked is None or picked & set(p)}
  got = flax.traverse_util.flatten_dict(variables["params"])
  assert want and sorted(got) == sorted(want)
  for path, value in want.items():
    assert got[path].dtype == value.dtype and np.array_equal(got[path], value), path
  if method == "selora":
    assert np.array_equal(variables["selora"]["down_blocks_1"]["mask"],
                          masks["down_blocks_1"]["mask"])
  else:
    assert set(variables) == {"params"}


def test_load_adapters_names_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
    export.load_adapters(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The trainer's entry point.

@pytest.mark.parametrize("method", ["grasp", "moe"])
def test_run_export_writes_both_products(method, tmp_path):
  module, params = _random_params("unet", adapters.AdapterConfig(method=method, num_clusters=K))
  config = _run_config(method, 8)
  config.model.pretrained = str(tmp_path / "base")
  convert.save_diffusers(config.model.pretrained, {}, UNET)  # Only its config.json is read.
  trainable, frozen = trainable_lib.split(params, config.method.trainable)
  trainer = types.SimpleNamespace(frozen=frozen, state=types.SimpleNamespace(
      params=trainable, ema={}, extra={}))
  exp = types.SimpleNamespace(config=config, module=module, partition=PARTITION)
  out = stages.export_run(exp, trainer, str(tmp_path))
  variables, part, _ = export.load_adapters(out["adapters"])
  assert part == PARTITION
  jax.tree.map(np.testing.assert_array_equal, variables["params"], trainable)
  if method == "moe":  # Adapters only: MoE has no merged form.
    assert out["diffusers"] == []
  else:
    assert [os.path.basename(f) for f in out["diffusers"]] == [
        "cluster_0_healthy", "cluster_1_head", "cluster_2_tail_few"]
    assert all(os.path.exists(os.path.join(f, "diffusion_pytorch_model.safetensors"))
               for f in out["diffusers"])
