"""The embedded demo: GRASP on long-tailed Fashion-MNIST (NIH ChestX-ray14 class profile), CPU.

Command:  python -m grasp_jax.main --config=configs/demo.py --workdir=workdir/demo
Variants: configs/demo.py:method=full | lora | selora | moe, backbone=dit, cbdm, coral,
          smoke (tests: a few minutes, mostly compiles).
Hardware: 2 CPU cores; the whole run (pretrain the small base, fine-tune, sample, evaluate)
is sized for <= 10 minutes.
Expected: WORKDIR/partition.json, base/ (the pretrained base as a diffusers folder),
checkpoints/, samples/<class>/*.png, results.json with per-group metrics, export/.
The images are Fashion-MNIST, not medical; only the class-frequency profile is clinical.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, backbone="unet", method="grasp", smoke=False, seed=0, cbdm=False,
                         coral=False)
  c = common.base_config()
  c.seed = arg.seed
  c.data.image_size = 32
  c.data.channels = 1
  c.data.batch_size = 16
  c.data.balance = "cluster"
  # T-shirt/top takes No Finding's count in the NIH profile, so it plays the healthy group.
  c.partition.healthy = "T-shirt/top"
  c.model.backbone = arg.backbone
  if arg.backbone == "unet":
    # Attention (and so the adapters) only at 8x8: attention at 16x16 doubles the step time on
    # CPU (0.47 vs 0.25 s at batch 16, 2 cores) for a demo that must finish in 10 minutes.
    c.model.base = dict(block_out_channels=[16, 32, 64], down_block_types=[
        "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=[
            "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
  c.method = common.method_config(arg.method, num_clusters=c.partition.k, rank=8)
  common.with_regularisers(c, cbdm=arg.cbdm, coral=arg.coral)
  if arg.backbone == "dit":
    c.diffusion.objective = "flow"
    c.sample.sampler = "euler"
    c.sample.steps = 28
  c.model.base_steps = 600
  c.diffusion.clip_sample = c.model.backbone == "unet"  # Pixel space, as diffusers' DDPM default.
  c.model.base_learning_rate = 1e-3
  c.train.steps = 300
  c.optim.learning_rate = 1e-3 if arg.method != "full" else 3e-4
  c.train.log_every = 50
  c.train.checkpoint_every = 200
  c.sample.per_class = 16
  c.sample.batch_size = 32
  c.sample.steps = 20 if arg.backbone == "unet" else c.sample.steps
  c.eval.real_per_class = 24
  c.eval.classifier_steps = 150
  if arg.smoke:
    if arg.backbone == "unet":  # Fewer blocks: the smoke run is dominated by XLA compiles.
      c.model.base = dict(block_out_channels=[16, 32], down_block_types=[
          "DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D",
                                                                   "UpBlock2D"])
    else:
      c.model.base = dict(num_layers=2)
    c.data.batch_size = 8
    c.model.base_steps = 4
    c.train.steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.sample.per_class = 2
    c.sample.steps = 2
    c.eval.real_per_class = 2
    c.eval.inception = False
    c.eval.classifier_steps = 2
    c.eval.evaluator_steps = 2  # Plumbing only: a flagged evaluator.
    c.eval.n_boot = 10
    c.eval.downstream = False  # Covered by tests/test_evaluate.py; three more compiles here.
  return c
