"""Samplers: DDIM, DPM-Solver++(2M), rectified-flow Euler; classifier-free and minority guidance.

Each sampler follows its diffusers scheduler step for step (DDIMScheduler,
DPMSolverMultistepScheduler with algorithm_type='dpmsolver++', solver_order=2, midpoint,
lower_order_final; FlowMatchEulerDiscreteScheduler), so a checkpoint samples as it did in diffusers.
Timesteps are computed in numpy from static arguments and the loop is one `jax.lax.scan`, so a
single compilation serves all steps. Everything is batch-parallel; sharding is the caller's job.

`model_fn(x_t, t, cond, cluster_ids) -> prediction` (or `(prediction, aux)`; aux is ignored) with
x_t [B, ...], t [B] (int32 DDPM timesteps, or float32 sigma * T for flow), cond a pytree whose
leaves have a leading batch axis, cluster_ids int32 [B] or None. The loops call
`denoise(x_t, t, step)` with the step index, which only minority guidance (minority.py) uses.
"""
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.diffusion import minority
from grasp_jax.diffusion import schedules as sched

SAMPLERS = ("ddim", "dpmsolver++", "euler")
DEFAULT_STEPS = {"ddim": 50, "dpmsolver++": 20, "euler": 28}


# ---------------------------------------------------------------------------------------------
# Timestep grids (numpy, static).


def ddim_timesteps(num_train_timesteps, num_steps, spacing="leading", steps_offset=0):
  """DDIMScheduler.set_timesteps: int64 [num_steps], descending."""
  sched.check_choice("timestep_spacing", spacing, sched.TIMESTEP_SPACINGS)
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}]")
  if spacing == "linspace":
    return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
  if spacing == "leading":
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  ratio = num_train_timesteps / num_steps
  return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def dpm_solver_timesteps(num_train_timesteps, num_steps, spacing="linspace", steps_offset=0):
  """DPMSolverMultistepScheduler.set_timesteps (no lambda clipping): int64 [num_steps]."""
  sched.check_choice("timestep_spacing", spacing, sched.TIMESTEP_SPACINGS)
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}]")
  if spacing == "linspace":
    grid = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()
    return grid[::-1][:-1].astype(np.int64)
  if spacing == "leading":
    ratio = num_train_timesteps // (num_steps + 1)
    grid = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1]
    return grid.astype(np.int64) + steps_offset
  ratio = num_train_timesteps / num_steps
  return np.arange(num_train_timesteps, 0, -ratio).round().astype(np.int64) - 1


def flow_euler_sigmas(schedule: sched.FlowSchedule, num_steps):
  """FlowMatchEulerDiscreteScheduler.set_timesteps sigmas: float64 [num_steps + 1], last 0.

  As in diffusers, the grid runs linearly from the shifted sigma_max (1) to the *shifted* sigma_min
  (shift(1/T)) and is shifted again.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  T = schedule.num_train_timesteps
  sigma_min = float(sched.shift_sigmas(np.float32(1.0 / T), np.float32(schedule.shift)))
  sigmas = sched.shift_sigmas(np.linspace(1.0, sigma_min, num_steps), schedule.shift)
  return np.concatenate([sigmas, [0.0]])


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance.


def cfg_combine(cond_pred, uncond_pred, guidance_scale):
  """uncond + scale (cond - uncond) (Ho & Salimans 2022; diffusers' convention, 1 = no guidance)."""
  return uncond_pred + guidance_scale * (cond_pred - uncond_pred)


def _prediction(out):
  return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)


def guided_denoiser(model_fn, cond, cluster_ids, null_cond=None, guidance_scale=1.0,
                    null_cluster_ids=None):
  """Returns `f(x, t) -> guided prediction` (float32).

  With `null_cond` the conditional and unconditional passes run as one model call on the
  concatenated batch [cond; uncond] which is then split. `null_cond` leaves broadcast to the cond
  leaves (e.g. [1, L, D] null text embeddings). The unconditional pass uses `null_cluster_ids`,
  by default the prompt's own cluster ids (the cluster is a function of the prompt in GRASP).
  """
  if null_cond is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0):
    return lambda x, t: _prediction(model_fn(x, t, cond, cluster_ids))
  both_cond = jax.tree.map(
      lambda c, n: jnp.concatenate([c, jnp.broadcast_to(n, c.shape).astype(c.dtype)]),
      cond, null_cond)
  if cluster_ids is None:
    both_ids = None
  else:
    null_ids = cluster_ids if null_cluster_ids is None else null_cluster_ids
    both_ids = jnp.concatenate([cluster_ids, null_ids])

  def denoise(x, t):
    out = _prediction(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_cond,
                               both_ids))
    cond_pred, uncond_pred = jnp.split(out, 2)
    return cfg_combine(cond_pred, uncond_pred, guidance_scale)

  return denoise


