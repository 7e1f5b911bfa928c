"""Losses vs hand-written NumPy references: denoising/flow targets, CFG dropout, CBDM, CORAL."""
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from grasp_jax.diffusion import objectives as obj
from grasp_jax.diffusion import schedules as sched

B, H, W, C, K, NUM_CLASSES = 16, 2, 2, 3, 3, 4
RNG = np.random.RandomState(0)
X0 = RNG.randn(B, H, W, C).astype(np.float32)
NOISE = RNG.randn(B, H, W, C).astype(np.float32)
LABELS = RNG.randint(0, NUM_CLASSES, B)
CLASS_EMB = RNG.randn(NUM_CLASSES, C).astype(np.float32)
NULL_EMB = np.zeros((1, C), np.float32)
PARAMS = {"a": RNG.uniform(0.5, 1.5, K).astype(np.float32),
          "b": RNG.randn(K, C).astype(np.float32)}
T_IDX = RNG.randint(0, 1000, B)


def cluster_for_labels(labels):
  return labels % K


def cond_for_labels(labels):
  return {"emb": jnp.asarray(CLASS_EMB)[labels]}


def toy_model(params):
  """pred = a[k] cos(t/1000) x + b[k] + emb: linear in its parameters (gradients by hand)."""
  def model_fn(x, t, cond, cluster_ids):
    scale = params["a"][cluster_ids] * jnp.cos(t.astype(jnp.float32) / 1000)
    return (scale[:, None, None, None] * x + params["b"][cluster_ids][:, None, None, :]
            + cond["emb"][:, None, None, :])
  return model_fn


def toy_np(x, t, emb, clusters):
  scale = PARAMS["a"][clusters] * np.cos(t / 1000)
  bias = PARAMS["b"][clusters] + emb
  return scale[:, None, None, None] * x + bias[:, None, None, :]


def _ddpm(prediction_type):
  ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type=prediction_type)
  return ref, sched.from_diffusers_config(dict(ref.config))


def test_drop_condition_rate_and_mask():
  n = 20000
  cond = {"emb": jnp.asarray(RNG.randn(n, 5, C).astype(np.float32)),
          "pooled": jnp.asarray(RNG.randn(n, 7).astype(np.float32))}
  null = {"emb": jnp.full((1, 5, C), -7.0), "pooled": jnp.full((7,), 3.0)}
  dropped, mask = obj.drop_condition(jax.random.key(0), cond, null, 0.1)
  mask = np.asarray(mask)
  assert abs(mask.mean() - 0.1) < 0.01  # ~4.7 binomial std devs
  for name, fill in [("emb", -7.0), ("pooled", 3.0)]:
    out, orig = np.asarray(dropped[name]), np.asarray(cond[name])
    assert (out[mask] == fill).all()
    np.testing.assert_array_equal(out[~mask], orig[~mask])


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", None), ("v_prediction", 5.0),
                                                   ("epsilon", 5.0)])
def test_diffusion_loss_matches_numpy(prediction_type, gamma):
  ref, schedule = _ddpm(prediction_type)
  t, x0, noise = torch.tensor(T_IDX), torch.tensor(X0), torch.tensor(NOISE)
  x_t = ref.add_noise(x0, noise, t).numpy()
  target = noise.numpy() if prediction_type == "epsilon" else ref.get_velocity(x0, noise,
                                                                                t).numpy()
  clusters = cluster_for_labels(LABELS)
  losses, aux = obj.diffusion_loss(
      toy_model(PARAMS), schedule, X0, cond_for_labels(LABELS), jnp.asarray(clusters),
      jax.random.key(1), null_cond={"emb": NULL_EMB}, cond_drop_prob=0.3, min_snr_gamma=gamma,
      t=jnp.asarray(T_IDX), noise=jnp.asarray(NOISE))
  drop = np.asarray(aux["drop_mask"])
  assert 0 < drop.sum() < B
  emb = np.where(drop[:, None], NULL_EMB, CLASS_EMB[LABELS])
  mse = ((toy_np(x_t, T_IDX, emb, clusters) - target)**2).mean(axis=(1, 2, 3))
  if gamma is not None:
    snr = compute_snr(ref, t).numpy()
    mse *= np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
  np.testing.assert_allclose(losses, mse, rtol=1e-4)
  np.testing.assert_allclose(aux["t_frac"], T_IDX / 1000, rtol=1e-6)


