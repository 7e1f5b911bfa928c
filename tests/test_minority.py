"""Self-guided minority guidance on a 2-D Gaussian mixture with its exact posterior mean."""
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
import numpy as np
import pytest

from grasp_jax.diffusion import minority
from grasp_jax.diffusion import samplers
from grasp_jax.diffusion import schedules as sched

# Majority mode (weight 0.9) at x = -2, minority mode (0.1) at x = +2, isotropic std 0.5.
WEIGHTS = np.array([0.9, 0.1])
MEANS = np.array([[-2.0, 0.0], [2.0, 0.0]])
STD = 0.5
COSINE_EPS = sched.ddpm_schedule("squaredcos_cap_v2")
SD_V = sched.ddpm_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="v_prediction")
FLOW = sched.FlowSchedule(shift=3.0)


def _coeffs(schedule, t):
  """(a, s) of x_t = a x0 + s noise, straight from the schedule definitions."""
  if isinstance(schedule, sched.FlowSchedule):
    sigma = t / schedule.num_train_timesteps
    return 1 - sigma, sigma
  abar = schedule.alphas_cumprod[t]
  return jnp.sqrt(abar), jnp.sqrt(1 - abar)


def posterior_mean(x, a, s, xp=jnp):
  """E[x0 | x_t = x] of the mixture under x_t = a x0 + s noise; x [B, 2], a, s [B, 1]."""
  var = a**2 * STD**2 + s**2
  diff = x[:, None, :] - a[:, None] * MEANS[None]
  logits = np.log(WEIGHTS)[None] - xp.sum(diff**2, -1) / (2 * var)
  resp = xp.exp(logits - logits.max(-1, keepdims=True))
  resp = resp / resp.sum(-1, keepdims=True)
  component = MEANS[None] + (a * STD**2 / var)[:, None] * diff
  return xp.sum(resp[..., None] * component, 1)


def exact_model(schedule):
  """model_fn returning the schedule's target for the exact posterior mean."""

  def model_fn(x, t, cond, cluster_ids):
    del cond, cluster_ids
    a, s = (v[:, None] for v in _coeffs(schedule, t))
    x0 = posterior_mean(x, a, s)
    eps = (x - a * x0) / s
    if isinstance(schedule, sched.FlowSchedule):
      return eps - x0
    if schedule.prediction_type == "v_prediction":
      return a * eps - s * x0
    return eps

  return model_fn


def mixture_log_density(x):
  sq = np.sum((x[:, None, :] - MEANS[None])**2, -1)
  return logsumexp(np.log(WEIGHTS) - sq / (2 * STD**2) - np.log(2 * np.pi * STD**2), axis=-1)


def _toy_model(x, t, cond, cluster_ids):
  t = t.astype(jnp.float32)[:, None, None, None]
  return (0.9 * jnp.cos(t / 1000) * x + 0.1 * jnp.sin(t / 100) + 0.3 * cond[:, None, None, :]
          + 0.05 * cluster_ids[:, None, None, None])


@pytest.mark.parametrize("schedule,sampler,kwargs", [
    (SD_V, "ddim", dict(eta=0.7)),
    (COSINE_EPS, "dpmsolver++", {}),
    (FLOW, "euler", {}),
])
def test_zero_weight_is_the_plain_sampler_and_is_not_traced(schedule, sampler, kwargs,
                                                            monkeypatch):
  rng = np.random.RandomState(0)
  cond = jnp.asarray(rng.randn(3, 2), jnp.float32)
  args = (_toy_model, schedule, (3, 4, 4, 2), cond, jnp.array([0, 2, 1]), jax.random.key(5))
  common = dict(null_cond=jnp.zeros((1, 2)), guidance_scale=3.0, num_steps=6, sampler=sampler,
                **kwargs)
  plain = samplers.sample(*args, **common)

  def refuse(*a, **k):
    raise AssertionError("minority guidance traced at weight 0")

  monkeypatch.setattr(minority, "minority_denoiser", refuse)
  zero = samplers.sample(*args, minority_guidance=0.0, minority_every=2, minority_min_time=0.3,
                         minority_perturb_time=0.5, **common)
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))
  with pytest.raises(AssertionError, match="traced at weight 0"):
    samplers.sample(*args, minority_guidance=0.1, **common)


@pytest.mark.parametrize("schedule,sampler", [
    (COSINE_EPS, "ddim"), (SD_V, "dpmsolver++"), (FLOW, "euler")])
def test_guidance_moves_samples_to_the_minority_mode(schedule, sampler):
  model_fn = exact_model(schedule)
  run = jax.jit(lambda weight: samplers.sample(
      model_fn, schedule, (1000, 2), None, None, jax.random.key(0), num_steps=20,
      sampler=sampler, minority_guidance=weight), static_argnums=0)
  plain, guided = np.asarray(run(0.0)), np.asarray(run(0.5))
  assert np.isfinite(guided).all()
  plain_frac, guided_frac = (plain[:, 0] > 0).mean(), (guided[:, 0] > 0).mean()
  # The exact denoiser reproduces the mixture weights; guidance over-samples the minority mode.
  assert 0.05 < plain_frac < 0.15
  assert guided_frac > plain_frac + 0.1, (plain_frac, guided_frac)
  assert mixture_log_density(guided).mean() < mixture_log_density(plain).mean() - 0.5


