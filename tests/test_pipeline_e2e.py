"""The real command line end to end on a diffusers pipeline folder, as a user at scale runs it:
a miniature MIMIC-CXR-LT manual dir is built into TFDS at 64 px (`data.build`), its train split
is encoded once by the tiny SD pipeline's VAE and CLIP (`task.precompute`), and the UNet is
fine-tuned with GRASP on that cache for two steps with bfloat16 frozen weights and two
micro-batches per step, checkpointed and exported; the samples drawn in latent space are decoded
to images.
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
              "--config.sample.batch_size=8", "--config.eval.real_per_class=1",
              "--config.eval.inception=false", "--config.eval.classifier_steps=2",
              "--config.eval.downstream=false", "--config.eval.evaluator_steps=2",
              "--config.eval.n_boot=10"]


def run(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-6000:]
  return log


def test_mimic_on_a_pipeline_folder(tmp_path):
  manual, pretrained, workdir, cache, data_dir = (
      str(tmp_path / n) for n in ("manual", "sd", "work", "cache", "tfds"))
  fx.make_mimic_dir(manual)
  test_conditioning.save_tiny_pipeline(pretrained, "sd")
  run("grasp_jax.data.build", "mimic_cxr_lt/cxr_lt_2022", "--image_size=64",
      f"--manual_dir={manual}", f"--data_dir={data_dir}")
  config = ["--config=configs/mimic.py:backbone=unet,method=grasp,resolution=64",
            f"--config.model.pretrained={pretrained}", f"--config.data.data_dir={data_dir}",
            "--config.model.frozen_dtype=bfloat16"]
  run("grasp_jax.task.precompute", *config, f"--cache_dir={cache}", "--chunk_size=8")
  assert os.path.exists(os.path.join(cache, "manifest.json"))
  log = run("grasp_jax.main", *config, f"--workdir={workdir}", f"--config.data.cache={cache}",
            "--config.train.grad_accum_steps=2", "--config.train.steps=2",
            "--config.data.batch_size=16", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.model.remat=false", *SMALL_EVAL,
            # The fabricated balanced_test split has one image of two classes: no held-out pool.
            "--config.data.eval_split=train")
  assert "(64, 64, 3) images -> (8, 8, 4) latents" in log, log[-6000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["text"]["encoder"] == "pipeline" and config["model"]["pretrained"] == pretrained
  assert config["data"]["cache"] == cache and config["train"]["grad_accum_steps"] == 2
  assert os.listdir(os.path.join(workdir, "export", "adapters"))
  # One decoded sample per class: RGB images at the data's resolution, not 8x8 latents.
  samples = sorted(glob.glob(os.path.join(workdir, "samples", "*", "*.png")))
  assert len(samples) == 19, samples
  image = np.asarray(PIL.Image.open(samples[0]))
  assert image.shape == (64, 64, 3) and image.std() > 0
