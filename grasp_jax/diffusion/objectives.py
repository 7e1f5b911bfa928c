"""Training objectives: denoising and flow-matching losses, CBDM and CORAL regularisers.

Losses are returned per sample, [B], so the trainer can average them and also segment-sum them per
cluster; aux outputs carry what the regularisers and metrics need (timesteps, CFG drop mask, ...).

`model_fn(x_t, t, cond, cluster_ids)` returns the prediction, or `(prediction, aux)` — e.g. the
mutable collections of `model.apply(..., mutable=['intermediates'])`; the aux of the main pass is
returned as `aux['model']` so CORAL can read the sown bottleneck from it. Parameters are closed over
by `model_fn`, so `jax.grad` of a function calling these losses differentiates through them.
All per-element errors are means over the non-batch axes (diffusers' `F.mse_loss` convention).
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from grasp_jax.diffusion import schedules as sched


def _apply(model_fn, x_t, t, cond, cluster_ids):
  out = model_fn(x_t, t, cond, cluster_ids)
  pred, aux = out if isinstance(out, tuple) else (out, None)
  return pred.astype(jnp.float32), aux


def _mean_sq(a, b):
  return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


def drop_condition(rng, cond, null_cond, drop_prob):
  """Classifier-free-guidance condition dropout, per sample.

  With probability `drop_prob` a sample's condition is replaced by `null_cond` (leaves broadcast
  to the cond leaves, e.g. [1, L, D] or [L, D]). Returns (cond, drop_mask bool [B]).
  """
  batch = jax.tree.leaves(cond)[0].shape[0]
  drop = jax.random.bernoulli(rng, drop_prob, (batch,))

  def swap(c, n):
    where = drop.reshape((batch,) + (1,) * (c.ndim - 1))
    return jnp.where(where, jnp.broadcast_to(n, c.shape).astype(c.dtype), c)

  return jax.tree.map(swap, cond, null_cond), drop


@dataclasses.dataclass(frozen=True, eq=False)
class CBDM:
  """Class-balancing regulariser of Qin et al. 2023 (CBDM), with its paper/code defaults.

  Attributes:
    class_probs: [num_classes] distribution of the balancing labels y' (training class
      frequencies from scratch, uniform when fine-tuning); normalised here.
    cond_for_labels: labels int32 [B] -> condition pytree for y'.
    cluster_for_labels: labels [B] -> cluster ids [B] of y' (required when the model takes
      cluster ids: the y' pass must use y''s adapters).
    tau: regulariser strength; per-sample weight is tau * t/T (DDPM) or tau * sigma (flow).
    commitment_weight: weight of the swapped stop-gradient term (CBDM: 1/4).
  """
  class_probs: Any
  cond_for_labels: Callable[[jax.Array], Any]
  cluster_for_labels: Callable[[jax.Array], jax.Array] | None = None
  tau: float = 1.0
  commitment_weight: float = 0.25


def _cbdm_loss(cbdm: CBDM, model_fn, rng, x_t, t, t_frac, pred, cluster_ids):
  """tau w_t (||p(y) - sg p(y')||^2 + c ||sg p(y) - p(y')||^2) per sample, and y'."""
  if cbdm.cluster_for_labels is None and cluster_ids is not None:
    raise ValueError("CBDM.cluster_for_labels is required when the model takes cluster ids")
  probs = jnp.asarray(cbdm.class_probs, jnp.float32)
  labels = jax.random.categorical(rng, jnp.log(probs / probs.sum()), shape=t.shape)
  balanced_ids = None if cbdm.cluster_for_labels is None else cbdm.cluster_for_labels(labels)
  pred_bal, _ = _apply(model_fn, x_t, t, cbdm.cond_for_labels(labels), balanced_ids)
  weight = cbdm.tau * t_frac
  reg = _mean_sq(pred, jax.lax.stop_gradient(pred_bal))
  com = _mean_sq(jax.lax.stop_gradient(pred), pred_bal)
  return weight * (reg + cbdm.commitment_weight * com), labels


