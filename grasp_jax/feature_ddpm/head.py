"""Classifier head on features, trained on real features mixed with synthetic tail features.

Each minibatch holds `batch_size - n_syn` real features drawn uniformly and, when a synthetic
pool is given, n_syn = round(batch_size * synth_fraction) synthetic ones, which carry their
confidence as sample weight (see grasp_jax.feature_ddpm.losses). With `warmup_steps` (curriculum)
synthetic samples get weight 0 until that step. All seeds train at once (vmap) inside one
compiled scan.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class FeatureHead(nn.Module):
  """Linear (hidden=0) or one-hidden-layer MLP head; `normed` gives cosine logits (LDAM)."""
  num_classes: int
  hidden: int = 0
  normed: bool = False

  @nn.compact
  def __call__(self, x):
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, name="hidden",
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.lecun_normal(), (None, "mlp")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("mlp",)))(x))
    if self.normed:  # Cao et al.'s NormedLinear: cos(x, w_c).
      w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None)),
                     (x.shape[-1], self.num_classes))
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
      return x @ (w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-12))
    return nn.Dense(self.num_classes, name="out",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)


def mixed_class_counts(labels, synthetic_labels, synthetic_weights, synth_fraction: float,
                       num_classes: int) -> np.ndarray:
  """Class counts whose proportions are those of the mixed minibatches.

  A batch draws a share 1 - f of real features (class c with probability n_c / N) and a share f
  of synthetic ones, which count with their confidence weight (class c: sum of its weights / M).
  Scaled to N + M samples. Cost-sensitive losses built from these counts re-balance what the
  head actually sees, instead of re-weighting tail classes twice (once by the CSL, once by the
  synthetic share).
  """
  real = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
  syn = np.bincount(np.asarray(synthetic_labels), weights=np.asarray(synthetic_weights, float),
                    minlength=num_classes)
  total = len(labels) + len(synthetic_labels)
  share = (1 - synth_fraction) * real / real.sum() + synth_fraction * syn / max(syn.sum(), 1e-12)
  return share * total


def _indices(rng, steps, batch_size, num_real, num_syn, synth_fraction):
  n_syn = int(round(batch_size * synth_fraction)) if num_syn else 0
  real = rng.integers(0, num_real, (steps, batch_size - n_syn))
  syn = num_real + rng.integers(0, max(num_syn, 1), (steps, n_syn))
  return np.concatenate([real, syn], axis=1).astype(np.int32)


def train(head: FeatureHead, features, labels, loss_fn, *, steps: int, batch_size: int = 256,
          learning_rate: float = 1e-3, seeds=(0,), synthetic=None, synth_fraction: float = 0.25,
          warmup_steps: int = 0):
  """Trains one head per seed; returns params stacked over seeds (leading axis len(seeds)).

  features [N, D], labels int [N]: the real training features.
  synthetic: optional (features [M, D], labels [M], confidence [M]).
  loss_fn: `(logits, labels, weights, step) -> scalar` (grasp_jax.feature_ddpm.losses).
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  weights = np.ones(len(labels), np.float32)
  synthetic_mask = np.zeros(len(labels), bool)
  num_syn = 0
  if synthetic is not None:
    syn_f, syn_y, syn_w = (np.asarray(a) for a in synthetic)
    if not (len(syn_f) == len(syn_y) == len(syn_w)) or syn_f.shape[1:] != features.shape[1:]:
      raise ValueError(f"synthetic features {syn_f.shape}, labels {syn_y.shape}, confidence "
                       f"{syn_w.shape} do not match real features {features.shape}")
    if not 0.0 < synth_fraction < 1.0:
      raise ValueError(f"synth_fraction={synth_fraction} must lie in (0, 1)")
    num_syn = len(syn_f)
    features = np.concatenate([features, syn_f.astype(np.float32)])
    labels = np.concatenate([labels, syn_y.astype(np.int32)])
    weights = np.concatenate([weights, syn_w.astype(np.float32)])
    synthetic_mask = np.concatenate([synthetic_mask, np.ones(num_syn, bool)])
  if labels.min() < 0 or labels.max() >= head.num_classes:
    raise ValueError(f"labels must lie in [0, {head.num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")
  num_real = len(labels) - num_syn
  idx = np.stack([_indices(np.random.default_rng(s), steps, batch_size, num_real, num_syn,
                           synth_fraction) for s in seeds])  # [S, steps, B]
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
  data = (jnp.asarray(features), jnp.asarray(labels), jnp.asarray(weights),
          jnp.asarray(synthetic_mask))
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def one_seed(key, idx):
    params = nn.unbox(head.init(key, data[0][:1]))["params"]
    opt_state = tx.init(params)

    def step(carry, inputs):
      params, opt_state = carry
      i, batch = inputs
      x, y, w, is_syn = (a[batch] for a in data)
      w = jnp.where(is_syn & (i < warmup_steps), 0.0, w)

      def loss(p):
        return loss_fn(head.apply({"params": p}, x), y, w, i)

      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value

    (params, _), _ = jax.lax.scan(step, (params, opt_state), (jnp.arange(steps), idx))
    return params

  return jax.jit(jax.vmap(one_seed))(keys, jnp.asarray(idx))


def predict(head: FeatureHead, params, features) -> np.ndarray:
  """Class predictions [S, N] of the stacked heads (unadjusted logits)."""
  logits = jax.jit(jax.vmap(lambda p: head.apply({"params": p}, jnp.asarray(features))))(params)
  return np.asarray(jnp.argmax(logits, -1))