# ---------------------------------------------------------------------------------------------
# Single steps (scalar timesteps / sigmas shared by the batch).


def ddim_step(schedule: sched.DDPMSchedule, prediction, x, t, t_prev, eta=0.0, noise=None):
  """DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12/16); t_prev < 0 is the final step.

  Returns (x_prev, predicted x0). `noise` (standard normal, like x) is needed iff eta > 0.
  """
  abar_t = schedule.alphas_cumprod[t]
  final = 1.0 if schedule.set_alpha_to_one else schedule.alphas_cumprod[0]
  abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], final)
  x0, eps = sched.predict_x0_eps(schedule, prediction, x, t)
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
  std = eta * jnp.sqrt(variance)
  x_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - std**2) * eps
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev, x0


def _vp_coeffs(sigma):
  """VE sigma sqrt((1 - abar) / abar) -> (alpha, sigma_vp)."""
  alpha = jax.lax.rsqrt(sigma**2 + 1)
  return alpha, sigma * alpha


def dpm_solver_step(x0_pred, prev_x0_pred, x, sigma, sigma_next, sigma_prev, second_order):
  """DPM-Solver++ (Lu et al. 2022) data-prediction update between VE sigmas sigma -> sigma_next.

  First order is DDIM; the 2M (midpoint) update also uses the previous step's x0 prediction at
  sigma_prev. exp(-h) = sigma_next / sigma is used directly, so sigma_next = 0 needs no logs.
  """
  alpha_t, s_t = _vp_coeffs(sigma_next)
  alpha_s, s_s = _vp_coeffs(sigma)
  decay = sigma_next / sigma - 1  # exp(-h) - 1
  first = (s_t / s_s) * x - alpha_t * decay * x0_pred
  # Both log-steps are only meaningful for the second-order branch (sigma_next may be 0 otherwise).
  h = jnp.where(second_order, jnp.log(sigma) - jnp.log(sigma_next), 1.0)
  h_prev = jnp.where(second_order, jnp.log(sigma_prev) - jnp.log(sigma), 1.0)
  d1 = (h / h_prev) * (x0_pred - prev_x0_pred)
  second = first - 0.5 * alpha_t * decay * d1
  return jnp.where(second_order, second, first)


def euler_step(velocity, x, sigma, sigma_next):
  """Rectified-flow Euler step from sigma to sigma_next."""
  return x + (sigma_next - sigma) * velocity


# ---------------------------------------------------------------------------------------------
# Loops.


def _batch_t(t, batch, dtype):
  return jnp.full((batch,), t, dtype)


def _ddim_loop(denoise, schedule, x, rng, num_steps, spacing, eta):
  T = schedule.num_train_timesteps
  ts = ddim_timesteps(T, num_steps, spacing or "leading", schedule.steps_offset)
  prev = ts - T // num_steps
  keys = jax.random.split(rng, num_steps)

  def body(x, step):
    i, t, t_prev, key = step
    pred = denoise(x, _batch_t(t, x.shape[0], jnp.int32), i)
    noise = jax.random.normal(key, x.shape, x.dtype) if eta > 0 else None
    return ddim_step(schedule, pred, x, t, t_prev, eta, noise)[0], None

  steps = (jnp.arange(num_steps), jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32), keys)
  return jax.lax.scan(body, x, steps)[0]


def _dpm_loop(denoise, schedule, x, num_steps, spacing, final_sigmas_type):
  T = schedule.num_train_timesteps
  ts = dpm_solver_timesteps(T, num_steps, spacing or "linspace", schedule.steps_offset)
  # diffusers floors alpha_bar at 2^-24 (matters only with zero terminal SNR).
  abar = jnp.maximum(schedule.alphas_cumprod, 2.0**-24)
  sigmas = jnp.sqrt((1 - abar) / abar)
  if final_sigmas_type == "zero":
    last = jnp.zeros((1,))
  elif final_sigmas_type == "sigma_min":
    last = sigmas[:1]
  else:
    raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not one of ('zero', 'sigma_min')")
  sig = jnp.concatenate([sigmas[ts], last])
  sig_prev = jnp.concatenate([sig[:1], sig[:-2]])
  second = np.arange(num_steps) > 0
  if final_sigmas_type == "zero" or num_steps < 15:  # lower_order_final
    second[-1] = False
  prediction_type = schedule.prediction_type

  def body(carry, step):
    x, prev_x0 = carry
    i, t, sigma, sigma_next, sigma_prev, second_order = step
    pred = denoise(x, _batch_t(t, x.shape[0], jnp.int32), i)
    alpha, s = _vp_coeffs(sigma)
    if prediction_type == "epsilon":
      x0 = (x - s * pred) / alpha
    elif prediction_type == "v_prediction":
      x0 = alpha * x - s * pred
    else:
      x0 = pred
    x = dpm_solver_step(x0, prev_x0, x, sigma, sigma_next, sigma_prev, second_order)
    return (x, x0), None

  steps = (jnp.arange(num_steps), jnp.asarray(ts, jnp.int32), sig[:-1], sig[1:], sig_prev,
           jnp.asarray(second))
  return jax.lax.scan(body, (x, jnp.zeros_like(x)), steps)[0][0]


