"""Training-time image augmentations in JAX, jittable, on batches [N, H, W, C] in [-1, 1].

`shift` translates images; `random_appearance` puts half of a batch under one random low-level
change (brightness, noise, blockiness; `perturb_appearance`) so that a classifier's predictions
rest on shape more than on what generators' samples often get wrong. Used by
grasp_jax.evaluation.classifier.train's step.
"""
import jax
import jax.numpy as jnp


def shift(x, key, pixels):
  """Each image translated by up to `pixels` in x and y (edge pixels repeated)."""
  h, w = x.shape[1:3]
  offsets = jax.random.randint(key, (x.shape[0], 2), 0, 2 * pixels + 1)
  padded = jnp.pad(x, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)), mode="edge")
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, x.shape[3]))
  return jax.vmap(crop)(padded, offsets)


def perturb_appearance(x, op, amount, noise, blocks):
  """Images x [N, H, W, C] in [-1, 1], each under one low-level change (op[i]): 0 none,
  1 brightness (+amount[i] grey levels), 2 Gaussian noise (noise[i] * amount[i] grey levels of sd;
  noise: standard normal like x), 3 + j mean of every blocks[j] x blocks[j] block; clipped to
  [-1, 1] like uint8 images."""
  scale = 127.5  # grey levels per unit of [-1, 1]
  out = jnp.where((op == 1)[:, None, None, None], x + (amount / scale)[:, None, None, None], x)
  out = jnp.where((op == 2)[:, None, None, None],
                  x + noise * (amount / scale)[:, None, None, None], out)
  n, h, w, c = x.shape
  for j, k in enumerate(blocks):
    means = x.reshape(n, h // k, k, w // k, k, c).mean((2, 4))
    blocky = jnp.repeat(jnp.repeat(means, k, 1), k, 2)
    out = jnp.where((op == 3 + j)[:, None, None, None], blocky, out)
  return jnp.clip(out, -1.0, 1.0)


def random_appearance(x, key, appearance):
  """Half of the images under one change of `appearance` = (brightness, noise, blocks): a shift
  uniform in +-brightness grey levels, noise of sd uniform in [0, noise], or one block size."""
  brightness, noise_sd, blocks = appearance
  ops = [op for op, on in ((1, brightness), (2, noise_sd)) if on]
  ops += [3 + j for j in range(len(blocks))]
  k_on, k_op, k_amount, k_noise = jax.random.split(key, 4)
  n = x.shape[0]
  op = jnp.asarray(ops)[jax.random.randint(k_op, (n,), 0, len(ops))]
  op = jnp.where(jax.random.bernoulli(k_on, 0.5, (n,)), op, 0)
  u = jax.random.uniform(k_amount, (n,))
  amount = jnp.where(op == 1, (2 * u - 1) * brightness, u * noise_sd)
  return perturb_appearance(x, op, amount, jax.random.normal(k_noise, x.shape), blocks)