def _conditioned_loss(model_fn, rng, x_t, t, t_frac, target, weight, cond, cluster_ids, *,
                      null_cond, cond_drop_prob, cbdm):
  """Shared tail of both losses: CFG dropout, the main pass, weighting, CBDM."""
  drop_rng, cbdm_rng = jax.random.split(rng)
  if cond_drop_prob > 0:
    if null_cond is None:
      raise ValueError(f"cond_drop_prob={cond_drop_prob} needs a null_cond")
    cond, drop = drop_condition(drop_rng, cond, null_cond, cond_drop_prob)
  else:
    drop = jnp.zeros(t.shape, bool)
  pred, model_aux = _apply(model_fn, x_t, t, cond, cluster_ids)
  denoise = weight * _mean_sq(pred, target)
  aux = {"t": t, "t_frac": t_frac, "drop_mask": drop, "loss_denoise": denoise}
  if model_aux is not None:
    aux["model"] = model_aux
  losses = denoise
  if cbdm is not None:
    # CBDM regularises only samples that kept their condition.
    reg, labels = _cbdm_loss(cbdm, model_fn, cbdm_rng, x_t, t, t_frac, pred, cluster_ids)
    reg = jnp.where(drop, 0.0, reg)
    aux.update(loss_cbdm=reg, cbdm_labels=labels)
    losses = losses + reg
  return losses, aux


def diffusion_loss(model_fn, schedule: sched.DDPMSchedule, x0, cond, cluster_ids, rng, *,
                   null_cond=None, cond_drop_prob=0.0, min_snr_gamma=None, cbdm: CBDM | None = None,
                   t=None, noise=None):
  """DDPM denoising loss for the schedule's prediction type (eps / v / x0), per sample [B].

  Args:
    model_fn: see the module docstring.
    schedule: a `DDPMSchedule`.
    x0: clean data (latents) [B, ...].
    cond, cluster_ids: condition pytree (leaves batch-first) and cluster ids [B] (or None).
      Dropped samples keep their cluster id, as at sampling time the unconditional pass uses the
      prompt's cluster.
    rng: PRNG key.
    null_cond: the null condition for CFG dropout.
    cond_drop_prob: per-sample probability of replacing cond by null_cond.
    min_snr_gamma: if set, Min-SNR-gamma weights on the denoising term.
    cbdm: optional `CBDM` regulariser.
    t, noise: optional fixed timesteps int [B] / noise (default: uniform t, standard normal).
  Returns:
    (losses [B], aux) with aux keys t, t_frac (= t/T), drop_mask, loss_denoise, [loss_cbdm,
    cbdm_labels], [model].
  """
  t_rng, noise_rng, rng = jax.random.split(rng, 3)
  x0 = x0.astype(jnp.float32)
  T = schedule.num_train_timesteps
  if t is None:
    t = jax.random.randint(t_rng, x0.shape[:1], 0, T)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = sched.add_noise(schedule, x0, noise, t)
  target = sched.training_target(schedule, x0, noise, t)
  weight = (jnp.ones(t.shape) if min_snr_gamma is None
            else sched.min_snr_weight(schedule, t, min_snr_gamma))
  return _conditioned_loss(model_fn, rng, x_t, t, t / T, target, weight, cond, cluster_ids,
                           null_cond=null_cond, cond_drop_prob=cond_drop_prob, cbdm=cbdm)


def flow_matching_loss(model_fn, schedule: sched.FlowSchedule, x0, cond, cluster_ids, rng, *,
                       null_cond=None, cond_drop_prob=0.0, sigma_sampling="logit_normal",
                       logit_mean=0.0, logit_std=1.0, mode_scale=1.29, loss_weighting="none",
                       cbdm: CBDM | None = None, sigma=None, noise=None):
  """Rectified-flow (SD3) velocity loss ||v(x_s, s) - (noise - x0)||^2, per sample [B].

  Sigmas follow `schedules.sample_flow_sigmas` (with the schedule's shift); the model sees
  t = sigma * T. `loss_weighting` is SD3's none / sigma_sqrt / cosmap. The CBDM analogue regularises
  velocities with weight tau * sigma. Other arguments and aux as `diffusion_loss` (t_frac = sigma).
  """
  s_rng, noise_rng, rng = jax.random.split(rng, 3)
  x0 = x0.astype(jnp.float32)
  if sigma is None:
    sigma = sched.sample_flow_sigmas(s_rng, x0.shape[0], schedule, sampling=sigma_sampling,
                                     logit_mean=logit_mean, logit_std=logit_std,
                                     mode_scale=mode_scale)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = sched.flow_add_noise(x0, noise, sigma)
  t = sched.flow_timestep(schedule, sigma)
  weight = sched.flow_loss_weight(sigma, loss_weighting)
  return _conditioned_loss(model_fn, rng, x_t, t, sigma, sched.flow_target(x0, noise), weight,
                           cond, cluster_ids, null_cond=null_cond, cond_drop_prob=cond_drop_prob,
                           cbdm=cbdm)


# ---------------------------------------------------------------------------------------------
# CORAL (Rodriguez et al. 2025): supervised contrastive loss on the pooled bottleneck.


