"""The FID CLI on two tiny folders vs TorchScript features + scipy FID computed here."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import scipy.linalg
import torch

from grasp_jax.evaluation import inception
from grasp_jax.evaluation import fid as fid_cli


def _write_folders(root):
  rng = np.random.default_rng(0)
  blobs = lambda h, w, c: np.clip(np.cumsum(rng.normal(0, 25, (h, w, c)), axis=1) + 128,
                                  0, 255).astype(np.uint8)
  (root / "a" / "sub").mkdir(parents=True)
  (root / "b").mkdir()
  for i in range(6):  # Grey 28x28 and RGB 40x30, PNG, one in a subfolder.
    image = blobs(28, 28, 1)[..., 0] if i % 2 else blobs(40, 30, 3)
    Image.fromarray(image).save(root / "a" / ("sub" if i == 0 else "") / f"{i}.png")
  for i in range(6):  # RGB noise-ish, JPEG and PNG, larger than 299.
    image = rng.integers(0, 256, (320, 310, 3), dtype=np.uint8) // 2 + blobs(320, 310, 3) // 2
    Image.fromarray(image).save(root / "b" / f"{i}.{'jpg' if i % 2 else 'png'}")
  (root / "b" / "notes.txt").write_text("not an image")
  return root / "a", root / "b"


def _reference_features(paths):
  model = torch.jit.load(str(inception.inception_weights_path())).eval()
  batch = []
  for path in paths:
    image = Image.open(path)
    x = np.asarray(image.convert("RGB" if image.mode == "RGB" else "L"), np.float32)
    x = x if x.ndim == 3 else x[..., None]
    x = jax.image.resize(jnp.asarray(x), (299, 299, x.shape[-1]), "bilinear", antialias=True)
    x = np.broadcast_to(np.asarray(x), (299, 299, 3))
    batch.append(((x - 128.0) / 128.0).transpose(2, 0, 1))
  with torch.no_grad():
    return model(torch.from_numpy(np.stack(batch))).numpy().astype(np.float64)


def _reference_fid(a, b):
  """Textbook FID (scipy sqrtm of S1 S2), in an orthonormal basis of the span of the data.

  All of a - mu_b and b - mu_b lie in span{a_i - mu_a, b_j - mu_b, mu_a - mu_b}; FID is invariant
  to translations and isometries, so the 13-d coordinates give the exact 2048-d value while
  sqrtm stays cheap (a 2048-d sqrtm takes minutes on a busy 2-core box).
  """
  mu_a, mu_b = a.mean(0), b.mean(0)
  basis, _ = np.linalg.qr(np.concatenate([a - mu_a, b - mu_b, (mu_a - mu_b)[None]]).T)
  a, b = (a - mu_b) @ basis, (b - mu_b) @ basis
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  return np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def test_cli_matches_reference(tmp_path):
  dir_a, dir_b = _write_folders(tmp_path)
  run = subprocess.run(
      [sys.executable, "-m", "grasp_jax.evaluation.fid", str(dir_a), str(dir_b), "--kid",
       "--prdc", "--batch_size=4"], capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  printed = dict(re.findall(r"^(\w+): (.*)$", run.stdout, re.MULTILINE))
  assert printed["n_a"] == "6" and printed["n_b"] == "6"
  assert printed["weights_sha1"] == inception.INCEPTION_SHA1
  assert printed["resolution"] == "299" and printed["resize"] == "bilinear-antialias"
  assert printed["mode"] == "ours"
  assert run.stdout.count("warning: ") == 2 and "N = 6 < 2048 feature dims" in run.stdout

  feats_a = _reference_features(sorted(p for p in dir_a.rglob("*.png")))
  feats_b = _reference_features(sorted(p for p in dir_b.glob("*.*") if p.suffix != ".txt"))
  expected = _reference_fid(feats_a, feats_b)
  assert expected > 1.0
  np.testing.assert_allclose(float(printed["fid"]), expected, rtol=5e-3)
  # KID with all 6 samples per subset: the unbiased MMD^2 of the full sets, by a double loop.
  kernel = lambda u, v: (u @ v / 2048 + 1.0)**3
  mean_kernel = lambda x, y, skip_diagonal: np.mean(
      [kernel(u, v) for i, u in enumerate(x) for j, v in enumerate(y)
       if not (skip_diagonal and i == j)])
  xx, yy = mean_kernel(feats_a, feats_a, True), mean_kernel(feats_b, feats_b, True)
  xy = mean_kernel(feats_a, feats_b, False)
  np.testing.assert_allclose(float(printed["kid"]), xx + yy - 2 * xy, rtol=5e-3)
  for key in ("precision", "recall", "density", "coverage"):
    assert 0.0 <= float(printed[key]) <= (5.0 if key == "density" else 1.0)


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    fid_cli.list_images(tmp_path / "missing")
  with pytest.raises(ValueError, match="holds no"):
    fid_cli.list_images(tmp_path)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="bad.png: cannot read image"):
    fid_cli.load_image(tmp_path / "bad.png")
  Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
  with pytest.raises(ValueError, match="deep.png: I;16 pixels are not 8-bit"):
    fid_cli.load_image(tmp_path / "deep.png")
  assert [p.name for p in fid_cli.list_images(tmp_path, max_images=1)] == ["bad.png"]


def test_clean_mode_matches_reference(tmp_path):
  """--mode=clean: features of clean-fid's resize (PIL bicubic per float32 channel, clipped)
  done here by hand, through the TorchScript network."""
  dir_a, dir_b = _write_folders(tmp_path)
  model = torch.jit.load(str(inception.inception_weights_path())).eval()

  def features(paths):
    batch = []
    for path in paths:
      rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
      x = np.stack([np.asarray(Image.fromarray(rgb[..., ch], mode="F").resize(
          (299, 299), Image.BICUBIC)) for ch in range(3)], -1).clip(0, 255)
      batch.append(((x - 128.0) / 128.0).transpose(2, 0, 1))
    with torch.no_grad():
      return model(torch.from_numpy(np.stack(batch))).numpy().astype(np.float64)

  result = fid_cli.compare_folders(dir_a, dir_b, batch_size=6, mode="clean")
  expected = _reference_fid(features(sorted(dir_a.rglob("*.png"))),
                            features(sorted(p for p in dir_b.glob("*.*") if p.suffix != ".txt")))
  np.testing.assert_allclose(result["fid"], expected, rtol=5e-3)
  assert result["mode"] == "clean" and len(result["warnings"]) == 2


def test_one_image_names_the_folder(tmp_path):
  dir_a, dir_b = _write_folders(tmp_path)
  single = tmp_path / "single"
  single.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(single / "0.png")
  with pytest.raises(ValueError, match=f"{single} holds 1 image; FID needs at least 2"):
    fid_cli.compare_folders(dir_a, single)
