"""Noise schedules: discrete DDPM (eps / v / x0 prediction) and rectified flow (SD3).

`DDPMSchedule` holds betas and alphas_cumprod for training timesteps 0..T-1 exactly as diffusers'
DDPMScheduler builds them, plus the sampling options of a diffusers `scheduler_config.json`.
`FlowSchedule` is the SD3 rectified flow `x_s = (1 - s) x0 + s noise`, model timestep `s * T`.
All array functions are pure and jit-able; per-sample scalars broadcast over NHWC (or any rank).
"""
import json
import math

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FLOW_SIGMA_SAMPLING = ("logit_normal", "mode", "uniform")
FLOW_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@struct.dataclass
class DDPMSchedule:
  """Variance-preserving discrete schedule; `len(betas)` training timesteps."""
  betas: jax.Array  # [T] float32
  alphas_cumprod: jax.Array  # [T] float32
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  # Sampling options read from a diffusers config. `timestep_spacing=None` means "the sampler's own
  # diffusers default" (DDIM: leading, DPM-Solver: linspace), as `Scheduler.from_config` behaves.
  timestep_spacing: str | None = struct.field(pytree_node=False, default=None)
  steps_offset: int = struct.field(pytree_node=False, default=0)
  set_alpha_to_one: bool = struct.field(pytree_node=False, default=True)
  clip_sample: bool = struct.field(pytree_node=False, default=False)
  clip_sample_range: float = struct.field(pytree_node=False, default=1.0)

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


@struct.dataclass
class FlowSchedule:
  """Rectified flow of SD3 (diffusers FlowMatchEulerDiscreteScheduler without dynamic shifting)."""
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  shift: float = struct.field(pytree_node=False, default=1.0)


def check_choice(name, value, allowed):
  """Raises a ValueError naming `name` unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {allowed}")


def make_betas(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
  """Betas [T] (float64 numpy) with the formulas of diffusers' DDPMScheduler."""
  check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta).
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)**2
  # squaredcos_cap_v2 (Nichol & Dhariwal 2021): discretised cosine alpha_bar, betas capped at 0.999.
  alpha_bar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2)**2
  grid = np.arange(num_train_timesteps + 1) / num_train_timesteps
  return np.array([min(1 - alpha_bar(b) / alpha_bar(a), 0.999)
                   for a, b in zip(grid[:-1], grid[1:])])


def rescale_zero_terminal_snr(betas):
  """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last timestep has SNR 0."""
  sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


def ddpm_schedule(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                  *, trained_betas=None, rescale_betas_zero_snr=False, prediction_type="epsilon",
                  timestep_spacing=None, steps_offset=0, set_alpha_to_one=True, clip_sample=False,
                  clip_sample_range=1.0) -> DDPMSchedule:
  """Builds a `DDPMSchedule` (computed in float64, stored in float32)."""
  check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
  if timestep_spacing is not None:
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
  if trained_betas is not None:
    betas = np.asarray(trained_betas, np.float64)
  else:
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
  if rescale_betas_zero_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return DDPMSchedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
      prediction_type=prediction_type, timestep_spacing=timestep_spacing,
      steps_offset=int(steps_offset), set_alpha_to_one=bool(set_alpha_to_one),
      clip_sample=bool(clip_sample), clip_sample_range=float(clip_sample_range))


# Flow-scheduler options whose non-default values change the sigmas; refused rather than ignored.
_UNSUPPORTED_FLOW_OPTIONS = {"use_dynamic_shifting": False, "shift_terminal": None,
                             "use_karras_sigmas": False, "use_exponential_sigmas": False,
                             "use_beta_sigmas": False, "invert_sigmas": False,
                             "stochastic_sampling": False}
_UNSUPPORTED_DDPM_OPTIONS = {"thresholding": False, "use_karras_sigmas": False,
                             "use_exponential_sigmas": False, "use_beta_sigmas": False,
                             "use_lu_lambdas": False, "use_flow_sigmas": False}


def from_diffusers_config(config) -> DDPMSchedule | FlowSchedule:
  """Schedule from a diffusers `scheduler_config.json` (a dict or a path to the file).

  `FlowMatch*` class names (or, lacking `_class_name`, a `shift` key) give a `FlowSchedule`;
  every other (DDPM/DDIM/PNDM/DPM-Solver/Euler...) config gives a `DDPMSchedule`. Missing keys
  take diffusers' defaults except `clip_sample`, which defaults to False here (SD configs set it
  False; pixel-space models should set it explicitly).
  """
  source = "scheduler config"
  if not isinstance(config, dict):
    source = str(config)
    with open(config) as f:
      config = json.load(f)
  get = config.get
  # `Scheduler.config` dicts carry no class name; a flow config is recognised by its `shift`.
  class_name = get("_class_name") or ("FlowMatch" if "shift" in config else "")
  if "FlowMatch" in class_name:
    options = _UNSUPPORTED_FLOW_OPTIONS
  else:
    options = _UNSUPPORTED_DDPM_OPTIONS
  for key, default in options.items():
    if get(key) not in (None, default):
      raise ValueError(f"{source}: {key}={get(key)!r} is not supported (only {default!r})")
  if options is _UNSUPPORTED_FLOW_OPTIONS:
    return FlowSchedule(num_train_timesteps=int(get("num_train_timesteps", 1000)),
                        shift=float(get("shift", 1.0)))
  try:
    return ddpm_schedule(
        beta_schedule=get("beta_schedule", "linear"),
        num_train_timesteps=int(get("num_train_timesteps", 1000)),
        beta_start=float(get("beta_start", 1e-4)), beta_end=float(get("beta_end", 0.02)),
        trained_betas=get("trained_betas"),
        rescale_betas_zero_snr=bool(get("rescale_betas_zero_snr", False)),
        prediction_type=get("prediction_type", "epsilon"),
        timestep_spacing=get("timestep_spacing"), steps_offset=int(get("steps_offset", 0)),
        set_alpha_to_one=bool(get("set_alpha_to_one", True)),
        clip_sample=bool(get("clip_sample", False)),
        clip_sample_range=float(get("clip_sample_range", 1.0)))
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def _per_sample(values, ndim):
  """[B] -> [B, 1, ..., 1] broadcastable against a rank-`ndim` batch."""
  return jnp.reshape(values, values.shape + (1,) * (ndim - values.ndim))


