"""Latent diffusion: a frozen AutoencoderKL between the data's images and the backbone's samples.

  codec = load_codec(vae_folder(config), param_dtype=config.model.frozen_dtype)
  latents = codec.encode(images, rng)         # [-1, 1] NHWC -> (z - shift) * scale, z ~ posterior
  images = codec.decode(latents)              # -> [-1, 1] (unclipped)

The VAE comes from `config.model.vae`, else from `<config.model.pretrained>/vae`. The trainer
encodes each batch on device before the step (a fresh posterior sample per step, as diffusers'
training scripts do); sampling decodes the sampler's output. Both calls are jitted with the VAE
parameters as an argument, never as closed-over constants, and shard the batch over the mesh
given at construction, else over the mesh of their input's NamedSharding. To decode inside
another jitted function, pass the parameters in: `codec.apply_decode(codec.params_on(mesh), x)`.
"""
import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from grasp_jax.parallel import sharding
from grasp_jax.models import convert
from grasp_jax.models import vae as vae_lib


def vae_folder(config):
  """The run's VAE folder, or None (pixel space)."""
  if config.model.vae:
    if not os.path.isdir(config.model.vae):
      raise FileNotFoundError(f"config.model.vae={config.model.vae!r} is not a folder")
    return config.model.vae
  if config.model.pretrained:
    sub = os.path.join(config.model.pretrained, "vae")
    if os.path.isdir(sub):
      return sub
  return None


def _mesh_of(x):
  s = getattr(x, "sharding", None)
  return s.mesh if isinstance(s, NamedSharding) else None


class LatentCodec:
  """A frozen AutoencoderKL: images <-> the scaled latents a diffusion backbone trains on.

  module: a `models.vae.AutoencoderKL`; params: its parameters (numpy or jax; ShapeDtypeStructs
  for `abstract_codec`). mesh: shard the batch over its ('data', 'fsdp') axes, parameters
  replicated (default: the input's mesh).
  """

  def __init__(self, module, params, mesh=None):
    if not isinstance(module, vae_lib.AutoencoderKL):
      raise TypeError(f"LatentCodec needs an AutoencoderKL, got {type(module).__name__}")
    self.module, self.mesh = module, mesh
    self._host_params = params
    self._placed = {}  # mesh (or None) -> params on its devices
    self._compiled = {}  # (kind, mesh) -> jitted function

  @property
  def downsample(self):
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.module.block_out_channels) - 1)

  def param_shapes(self):
    """ShapeDtypeStructs of the parameters (for memory plans)."""
    return jax.eval_shape(lambda p: p, self._host_params)

  def latent_shape(self, image_shape):
    """(H, W, C) of the images -> (h, w, latent_channels) of the latents."""
    h, w, c = image_shape
    f = self.downsample
    if c != self.module.in_channels:
      raise ValueError(f"images have {c} channels, the VAE takes {self.module.in_channels} "
                       "(config.data.channels)")
    if h % f or w % f:
      raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's downsampling {f} "
                       "(config.data.image_size)")
    return h // f, w // f, self.module.latent_channels

  # Pure functions (traceable inside any jit, parameters as an argument).

  def apply_encode(self, params, images, rng=None):
    """images [B, H, W, C] in [-1, 1] -> scaled latents; posterior mean when rng is None."""
    return self.module.apply({"params": params}, images, rng,
                             method=self.module.encode_latents)

  def apply_decode(self, params, latents):
    """Scaled latents -> images [B, H, W, C] (about [-1, 1])."""
    return self.module.apply({"params": params}, latents, method=self.module.decode_latents)

  # Jitted calls on (sharded) arrays.

  def params_on(self, mesh):
    """The parameters replicated over `mesh` (the default device for None), placed once."""
    if mesh not in self._placed:
      target = sharding.replicated(mesh) if mesh is not None else jax.devices()[0]
      self._placed[mesh] = jax.device_put(self._host_params, target)
    return self._placed[mesh]

  def _fn(self, kind, mesh):
    key = (kind, mesh)
    if key not in self._compiled:
      fn = {"sample": self.apply_encode, "mean": lambda p, x: self.apply_encode(p, x),
            "decode": self.apply_decode}[kind]
      if mesh is None:
        self._compiled[key] = jax.jit(fn)
      else:
        rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        ins = (rep, batch, rep) if kind == "sample" else (rep, batch)
        self._compiled[key] = jax.jit(fn, in_shardings=ins, out_shardings=batch)
    return self._compiled[key]

  def _placed_batch(self, x):
    """(mesh, x sharded over its batch axis) for the jitted calls."""
    if isinstance(x, jax.core.Tracer):  # Its parameters would be baked in as constants.
      raise TypeError("LatentCodec.encode/decode are jitted calls on arrays; inside a traced "
                      "function use apply_encode/apply_decode(codec.params_on(mesh), ...)")
    mesh = self.mesh if self.mesh is not None else _mesh_of(x)
    if mesh is None:
      return None, x
    if x.shape[0] % mesh.size:
      raise ValueError(f"batch of {x.shape[0]} does not split over the {mesh.size} devices "
                       "of the mesh")
    target = sharding.batch_sharding(mesh)
    if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim)):
      x = jax.device_put(x, target)  # e.g. a replicated sampler output
    return mesh, x

  def encode(self, images, rng=None):
    """images [B, H, W, C] in [-1, 1] -> scaled latents [B, h, w, latent_channels], sampled
    from the posterior with `rng` (its mean when None)."""
    mesh, images = self._placed_batch(images)
    if rng is None:
      return self._fn("mean", mesh)(self.params_on(mesh), images)
    return self._fn("sample", mesh)(self.params_on(mesh), images, rng)

  def decode(self, latents):
    """Scaled latents [B, h, w, latent_channels] -> images [B, H, W, C]."""
    mesh, latents = self._placed_batch(latents)
    return self._fn("decode", mesh)(self.params_on(mesh), latents)


def load_codec(folder, mesh=None, dtype=None, param_dtype=None):
  """A LatentCodec from a diffusers AutoencoderKL folder (`vae_folder(config)`).

  dtype: compute dtype (default float32; SD VAEs overflow in float16, bfloat16 is safe).
  param_dtype: storage dtype of the params, on the host and the devices (config.model.
    frozen_dtype; default float32). The layers cast them to the compute dtype where they use
    them, so bfloat16 storage computes as float32 on bfloat16-rounded weights.
  """
  module, params = convert.load_diffusers(folder, dtype=param_dtype and jnp.dtype(param_dtype))
  if not isinstance(module, vae_lib.AutoencoderKL):
    raise ValueError(f"{folder} holds a {type(module).__name__}, not an AutoencoderKL")
  if dtype is not None or param_dtype is not None:
    module = module.clone(dtype=jnp.dtype(dtype or jnp.float32))
  return LatentCodec(module, params, mesh)


def abstract_codec(folder, param_dtype=None):
  """A LatentCodec of the VAE folder's architecture whose params are ShapeDtypeStructs (in
  `param_dtype`): its latent shapes and sizes for planning, read from config.json alone."""
  with open(os.path.join(folder, "config.json")) as f:
    module = vae_lib.from_config(json.load(f))
  dtype = jnp.dtype(param_dtype or jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), *vae_lib.example_inputs(module))
  return LatentCodec(module, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                          params["params"]))
