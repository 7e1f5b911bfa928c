"""GRASP on ImageNet-LT (1000 classes; many > 100, few < 20 training images).

Command:
  python -m grasp_jax.main --config=configs/imagenet_lt.py:backbone=dit --workdir=DIR \
    --config.model.pretrained=/data/weights/stable-diffusion-3-medium-diffusers \
    --config.data.manual_dir=/data/imagenet  (ImageNet train/val + ImageNet_LT_*.txt)
Hardware: TPU v4-32 or 2 x 8-GPU hosts (launch/), bf16, 256 px.
Expected: the mechanism is not tied to medical data (paper); many/medium/few-shot FID reported.
"""
from configs import common
from configs import mimic


def get_config(arg=None):
  arg = common.parse_arg(arg, backbone="dit", method="grasp", resolution=256)
  c = mimic.get_config(f"backbone={arg.backbone},method={arg.method},dataset=imagenet_lt_t2i,builder_config=,"
                       f"resolution={arg.resolution},k=3")
  c.partition.strategy = "frequency"
  c.partition.thresholds = "100,20"  # ImageNet-LT shots: many > 100, few < 20.
  c.data.eval_split = "test"
  c.sample.per_class = 50
  c.eval.real_per_class = 50
  return c
