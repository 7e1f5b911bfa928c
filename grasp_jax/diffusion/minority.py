"""Self-guided minority guidance (Um & Ye, ECCV 2024, arXiv 2407.11555).

The minority score of an intermediate sample x_t compares its posterior mean (Tweedie)
x0_hat(x_t) with a reconstruction of it: x0_hat is re-noised to a fixed level s and denoised again,

  L(x_t) = || x0_hat(x_t) - sg[x0_hat(x_s)] ||^2,   x_s = a_s x0_hat(x_t) + s_s noise.

Samples whose features the model cannot reconstruct (low-likelihood, minority features) score
high. Its gradient, with the reconstruction held fixed (stop-gradient, as the official code
does), is added to the model's score with weight w: score + w g, which pushes the trajectory
toward minority features. The official code (github.com/soobin-um/sg-minority, image_sample.py)
fixes the choices used here:
- s = 0.8 T (`p_ratio`), a fixed level independent of t; one re-noising draw per step
  (`num_mc_samples=1`) from a per-step key;
- g is normalised per sample by its max |.| (`use_normed_grad=True`);
- "variance" scaling (`mg_scale_type='var'`): the ancestral step adds Sigma_t w g to its mean,
  which is adding w g to the score. Here the shift is applied to the score for every sampler
  (Dhariwal & Nichol's eps - s w g for DDPM, its analogue for the flow velocity), so DDIM,
  DPM-Solver++ and Euler all see the same guided field. On the probability-flow ODE the score
  drives x with half the SDE's weight, so w about twice the paper's (0.2-0.4 with 250 ancestral
  steps) gives a comparable push;
- time schedule: guidance only while t > t_mid T (`t_mid`, default -1: every step) and only on
  every `inter_rate`-th step counted back from the last one (default 5 of 250 steps, 2 for
  ImageNet-64). `min_time` and `every` below are these two knobs; `every` defaults to 1 because
  our 20-50 step samplers already take steps of >= 0.02 T, the spacing of the paper's guided steps.
The paper measures the discrepancy with LPIPS; no LPIPS weights exist here, so L is the squared
error in the model's space (pixels or latents). With the per-sample normalisation this equals
the official code's non-LPIPS option (the L2 norm): d||e|| = d||e||^2 / (2 ||e||).

Model timesteps follow samplers.py: int DDPM steps, or float sigma * T for rectified flow.
"""
import jax
import jax.numpy as jnp

from grasp_jax.diffusion import schedules as sched

PERTURB_TIME = 0.8  # s / T, the official code's p_ratio.


def _is_flow(schedule):
  return isinstance(schedule, sched.FlowSchedule)


def _per_sample(values, ndim):
  return jnp.reshape(values, values.shape + (1,) * (ndim - values.ndim))


def signal_noise(schedule, t):
  """(a, s) with x_t = a x0 + s noise at model timesteps t (any shape)."""
  if _is_flow(schedule):
    sigma = t / schedule.num_train_timesteps
    return 1 - sigma, sigma
  abar = schedule.alphas_cumprod[t]
  return jnp.sqrt(abar), jnp.sqrt(1 - abar)


def tweedie_x0(schedule, prediction, x, t):
  """Posterior mean E[x0 | x_t] implied by a model prediction at x_t, t [B]."""
  if _is_flow(schedule):
    return sched.flow_predict_x0(prediction, x, t / schedule.num_train_timesteps)
  return sched.predict_x0_eps(schedule, prediction, x, t)[0]


def perturb_timesteps(schedule, perturb_time, batch):
  """Model timesteps [B] of the re-noising level s = perturb_time * T (int(.) for DDPM, as the
  official code)."""
  if not 0 < perturb_time < 1:
    raise ValueError(f"perturb_time={perturb_time} must be in (0, 1)")
  T = schedule.num_train_timesteps
  if _is_flow(schedule):
    return jnp.full((batch,), perturb_time * T, jnp.float32)
  return jnp.full((batch,), int(perturb_time * T), jnp.int32)