class CoralHead(nn.Module):
  """CORAL's projection of the pooled bottleneck feature: Linear -> `features` (128)."""
  features: int = 128

  @nn.compact
  def __call__(self, x):
    return nn.Dense(
        self.features, dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        name="proj")(x.astype(jnp.float32))


def sown_value(state, name="bottleneck"):
  """The value a model sowed under `name`, from `model.apply(..., mutable=['intermediates'])`'s
  returned collections (or the 'intermediates' dict itself). Exactly one sow is expected; of a
  sown tuple the last value is returned."""
  flat = traverse_util.flatten_dict(state)
  found = {k: v for k, v in flat.items() if k[-1] == name}
  if len(found) != 1:
    paths = ["/".join(map(str, k)) for k in found] or "none"
    raise ValueError(f"expected exactly one sown {name!r} in the intermediates, found: {paths}")
  value = next(iter(found.values()))
  return value[-1] if isinstance(value, tuple) else value


def pool_features(x):
  """Mean over all axes between batch and channels: [B, H, W, C] or [B, N, D] -> [B, C]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def bottleneck_features(state, name="bottleneck"):
  """Pooled float32 bottleneck feature [B, D] from the model's sown intermediates."""
  return pool_features(sown_value(state, name).astype(jnp.float32))


def supcon_loss(features, labels, mask=None, temperature=0.1):
  """Per-anchor supervised contrastive loss (Khosla et al. 2020, L^sup_out).

  L_i = -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T)) on
  L2-normalised z, over the samples in `mask`.

  Args:
    features: [B, D] (normalised here).
    labels: int [B], or multi-hot [B, C] where positives share at least one label (pass primary
      labels [B] instead for "same primary label").
    mask: bool [B]; masked-out samples are neither anchors nor in any contrast set.
    temperature: softmax temperature.
  Returns:
    (loss [B], valid [B]): loss is 0 where invalid (masked, or no positive in the batch).
  """
  batch = features.shape[0]
  mask = jnp.ones((batch,), bool) if mask is None else mask.astype(bool)
  z = features.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  if labels.ndim == 1:
    same = labels[:, None] == labels[None, :]
  else:
    multi_hot = labels.astype(jnp.float32)
    same = multi_hot @ multi_hot.T > 0
  pair = mask[:, None] & mask[None, :] & ~jnp.eye(batch, dtype=bool)
  positive = same & pair
  # A large finite fill keeps fully masked rows finite (and their gradients zero).
  logits = jnp.where(pair, z @ z.T / temperature, -1e9)
  log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  num_pos = positive.sum(axis=1)
  valid = mask & (num_pos > 0)
  loss = -jnp.where(positive, log_prob, 0.0).sum(axis=1) / jnp.maximum(num_pos, 1)
  return jnp.where(valid, loss, 0.0), valid


def coral_time_weight(t_frac, scale=0.3, normalize=True):
  """CORAL's exp((1 - t/T) / scale): emphasises low noise. With `normalize`, divided by its mean
  over uniform t/T in [0, 1], scale (e^{1/scale} - 1) (~8.1 for 0.3), so the weights average 1."""
  weight = jnp.exp((1.0 - t_frac) / scale)
  return weight / (scale * jnp.expm1(1.0 / scale)) if normalize else weight


def coral_loss(projections, labels, keep_mask, t_frac, *, temperature=0.1, weight=0.5,
               time_scale=0.3, normalize_time_weight=True):
  """CORAL supervised-contrastive term, per sample [B].

  Each valid anchor (condition kept for CFG, at least one positive) is weighted by its own time
  weight; the values are scaled by B / #valid so that `mean(losses)` is
  weight * mean over valid anchors of w(t_i) L_i. CORAL's code instead multiplies the batch-mean
  SupCon by the batch-mean of the unnormalised time weight (and skips whole batches with dropped
  labels); with `normalize_time_weight=False` the scale matches theirs on average.

  Args:
    projections: `CoralHead` outputs [B, 128].
    labels: int [B] or multi-hot [B, C], see `supcon_loss`.
    keep_mask: bool [B], False where the condition was dropped (`~aux['drop_mask']`).
    t_frac: t/T or flow sigma [B] (`aux['t_frac']`).
  """
  per_anchor, valid = supcon_loss(projections, labels, keep_mask, temperature)
  time_weight = coral_time_weight(t_frac, time_scale, normalize_time_weight)
  scale = valid.shape[0] / jnp.maximum(valid.sum(), 1)
  return weight * scale * time_weight * per_anchor