def _abar(schedule: DDPMSchedule, t, ndim):
  return _per_sample(schedule.alphas_cumprod[t], ndim)


def add_noise(schedule: DDPMSchedule, x0, noise, t):
  """q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t int [B]."""
  abar = _abar(schedule, t, x0.ndim)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def get_velocity(schedule: DDPMSchedule, x0, noise, t):
  """v target (Salimans & Ho 2022): sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
  abar = _abar(schedule, t, x0.ndim)
  return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0


def training_target(schedule: DDPMSchedule, x0, noise, t):
  """What the model regresses for `schedule.prediction_type`."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    return get_velocity(schedule, x0, noise, t)
  return x0


def predict_x0_eps(schedule: DDPMSchedule, prediction, x_t, t):
  """(x0, eps) implied by a model prediction of `schedule.prediction_type` at x_t, t."""
  abar = _abar(schedule, t, x_t.ndim)
  a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
  if schedule.prediction_type == "epsilon":
    return (x_t - s * prediction) / a, prediction
  if schedule.prediction_type == "v_prediction":
    return a * x_t - s * prediction, a * prediction + s * x_t
  return prediction, (x_t - a * prediction) / s


def snr(schedule: DDPMSchedule, t):
  """Signal-to-noise ratio abar_t / (1 - abar_t), [B]."""
  abar = schedule.alphas_cumprod[t]
  return abar / (1 - abar)


def min_snr_weight(schedule: DDPMSchedule, t, gamma=5.0):
  """Min-SNR-gamma loss weights (Hang et al. 2023) for the schedule's prediction type, [B].

  Written so that the weight of the x0 loss is min(SNR, gamma): eps loss x min(SNR, g)/SNR,
  v loss x min(SNR, g)/(SNR + 1). Zero-terminal-SNR steps get weight 1 (eps) instead of 0/0.
  """
  ratio = snr(schedule, t)
  if schedule.prediction_type == "epsilon":
    return jnp.minimum(1.0, gamma / ratio)
  if schedule.prediction_type == "v_prediction":
    return jnp.minimum(ratio, gamma) / (ratio + 1)
  return jnp.minimum(ratio, gamma)


# ---------------------------------------------------------------------------------------------
# Rectified flow (SD3).


def shift_sigmas(sigma, shift):
  """SD3 resolution shift s' = shift s / (1 + (shift - 1) s)."""
  return shift * sigma / (1 + (shift - 1) * sigma)


def flow_add_noise(x0, noise, sigma):
  """x_s = (1 - s) x0 + s noise; sigma [B]."""
  s = _per_sample(sigma, x0.ndim)
  return (1 - s) * x0 + s * noise


def flow_target(x0, noise):
  """Velocity d x_s / d s = noise - x0, the regression target of flow matching."""
  return noise - x0


def flow_predict_x0(velocity, x_s, sigma):
  """x0 implied by a velocity prediction at x_s."""
  return x_s - _per_sample(sigma, x_s.ndim) * velocity


def flow_timestep(schedule: FlowSchedule, sigma):
  """Model timestep for sigma: sigma * T (SD3's `timestep`), float32."""
  return (sigma * schedule.num_train_timesteps).astype(jnp.float32)


def sample_flow_sigmas(rng, batch_size, schedule: FlowSchedule, *, sampling="logit_normal",
                       logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
  """Training sigmas [B] (SD3, Esser et al. 2024 sec. 3.1), then the schedule's shift.

  logit_normal: sigmoid(N(mean, std)); mode: the heavy-middle density with `mode_scale`;
  uniform: U[0, 1). Unlike diffusers' SD3 script (which rounds u to the 1000-step grid of the
  shifted scheduler) sigmas stay continuous; the distribution is otherwise the same.
  """
  check_choice("sampling", sampling, FLOW_SIGMA_SAMPLING)
  if sampling == "logit_normal":
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
  else:
    u = jax.random.uniform(rng, (batch_size,))
    if sampling == "mode":
      u = 1 - u - mode_scale * (jnp.cos(jnp.pi * u / 2)**2 - 1 + u)
  return shift_sigmas(u, schedule.shift)


def flow_loss_weight(sigma, weighting="none"):
  """SD3 loss weightings: none (1), sigma_sqrt (sigma^-2), cosmap (2 / (pi (1 - 2s + 2s^2)))."""
  check_choice("weighting", weighting, FLOW_LOSS_WEIGHTINGS)
  if weighting == "sigma_sqrt":
    return sigma**-2.0
  if weighting == "cosmap":
    return 2 / (jnp.pi * (1 - 2 * sigma + 2 * sigma**2))
  return jnp.ones_like(sigma)