@pytest.mark.parametrize("schedule,t", [(COSINE_EPS, 500), (SD_V, 300), (FLOW, 600.0)])
def test_score_and_gradient_match_numpy_finite_differences(schedule, t):
  rng = np.random.RandomState(1)
  x = rng.randn(2, 2)
  noise = rng.randn(2, 2)
  tb = jnp.full((2,), t, jnp.int32 if isinstance(t, int) else jnp.float32)
  ts = minority.perturb_timesteps(schedule, 0.8, 2)
  a, s = (np.float64(v[0]) for v in _coeffs(schedule, tb))
  a_s, s_s = (np.float64(v[0]) for v in _coeffs(schedule, ts))
  x0_np = lambda x, a, s: posterior_mean(x, np.full((2, 1), a), np.full((2, 1), s), xp=np)
  recon = x0_np(a_s * x0_np(x, a, s) + s_s * noise, a_s, s_s)
  loss = lambda x: np.sum((x0_np(x, a, s) - recon)**2, -1)  # reconstruction held fixed
  h, fd = 1e-5, np.zeros_like(x)
  for i in range(2):
    step = np.zeros_like(x)
    step[:, i] = h
    fd[:, i] = (loss(x + step) - loss(x - step)) / (2 * h)

  denoise = lambda x, t: exact_model(schedule)(x, t, None, None)
  xj, nj = jnp.asarray(x, jnp.float32), jnp.asarray(noise, jnp.float32)

  @jax.jit
  def run(x, t, noise):
    score, _ = minority.minority_score(denoise, schedule, x, t, noise)
    grad, _ = minority.minority_gradient(denoise, schedule, x, t, noise, normalize=False)
    return (score, grad) + minority.minority_gradient(denoise, schedule, x, t, noise)

  score, grad, normed, pred = run(xj, tb, nj)
  np.testing.assert_allclose(score, loss(x), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(normed, fd / np.abs(fd).max(-1, keepdims=True), rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(pred, denoise(xj, tb), rtol=1e-6)


@pytest.mark.parametrize("schedule", [COSINE_EPS, SD_V, sched.ddpm_schedule(
    prediction_type="sample"), FLOW])
def test_score_shift_adds_delta_to_the_implied_score(schedule):
  rng = np.random.RandomState(2)
  x, pred, delta = (jnp.asarray(rng.randn(3, 2, 2), jnp.float32) for _ in range(3))
  is_flow = isinstance(schedule, sched.FlowSchedule)
  t = jnp.array([700.0, 300.0, 20.0]) if is_flow else jnp.array([700, 300, 20])
  shifted = minority.score_shift(schedule, pred, t, delta)
  a, s = (v[:, None, None] for v in _coeffs(schedule, t))
  if is_flow:  # x = (1 - sigma) x0 + sigma eps and v = eps - x0  =>  eps = x + (1 - sigma) v.
    eps, eps_shifted = x + a * pred, x + a * shifted
  else:
    eps, eps_shifted = (sched.predict_x0_eps(schedule, p, x, t)[1] for p in (pred, shifted))
  # score = -eps / s, so score + delta is eps - s delta.
  np.testing.assert_allclose(eps_shifted, eps - s * delta, rtol=1e-4, atol=1e-4)


def test_time_schedule_guides_every_nth_step_above_min_time_and_never_at_pure_noise():
  denoise = lambda x, t: 0.5 * x + jnp.sin(x) * (t[:, None] / 1000.0)
  ddpm = jax.jit(minority.minority_denoiser(denoise, COSINE_EPS, 10, jax.random.key(0), 1.0,
                                            every=3, min_time=0.3))
  x = jnp.asarray(np.random.RandomState(3).randn(2, 2), jnp.float32)
  guided = []
  for step in range(10):
    t = jnp.full((2,), 900 - 100 * step, jnp.int32)
    out = ddpm(x, t, step)
    np.testing.assert_array_equal(out, ddpm(x, t, step))  # same step, same re-noising draw
    guided.append(not np.array_equal(out, denoise(x, t)))
  # (9 - step) % 3 == 0 -> steps 0, 3, 6, 9; step 9 has t = 0 < 0.3 T.
  assert [i for i, g in enumerate(guided) if g] == [0, 3, 6]

  flow = jax.jit(minority.minority_denoiser(denoise, FLOW, 2, jax.random.key(0), 1.0))
  for step, t in enumerate([1000.0, 500.0]):
    tb = jnp.full((2,), t)
    assert np.array_equal(flow(x, tb, step), denoise(x, tb)) == (t == 1000.0)