def test_flow_matching_loss_matches_numpy():
  sigma = RNG.uniform(0.01, 0.99, B).astype(np.float32)
  schedule = sched.FlowSchedule(shift=3.0)
  clusters = cluster_for_labels(LABELS)
  losses, aux = obj.flow_matching_loss(
      toy_model(PARAMS), schedule, X0, cond_for_labels(LABELS), jnp.asarray(clusters),
      jax.random.key(2), loss_weighting="cosmap", sigma=jnp.asarray(sigma),
      noise=jnp.asarray(NOISE))
  s = sigma[:, None, None, None]
  x_s = (1 - s) * X0 + s * NOISE
  pred = toy_np(x_s, sigma * 1000, CLASS_EMB[LABELS], clusters)
  weight = 2 / (np.pi * (1 - 2 * sigma + 2 * sigma**2))
  expected = weight * ((pred - (NOISE - X0))**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(losses, expected, rtol=1e-4)
  assert not np.asarray(aux["drop_mask"]).any()
  # Default sampling path: shapes and ranges only.
  losses, aux = obj.flow_matching_loss(toy_model(PARAMS), schedule, X0, cond_for_labels(LABELS),
                                       jnp.asarray(clusters), jax.random.key(3))
  assert losses.shape == (B,) and ((aux["t_frac"] > 0) & (aux["t_frac"] < 1)).all()
  np.testing.assert_allclose(aux["t"], aux["t_frac"] * 1000, rtol=1e-6)


def _check_cbdm(loss_fn, x_t, t_model, t_frac, target, tau):
  """Jits `loss_fn(params) -> (losses, aux)`; compares values and grads with a NumPy loop."""
  def mean_loss(params):
    losses, aux = loss_fn(params)
    return jnp.mean(losses), aux

  (value, aux), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(
      jax.tree.map(jnp.asarray, PARAMS))
  drop = np.asarray(aux["drop_mask"])
  balanced = np.asarray(aux["cbdm_labels"])
  assert 0 < drop.sum() < B
  k, k_bal = cluster_for_labels(LABELS), cluster_for_labels(balanced)
  emb = np.where(drop[:, None], NULL_EMB, CLASS_EMB[LABELS])
  pred = toy_np(x_t, t_model, emb, k)
  pred_bal = toy_np(x_t, t_model, CLASS_EMB[balanced], k_bal)
  n = H * W * C
  expected, grad_a, grad_b = [], np.zeros(K), np.zeros((K, C))
  for i in range(B):
    w = 0.0 if drop[i] else tau * t_frac[i]
    diff = pred[i] - pred_bal[i]
    expected.append(((pred[i] - target[i])**2).mean() + w * (diff**2).mean()
                    + 0.25 * w * (diff**2).mean())
    # d mean_i(loss_i) / d pred_i and / d pred_bal_i: stop-gradients route the regulariser's
    # pull on pred_i with weight w and on pred_bal_i with weight w/4.
    g = 2 / (B * n) * ((pred[i] - target[i]) + w * diff)
    g_bal = 2 / (B * n) * (0.25 * w * -diff)
    dscale = np.cos(t_model[i] / 1000) * x_t[i]
    grad_a[k[i]] += (g * dscale).sum()
    grad_a[k_bal[i]] += (g_bal * dscale).sum()
    grad_b[k[i]] += g.sum(axis=(0, 1))
    grad_b[k_bal[i]] += g_bal.sum(axis=(0, 1))
  np.testing.assert_allclose(aux["loss_denoise"] + aux["loss_cbdm"], expected, rtol=1e-4)
  np.testing.assert_allclose(value, np.mean(expected), rtol=1e-4)
  np.testing.assert_allclose(grads["a"], grad_a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["b"], grad_b, rtol=1e-4, atol=1e-6)


def test_cbdm_values_and_stop_gradient_structure():
  ref, schedule = _ddpm("epsilon")
  x_t = ref.add_noise(torch.tensor(X0), torch.tensor(NOISE), torch.tensor(T_IDX)).numpy()
  tau = 0.7
  cbdm = obj.CBDM(class_probs=np.ones(NUM_CLASSES), cond_for_labels=cond_for_labels,
                  cluster_for_labels=cluster_for_labels, tau=tau)

  def loss_fn(params):
    return obj.diffusion_loss(
        toy_model(params), schedule, X0, cond_for_labels(LABELS),
        jnp.asarray(cluster_for_labels(LABELS)), jax.random.key(4), null_cond={"emb": NULL_EMB},
        cond_drop_prob=0.3, cbdm=cbdm, t=jnp.asarray(T_IDX), noise=jnp.asarray(NOISE))

  _check_cbdm(loss_fn, x_t, T_IDX.astype(np.float64), T_IDX / 1000, NOISE, tau)


def test_cbdm_flow_matching_weights_by_sigma():
  sigma = RNG.uniform(0.01, 0.99, B).astype(np.float32)
  s = sigma[:, None, None, None]
  x_t = (1 - s) * X0 + s * NOISE
  cbdm = obj.CBDM(class_probs=np.ones(NUM_CLASSES), cond_for_labels=cond_for_labels,
                  cluster_for_labels=cluster_for_labels)

  def loss_fn(params):
    return obj.flow_matching_loss(
        toy_model(params), sched.FlowSchedule(shift=3.0), X0, cond_for_labels(LABELS),
        jnp.asarray(cluster_for_labels(LABELS)), jax.random.key(5), null_cond={"emb": NULL_EMB},
        cond_drop_prob=0.3, cbdm=cbdm, sigma=jnp.asarray(sigma), noise=jnp.asarray(NOISE))

  _check_cbdm(loss_fn, x_t, sigma.astype(np.float64) * 1000, sigma, NOISE - X0, 1.0)


def test_cbdm_label_distribution():
  probs = np.array([0.6, 0.3, 0.1, 0.0])
  n = 20000
  x0 = jnp.zeros((n, 1, 1, 1))
  cbdm = obj.CBDM(class_probs=probs * 5, cond_for_labels=lambda y: {"y": y})
  _, aux = obj.diffusion_loss(lambda x, t, c, k: x, sched.ddpm_schedule(), x0,
                              {"y": x0[:, 0, 0, 0]}, None, jax.random.key(6), cbdm=cbdm)
  freq = np.bincount(np.asarray(aux["cbdm_labels"]), minlength=4) / n
  np.testing.assert_allclose(freq, probs, atol=0.015)


def test_cbdm_requires_cluster_map_with_clusters():
  cbdm = obj.CBDM(class_probs=np.ones(NUM_CLASSES), cond_for_labels=cond_for_labels)
  with pytest.raises(ValueError, match="cluster_for_labels"):
    obj.diffusion_loss(toy_model(PARAMS), sched.ddpm_schedule(), X0, cond_for_labels(LABELS),
                       jnp.asarray(cluster_for_labels(LABELS)), jax.random.key(0), cbdm=cbdm)


def supcon_loop(features, labels, mask, temperature):
  """Khosla et al. 2020 eq. 2 (L_out), one anchor at a time."""
  z = features / np.linalg.norm(features, axis=1, keepdims=True)
  losses = np.zeros(len(z))
  for i in range(len(z)):
    if not mask[i]:
      continue
    others = [a for a in range(len(z)) if a != i and mask[a]]
    if labels.ndim == 1:
      positives = [p for p in others if labels[p] == labels[i]]
    else:
      positives = [p for p in others if (labels[p] * labels[i]).sum() > 0]
    if not positives:
      continue
    denom = sum(np.exp(z[i] @ z[a] / temperature) for a in others)
    losses[i] = -np.mean([np.log(np.exp(z[i] @ z[p] / temperature) / denom) for p in positives])
  return losses


@pytest.mark.parametrize("multi_label", [False, True])
def test_supcon_matches_loop(multi_label):
  rng = np.random.RandomState(7)
  n = 12
  features = rng.randn(n, 8).astype(np.float32)
  if multi_label:
    labels = (rng.rand(n, 5) < 0.3).astype(np.int32)
  else:
    labels = rng.randint(0, 4, n)
    labels[-1] = 99  # an anchor with no positive
  mask = rng.rand(n) > 0.25
  loss, valid = obj.supcon_loss(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(mask), 0.1)
  expected = supcon_loop(features.astype(np.float64), labels, mask, 0.1)
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
  assert (np.asarray(valid) == (expected > 0)).all()
  grad = jax.grad(lambda f: obj.supcon_loss(f, jnp.asarray(labels), jnp.asarray(mask))[0].sum())(
      jnp.asarray(features))
  assert np.isfinite(grad).all() and (np.asarray(grad)[~mask] == 0).all()


def test_coral_time_weight_and_loss():
  scale = 0.3
  u = np.linspace(0, 1, 100001)
  raw = np.exp((1 - u) / scale)
  np.testing.assert_allclose(obj.coral_time_weight(u, scale, normalize=False), raw, rtol=1e-5)
  np.testing.assert_allclose(np.trapezoid(obj.coral_time_weight(u, scale), u), 1.0, rtol=1e-5)

  rng = np.random.RandomState(8)
  features = rng.randn(10, 6).astype(np.float32)
  labels = rng.randint(0, 3, 10)
  keep = rng.rand(10) > 0.3
  t_frac = rng.rand(10).astype(np.float32)
  per = obj.coral_loss(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(keep),
                       jnp.asarray(t_frac), temperature=0.1, weight=0.5, time_scale=scale)
  anchors = supcon_loop(features.astype(np.float64), labels, keep, 0.1)
  valid = anchors > 0
  weights = np.exp((1 - t_frac) / scale) / (scale * np.expm1(1 / scale))
  expected_mean = 0.5 * (weights * anchors)[valid].sum() / valid.sum()
  np.testing.assert_allclose(np.mean(per), expected_mean, rtol=1e-4)
  assert (np.asarray(per)[~valid] == 0).all()


class SowingModel(nn.Module):
  """A tiny model sowing a [B, H, W, 5] bottleneck, like the backbones do."""

  @nn.compact
  def __call__(self, x, t, cond, cluster_ids):
    h = nn.Dense(5)(x)
    self.sow("intermediates", "bottleneck", h)
    return nn.Dense(x.shape[-1])(h) + cond["emb"][:, None, None, :]


def test_bottleneck_from_sown_intermediates_through_the_loss():
  model = SowingModel()
  params = model.init(jax.random.key(0), X0, jnp.zeros(B), cond_for_labels(LABELS), None)["params"]

  def model_fn(x, t, cond, cluster_ids):
    return model.apply({"params": params}, x, t, cond, cluster_ids, mutable=["intermediates"])

  _, aux = obj.diffusion_loss(model_fn, sched.ddpm_schedule(), X0, cond_for_labels(LABELS), None,
                              jax.random.key(1), t=jnp.asarray(T_IDX), noise=jnp.asarray(NOISE))
  feats = obj.bottleneck_features(aux["model"])
  x_t = np.asarray(sched.add_noise(sched.ddpm_schedule(), X0, NOISE, jnp.asarray(T_IDX)))
  dense = params["Dense_0"]
  expected = (x_t @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])).mean(axis=(1, 2))
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)

  head = obj.CoralHead()
  variables = head.init(jax.random.key(2), feats)
  assert head.apply(variables, feats).shape == (B, 128)
  specs = nn.get_partition_spec(variables)["params"]["proj"]
  assert tuple(specs["kernel"]) == ("embed", None) and tuple(specs["bias"]) == (None,)
  with pytest.raises(ValueError, match="'missing'"):
    obj.sown_value(aux["model"], "missing")
