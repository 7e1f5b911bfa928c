"""Class-conditional DDPM on feature vectors (Ho et al. 2020, applied to encoder features).

Forward process q(f_t | f_0) = N(sqrt(abar_t) f_0, (1 - abar_t) I); the network eps_theta(f_t, t, c)
regresses the noise with ||eps - eps_theta||^2; `sample` runs ancestral sampling with the
"fixed small" posterior variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.

The conditioning vector is MLP(sinusoidal(t)) + Embed(c), plus Dense(M_c) when the class's
memory-bank prototype is given (`prototype_cond`): the memory-conditioned variant. Two networks:
  mlp          residual MLP blocks, each modulated by the conditioning (adaLN shift/scale);
  transformer  the feature split into `num_tokens` chunks, self-attention transformer blocks
               (grasp_jax.models.attention) with the conditioning added to every token.
Features should be standardised (zero mean, unit variance per dimension) so that f_T ~ N(0, I).
"""
import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grasp_jax.diffusion import schedules
from grasp_jax.models import adapters
from grasp_jax.models import attention

NETWORKS = ("mlp", "transformer")


def timestep_embedding(t, dim, max_period=10000.0):
  """Sinusoidal embedding [B, dim] of (float or int) timesteps [B]: [cos(t w_k), sin(t w_k)]."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def _dense(features, axes, name, zero=False):
  if zero:  # Zero-initialised: the network (or the modulation) starts as the identity / zero.
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)))
  return adapters.Dense(features, kernel_axes=axes, name=name)


class _ResBlock(nn.Module):
  width: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, h, cond):
    shift, scale = jnp.split(_dense(2 * self.width, ("embed", "mlp"), "modulation", zero=True)(
        nn.silu(cond)), 2, axis=-1)
    x = attention.layer_norm(1e-6, None, "norm")(h) * (1 + scale) + shift
    x = nn.silu(_dense(self.mlp_ratio * self.width, ("embed", "mlp"), "fc1")(x))
    return h + _dense(self.width, ("mlp", "embed"), "fc2")(x)


class EpsNet(nn.Module):
  """eps_theta(f_t, t, c[, M_c]) for D-dimensional features."""
  num_classes: int
  width: int = 256
  depth: int = 3
  mlp_ratio: int = 2
  network: str = "mlp"
  num_tokens: int = 4
  heads: int = 4
  prototype_cond: bool = False

  @nn.compact
  def __call__(self, f_t, t, labels, prototypes=None):
    if self.network not in NETWORKS:
      raise ValueError(f"EpsNet.network={self.network!r} is not one of {NETWORKS}")
    dim = f_t.shape[-1]
    temb = timestep_embedding(t, self.width)
    cond = _dense(self.width, ("embed", "mlp"), "time_fc2")(
        nn.silu(_dense(self.width, ("embed", "mlp"), "time_fc1")(temb)))
    cond = cond + nn.Embed(self.num_classes, self.width, name="class_embed",
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(0.02), ("vocab", "embed")))(labels)
    if self.prototype_cond:
      if prototypes is None:
        raise ValueError("EpsNet(prototype_cond=True) needs the class prototypes [B, D]")
      cond = cond + _dense(self.width, (None, "embed"), "prototype_proj")(prototypes)

    if self.network == "mlp":
      h = _dense(self.width, (None, "embed"), "proj_in")(f_t)
      for i in range(self.depth):
        h = _ResBlock(self.width, self.mlp_ratio, name=f"block{i}")(h, cond)
      h = attention.layer_norm(1e-6, None, "norm_out")(h)
      return _dense(dim, ("embed", None), "proj_out", zero=True)(h)

    chunk = -(-dim // self.num_tokens)  # Zero-pad D to num_tokens equal chunks.
    padded = jnp.pad(f_t, ((0, 0), (0, chunk * self.num_tokens - dim)))
    tokens = padded.reshape(f_t.shape[0], self.num_tokens, chunk)
    h = _dense(self.width, (None, "embed"), "proj_in")(tokens)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               (None, "embed")),
                     (self.num_tokens, self.width))
    h = h + pos[None] + cond[:, None]
    for i in range(self.depth):
      h = attention.BasicTransformerBlock(self.heads, self.width // self.heads,
                                          cross_attention=False, activation="gelu",
                                          name=f"block{i}")(h)
    h = attention.layer_norm(1e-6, None, "norm_out")(h)
    out = _dense(chunk, ("embed", None), "proj_out", zero=True)(h)
    return out.reshape(f_t.shape[0], -1)[:, :dim]


def forward_sample(schedule: schedules.DDPMSchedule, key, f0, t):
  """A draw of q(f_t | f_0) and its noise: (sqrt(abar_t) f0 + sqrt(1 - abar_t) eps, eps)."""
  eps = jax.random.normal(key, f0.shape, f0.dtype)
  return schedules.add_noise(schedule, f0, eps, t), eps


class FeatureDDPM:
  """A trained EpsNet with its schedule; `sample` draws features for given classes."""

  def __init__(self, net: EpsNet, params, schedule: schedules.DDPMSchedule, dim: int,
               prototypes=None):
    self.net, self.params, self.schedule, self.dim = net, params, schedule, dim
    self.prototypes = None if prototypes is None else jnp.asarray(prototypes, jnp.float32)

  def sample(self, labels, key, batch_size: int = 1024) -> np.ndarray:
    """Ancestral sampling: features [N, D] for the classes `labels` (int [N])."""
    labels = np.asarray(labels, np.int32)
    if len(labels) and (labels.min() < 0 or labels.max() >= self.net.num_classes):
      raise ValueError(f"labels must lie in [0, {self.net.num_classes}), got "
                       f"[{labels.min()}, {labels.max()}]")
    out = []
    for i in range(0, len(labels), batch_size):
      chunk = labels[i:i + batch_size]
      out.append(np.asarray(_ancestral(self.net, self.params, self.schedule, self.prototypes,
                                       jax.random.fold_in(key, i), jnp.asarray(chunk),
                                       self.dim)))
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@functools.partial(jax.jit, static_argnames=("net", "dim"))
def _ancestral(net, params, schedule, prototypes, key, labels, dim):
  betas, abar = schedule.betas, schedule.alphas_cumprod
  abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
  protos = None if prototypes is None else prototypes[labels]
  key, init_key = jax.random.split(key)
  x = jax.random.normal(init_key, (labels.shape[0], dim))

  def body(x, t):
    tt = jnp.full(labels.shape, t)
    eps = net.apply({"params": params}, x, tt, labels, protos)
    mean = (x - betas[t] / jnp.sqrt(1 - abar[t]) * eps) / jnp.sqrt(1 - betas[t])
    var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
    z = jax.random.normal(jax.random.fold_in(key, t), x.shape)
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * z, None

  x, _ = jax.lax.scan(body, x, jnp.arange(schedule.num_train_timesteps - 1, -1, -1))
  return x


def train(net: EpsNet, features, labels, schedule: schedules.DDPMSchedule, *, steps: int,
          batch_size: int = 256, learning_rate: float = 1e-3, seed: int = 0,
          class_balanced: bool = True, prototypes=None, chunk: int = 500, writer=None,
          prefix: str = "feature_ddpm") -> tuple[FeatureDDPM, list[float]]:
  """Fits eps_theta on (standardised) features [N, D] with labels int [N].

  class_balanced: draw the class of each training example uniformly, then one of its features
    (every class is modelled equally well, however few features it has).
  prototypes: [C, D] class prototypes, required iff `net.prototype_cond`.
  Runs `chunk` steps per compiled scan; returns the model and the mean loss of every chunk.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  if features.ndim != 2 or len(features) != len(labels) or not len(labels):
    raise ValueError(f"features {features.shape} / labels {labels.shape}: need [N, D] and [N], "
                     f"N >= 1")
  if labels.min() < 0 or labels.max() >= net.num_classes:
    raise ValueError(f"labels must lie in [0, {net.num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")
  if net.prototype_cond != (prototypes is not None):
    raise ValueError("pass prototypes exactly when net.prototype_cond is set")
  counts = np.bincount(labels, minlength=net.num_classes)
  present = np.flatnonzero(counts)
  # Per-class index table (padded) for class-balanced draws inside the compiled loop.
  table = np.zeros((net.num_classes, counts.max()), np.int32)
  for c in present:
    table[c, :counts[c]] = np.flatnonzero(labels == c)

  data, labels_dev = jnp.asarray(features), jnp.asarray(labels)
  table, counts_dev, present_dev = jnp.asarray(table), jnp.asarray(counts), jnp.asarray(present)
  protos = None if prototypes is None else jnp.asarray(prototypes, jnp.float32)
  key = jax.random.PRNGKey(seed)
  init_key, key = jax.random.split(key)
  params = nn.unbox(net.init(init_key, data[:1], jnp.zeros((1,), jnp.int32), labels_dev[:1],
                             None if protos is None else protos[labels_dev[:1]]))["params"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  def draw(key):
    k1, k2 = jax.random.split(key)
    if class_balanced:
      cls = present_dev[jax.random.randint(k1, (batch_size,), 0, present_dev.shape[0])]
      pos = jnp.floor(jax.random.uniform(k2, (batch_size,)) * counts_dev[cls]).astype(jnp.int32)
      return table[cls, pos]
    return jax.random.randint(k1, (batch_size,), 0, data.shape[0])

  def step(carry, key):
    params, opt_state = carry
    k_idx, k_t, k_eps = jax.random.split(key, 3)
    idx = draw(k_idx)
    f0, y = data[idx], labels_dev[idx]
    t = jax.random.randint(k_t, (batch_size,), 0, schedule.num_train_timesteps)
    f_t, eps = forward_sample(schedule, k_eps, f0, t)

    def loss_fn(p):
      pred = net.apply({"params": p}, f_t, t, y, None if protos is None else protos[y])
      return jnp.mean((eps - pred) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @functools.partial(jax.jit, static_argnames=("n",))
  def run_chunk(params, opt_state, key, n):
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               jax.random.split(key, n))
    return params, opt_state, jnp.mean(losses)

  history, done = [], 0
  while done < steps:
    n = min(chunk, steps - done)
    params, opt_state, loss = run_chunk(params, opt_state, jax.random.fold_in(key, done), n)
    done += n
    history.append(float(loss))
    logging.info("%s step %d/%d loss %.4f", prefix, done, steps, history[-1])
    if writer is not None:
      writer.write_scalars(done, {f"{prefix}/loss": history[-1]})
  return FeatureDDPM(net, params, schedule, features.shape[1], protos), history