def _euler_loop(denoise, schedule, x, num_steps):
  sigmas = jnp.asarray(flow_euler_sigmas(schedule, num_steps), jnp.float32)

  def body(x, step):
    i, sigma, sigma_next = step
    t = _batch_t(sigma * schedule.num_train_timesteps, x.shape[0], jnp.float32)
    return euler_step(denoise(x, t, i), x, sigma, sigma_next), None

  return jax.lax.scan(body, x, (jnp.arange(num_steps), sigmas[:-1], sigmas[1:]))[0]


def sample(model_fn, schedule, shape, cond, cluster_ids, rng, *, null_cond=None,
           guidance_scale=1.0, num_steps=None, sampler=None, eta=0.0, timestep_spacing=None,
           final_sigmas_type="zero", x_init=None, null_cluster_ids=None, minority_guidance=0.0,
           minority_perturb_time=minority.PERTURB_TIME, minority_every=1, minority_min_time=0.0):
  """Generates x0 [shape] from noise.

  Args:
    model_fn: `model_fn(x_t, t, cond, cluster_ids)`, see the module docstring.
    schedule: `DDPMSchedule` (samplers 'ddim' (default), 'dpmsolver++') or `FlowSchedule`
      ('euler', default).
    shape: static output shape, batch first.
    cond, cluster_ids: the condition pytree and cluster ids [B] (or None).
    rng: PRNG key for the initial noise (and DDIM's eta noise).
    null_cond: unconditional condition for classifier-free guidance (None: no guidance).
    guidance_scale: CFG scale w in uncond + w (cond - uncond).
    num_steps: static step count; default 50 (DDIM), 20 (DPM-Solver++), 28 (Euler).
    eta: DDIM stochasticity (0 deterministic, 1 DDPM-like).
    timestep_spacing: 'leading' | 'trailing' | 'linspace'; default the schedule's, else the
      diffusers default of the sampler. steps_offset comes from the schedule.
    final_sigmas_type: DPM-Solver++ last sigma, 'zero' or 'sigma_min'.
    x_init: optional initial noise instead of drawing it from `rng`.
    null_cluster_ids: cluster ids of the unconditional pass (default: `cluster_ids`).
    minority_guidance: weight w of self-guided minority guidance (Um & Ye 2024, see minority.py),
      a Python float; 0 runs the plain sampler (the guidance is not traced).
    minority_perturb_time: re-noising level s / T of the minority score (paper: 0.8).
    minority_every: guide every n-th step, counted back from the last (paper: intermittent).
    minority_min_time: guide only steps with t >= min_time * T (paper's t_mid).
  Returns:
    The final sample, float32 [shape].
  """
  is_flow = isinstance(schedule, sched.FlowSchedule)
  sampler = sampler or ("euler" if is_flow else "ddim")
  sched.check_choice("sampler", sampler, SAMPLERS)
  if is_flow != (sampler == "euler"):
    raise ValueError(f"sampler {sampler!r} does not apply to a {type(schedule).__name__}")
  num_steps = num_steps or DEFAULT_STEPS[sampler]
  spacing = timestep_spacing or getattr(schedule, "timestep_spacing", None)
  init_rng, rng = jax.random.split(rng)
  x = (jax.random.normal(init_rng, shape, jnp.float32) if x_init is None
       else jnp.asarray(x_init, jnp.float32))
  plain = guided_denoiser(model_fn, cond, cluster_ids, null_cond, guidance_scale,
                          null_cluster_ids)
  if minority_guidance == 0:
    denoise = lambda x, t, step: plain(x, t)
  else:  # x_T is drawn as without guidance; DDIM's eta noise stream differs.
    rng, minority_rng = jax.random.split(rng)
    denoise = minority.minority_denoiser(
        plain, schedule, num_steps, minority_rng, minority_guidance,
        perturb_time=minority_perturb_time, every=minority_every, min_time=minority_min_time)
  if sampler == "ddim":
    return _ddim_loop(denoise, schedule, x, rng, num_steps, spacing, eta)
  if sampler == "dpmsolver++":
    return _dpm_loop(denoise, schedule, x, num_steps, spacing, final_sigmas_type)
  return _euler_loop(denoise, schedule, x, num_steps)
