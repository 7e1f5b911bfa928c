"""GRASP on NIH-CXR-LT (20 classes); the same trainer as configs/mimic.py.

Command:
  python -m grasp_jax.main --config=configs/nih.py:backbone=unet --workdir=DIR \
    --config.model.pretrained=/data/weights/stable-diffusion-2-base \
    --config.data.manual_dir=/data/nih  (ChestX-ray14 images + nih-lt_single-label_*.csv)
Hardware: one 8-GPU host or a TPU v4-8.
Expected: synthetic tail images that raise the downstream DenseNet's macro-F1 on NIH-CXR-LT
(paper: nonzero F1 on 9/13 shared classes vs 3/13 for full fine-tuning); not reproduced here.
"""
from configs import common
from configs import mimic


def get_config(arg=None):
  arg = common.parse_arg(arg, backbone="unet", method="grasp", resolution=512, k=4)
  c = mimic.get_config(f"backbone={arg.backbone},method={arg.method},dataset=nih_cxr_lt,builder_config=,"
                       f"resolution={arg.resolution},k={arg.k}")
  return c
