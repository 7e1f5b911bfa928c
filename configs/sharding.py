"""Large backbones on many devices: FSDP rule sets and SD3-medium / SD2-sized model configs.

Command (memory plan on 8 simulated devices, nothing allocated):
  python -m grasp_jax.main --config=configs/sharding.py:model=sd3_medium,data=2,fsdp=4 \
    --workdir=/tmp/plan --dry_run --dry_run_devices=8
Training: add --config.model.pretrained=/data/weights/stable-diffusion-3-medium-diffusers (or an SD2
folder for model=sd2_unet) and a dataset (--config.data.name=..., see configs/mimic.py), and launch
with launch/tpu_vm.sh or launch/gpu_slurm.sbatch. Without `pretrained` the architecture below is
initialised from scratch (memory planning and tests only: no such weights ship here).
Hardware: a TPU v4-32 / v5p-16 or 8+ 80 GB GPUs for method=full; GRASP (frozen base, adapters only)
fits far smaller meshes since the optimizer state is for the adapters alone.

FSDP (`fsdp_rules`): every large parameter is sharded over the 'fsdp' mesh axis on its width
('embed'; else 'mlp' / 'heads' / 'conv_out'), so parameters, gradients and optimizer state take
1/fsdp of their size per device and are all-gathered layer by layer in the step; the batch is split
over 'data' x 'fsdp'. Adapter stacks stay replicated along K ('cluster'): a sample gathers its own
row locally. Norm scales and adapter ranks are small and replicated.
"""
from configs import common

MODELS = ("sd3_medium", "sd2_unet")


def data_parallel_rules():
  """Pure data parallelism: every parameter replicated, the batch over all devices."""
  return (("batch", ("data", "fsdp")), ("embed", None), ("mlp", None), ("heads", None),
          ("conv_in", None), ("conv_out", None), ("norm", None), ("vocab", None),
          ("cluster", None), ("rank", None))


def fsdp_rules():
  """Parameters (and with them gradients and optimizer state) sharded over 'fsdp'.

  flax assigns a mesh axis at most once per array, in rule order: a kernel ('embed', 'mlp') is
  sharded on 'embed', one without 'embed' on 'mlp', 'heads' or 'conv_out' (the first present).
  """
  return (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
          ("conv_out", "fsdp"), ("vocab", "fsdp"), ("conv_in", None), ("norm", None),
          ("cluster", None), ("rank", None))


def sd3_medium():
  """SD3-medium-sized MMDiT (diffusers SD3Transformer2DModel config): ~2.0B parameters.

  Width 1536 = 24 heads x 64, 24 joint blocks, patch 2 on a 128x128x16 latent (1024 px), text
  tokens of width 4096 (CLIP-L/G + T5-XXL), pooled text 2048.
  """
  return dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16,
              out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
              joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
              pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)


def sd2_unet():
  """SD2-sized UNet2DConditionModel (stabilityai/stable-diffusion-2-base): ~866M parameters.

  Heads (5, 10, 20, 20) of width 64 per level (diffusers' `attention_head_dim` holds head
  counts for SD2), linear projections, OpenCLIP-H text states of width 1024, 64x64x4 latents.
  """
  return dict(_class_name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                              "CrossAttnUpBlock2D"),
              block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
              attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
              use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def get_config(arg=None):
  """model: sd3_medium | sd2_unet; method; data x fsdp mesh; global batch; K clusters."""
  arg = common.parse_arg(arg, model="sd3_medium", method="grasp", data=-1, fsdp=8, batch=64,
                         k=4, rank=64)
  if arg.model not in MODELS:
    raise ValueError(f"configs/sharding.py: model={arg.model!r} is not one of {MODELS}")
  c = common.base_config()
  dit = arg.model == "sd3_medium"
  arch = sd3_medium() if dit else sd2_unet()
  c.model.backbone = "dit" if dit else "unet"
  c.model.base = {k: v for k, v in arch.items() if not k.startswith("_")}
  c.model.dtype = "bfloat16"
  c.model.remat = True
  # The backbone trains on cached VAE latents and cached text-encoder states.
  c.data.image_size = arch["sample_size"]
  c.data.channels = arch["in_channels"]
  c.data.batch_size = arg.batch
  c.text.max_length = 333 if dit else 77  # SD3: 77 CLIP + 256 T5 tokens.
  c.partition.k = arg.k
  c.method = common.method_config(arg.method, num_clusters=arg.k, rank=arg.rank)
  c.diffusion.objective = "flow" if dit else "eps"
  c.sample.sampler = "euler" if dit else "dpmpp2m"
  c.mesh.data, c.mesh.fsdp = arg.data, arg.fsdp
  c.mesh.rules = fsdp_rules()
  return c
