"""The real command line end to end on a diffusers pipeline folder: a miniature MIMIC-CXR-LT
manual dir is built into TFDS, the tiny SD pipeline's CLIP conditions on the prompts, its VAE
turns 32x32 images into 4x4x4 latents, its UNet is fine-tuned with GRASP for two steps,
checkpointed and exported, and the samples drawn in latent space are decoded to images.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import fixtures_data as fx

pytest.importorskip("diffusers")
import test_conditioning  # noqa: E402  (its tiny pipeline fabricator; needs torch + diffusers)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sampling and evaluation at the end of training, shrunk as in configs/demo.py:smoke.
SMALL_EVAL = ["--config.sample.per_class=1", "--config.sample.steps=2",
              "--config.sample.batch_size=8", "--config.eval.real_per_class=2",
              "--config.eval.inception=false", "--config.eval.classifier_steps=2",
              "--config.eval.downstream=false"]


def test_mimic_on_a_pipeline_folder(tmp_path):
  manual, pretrained, workdir = (str(tmp_path / n) for n in ("manual", "sd", "work"))
  fx.make_mimic_dir(manual)
  test_conditioning.save_tiny_pipeline(pretrained, "sd")
  cmd = [sys.executable, "-m", "grasp_jax.main",
         "--config=configs/mimic.py:backbone=unet,method=grasp,resolution=32",
         f"--workdir={workdir}", f"--config.model.pretrained={pretrained}",
         f"--config.data.manual_dir={manual}", f"--config.data.data_dir={tmp_path / 'tfds'}",
         "--config.train.steps=2", "--config.data.batch_size=8", "--config.train.log_every=1",
         "--config.train.checkpoint_every=2", "--config.model.remat=false", *SMALL_EVAL]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-6000:]
  assert "(32, 32, 3) images -> (4, 4, 4) latents" in log, log[-6000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["text"]["encoder"] == "pipeline" and config["model"]["pretrained"] == pretrained
  assert os.listdir(os.path.join(workdir, "export", "adapters"))
  # One decoded sample per class: RGB images at the data's resolution, not 4x4 latents.
  samples = sorted(glob.glob(os.path.join(workdir, "samples", "*", "*.png")))
  assert len(samples) == 19, samples
  image = np.asarray(PIL.Image.open(samples[0]))
  assert image.shape == (32, 32, 3) and image.std() > 0