def minority_score(denoise, schedule, x, t, noise, perturb_time=PERTURB_TIME):
  """Minority score L [B] of x_t and the model prediction at x_t (reused by the sampler step).

  `denoise(x, t) -> prediction`; `noise` (like x) re-noises x0_hat to s. The reconstruction is
  under stop_gradient, so `jax.grad` of L is the guidance gradient of the paper.
  """
  prediction = denoise(x, t)
  x0 = tweedie_x0(schedule, prediction, x, t)
  t_s = perturb_timesteps(schedule, perturb_time, x.shape[0])
  x0_fixed = jax.lax.stop_gradient(x0)
  if _is_flow(schedule):
    x_s = sched.flow_add_noise(x0_fixed, noise, t_s / schedule.num_train_timesteps)
  else:
    x_s = sched.add_noise(schedule, x0_fixed, noise, t_s)
  recon = tweedie_x0(schedule, denoise(x_s, t_s), x_s, t_s)
  return jnp.sum((x0 - recon)**2, axis=tuple(range(1, x.ndim))), prediction


def minority_gradient(denoise, schedule, x, t, noise, perturb_time=PERTURB_TIME, normalize=True):
  """(grad_x L, prediction at x_t); the gradient is divided by its per-sample max |.| if
  `normalize`. Samples are independent, so the gradient of sum(L) is per sample."""

  def total(x):
    score, prediction = minority_score(denoise, schedule, x, t, noise, perturb_time)
    return jnp.sum(score), prediction

  grad, prediction = jax.grad(total, has_aux=True)(x)
  if normalize:
    peak = jnp.max(jnp.abs(grad), axis=tuple(range(1, x.ndim)), keepdims=True)
    grad = grad / jnp.maximum(peak, jnp.finfo(grad.dtype).tiny)
  return grad, prediction


def score_shift(schedule, prediction, t, delta):
  """The prediction whose implied score at (x_t, t) is the model's score + delta.

  With x_t fixed, score = -eps / s, so eps moves by -s delta and x0 by s^2 / a delta; in the
  prediction's own terms: eps -s delta, DDPM v and flow velocity -(s / a) delta, x0 +(s^2 / a)
  delta. Undefined at a = 0 (pure noise), where x0_hat does not depend on x_t.
  """
  a, s = (_per_sample(v, prediction.ndim) for v in signal_noise(schedule, t))
  if _is_flow(schedule) or schedule.prediction_type == "v_prediction":
    return prediction - (s / a) * delta
  if schedule.prediction_type == "epsilon":
    return prediction - s * delta
  return prediction + (s**2 / a) * delta


def minority_denoiser(denoise, schedule, num_steps, rng, weight, *, perturb_time=PERTURB_TIME,
                      every=1, min_time=0.0, normalize=True):
  """Wraps `denoise(x, t) -> prediction` into `f(x, t, step) -> guided prediction`.

  step is the index 0..num_steps-1 along the sampling trajectory. Step `step` is guided iff
  (num_steps - 1 - step) % every == 0 (the paper's intermittent guidance, counted from the last
  step), t >= min_time * T (the paper's t_mid), and the signal level a_t > 0 (the first flow
  step at sigma = 1 and a zero-terminal-SNR step cannot be guided). Guided steps cost one extra
  forward and one backward pass of `denoise`; the others run it once (`lax.cond`). The
  re-noising draw of a step uses `fold_in(rng, step)`.
  """
  if every < 1:
    raise ValueError(f"every={every} must be >= 1")
  perturb_timesteps(schedule, perturb_time, 1)  # Validates perturb_time early.
  threshold = min_time * schedule.num_train_timesteps

  def plain(x, t, key):
    del key
    return denoise(x, t)

  def guided(x, t, key):
    noise = jax.random.normal(key, x.shape, x.dtype)
    grad, prediction = minority_gradient(denoise, schedule, x, t, noise, perturb_time, normalize)
    return score_shift(schedule, prediction, t, weight * grad)

  def f(x, t, step):
    on = ((num_steps - 1 - step) % every == 0) & (t[0] >= threshold)
    on = on & (signal_noise(schedule, t[0])[0] > 0)
    return jax.lax.cond(on, guided, plain, x, t, jax.random.fold_in(rng, step))

  return f
