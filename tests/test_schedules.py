"""Noise schedules vs diffusers' PyTorch schedulers and closed forms."""
import json

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats
import torch

from grasp_jax.diffusion import schedules as sched

RNG = np.random.RandomState(0)
X0 = RNG.randn(5, 4, 4, 3).astype(np.float32)
NOISE = RNG.randn(5, 4, 4, 3).astype(np.float32)
T_IDX = np.array([0, 17, 500, 998, 999])


def _diffusers(beta_schedule, rescale, **kw):
  return DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                       rescale_betas_zero_snr=rescale, **kw)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("beta_schedule", sched.BETA_SCHEDULES)
def test_matches_diffusers_ddpm(beta_schedule, rescale):
  ref = _diffusers(beta_schedule, rescale)
  schedule = sched.from_diffusers_config(dict(ref.config))
  np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-5,
                             atol=1e-7)
  # diffusers recovers rescaled betas as 1 - abar_t / abar_{t-1} in float32 (~1e-7 abs noise);
  # ours are computed in float64.
  np.testing.assert_allclose(schedule.betas, ref.betas.numpy(), rtol=2e-5, atol=1e-6)
  t = torch.tensor(T_IDX)
  x0, noise = torch.tensor(X0), torch.tensor(NOISE)
  # diffusers takes sqrt(abar) and sqrt(1 - abar) of float32 abar; 1 - abar cancels at the ends
  # of the rescaled cosine schedule, where that float32 path differs from ours by ~4e-5 (seen on
  # this CPU, with the previous commit's code too).
  np.testing.assert_allclose(sched.add_noise(schedule, X0, NOISE, jnp.asarray(T_IDX)),
                             ref.add_noise(x0, noise, t).numpy(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(sched.get_velocity(schedule, X0, NOISE, jnp.asarray(T_IDX)),
                             ref.get_velocity(x0, noise, t).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prediction_type", sched.PREDICTION_TYPES)
def test_predict_x0_eps_inverts_targets(prediction_type):
  ref = _diffusers("scaled_linear", False, prediction_type=prediction_type)
  schedule = sched.from_diffusers_config(dict(ref.config))
  t_idx = T_IDX[:4]  # avoid abar ~ 0 where x0 from eps is ill-conditioned.
  t, x0, noise = torch.tensor(t_idx), torch.tensor(X0[:4]), torch.tensor(NOISE[:4])
  x_t = ref.add_noise(x0, noise, t)
  pred = {"epsilon": noise, "v_prediction": ref.get_velocity(x0, noise, t), "sample": x0}
  pred = pred[prediction_type]
  np.testing.assert_allclose(
      sched.training_target(schedule, X0[:4], NOISE[:4], jnp.asarray(t_idx)), pred.numpy(),
      rtol=1e-5, atol=1e-5)
  x0_hat, eps_hat = sched.predict_x0_eps(schedule, pred.numpy(), x_t.numpy(), jnp.asarray(t_idx))
  np.testing.assert_allclose(x0_hat, X0[:4], atol=2e-3)
  np.testing.assert_allclose(eps_hat, NOISE[:4], atol=2e-3)


@pytest.mark.parametrize("prediction_type", sched.PREDICTION_TYPES)
def test_snr_and_min_snr_weights(prediction_type):
  ref = _diffusers("linear", False, prediction_type=prediction_type)
  schedule = sched.from_diffusers_config(dict(ref.config))
  t = np.arange(0, 1000, 37)
  ref_snr = compute_snr(ref, torch.tensor(t)).numpy()
  np.testing.assert_allclose(sched.snr(schedule, jnp.asarray(t)), ref_snr, rtol=1e-4)
  gamma = 5.0
  expected = {"epsilon": np.minimum(ref_snr, gamma) / ref_snr,
              "v_prediction": np.minimum(ref_snr, gamma) / (ref_snr + 1),
              "sample": np.minimum(ref_snr, gamma)}[prediction_type]
  np.testing.assert_allclose(sched.min_snr_weight(schedule, jnp.asarray(t), gamma), expected,
                             rtol=1e-4)


def test_zero_terminal_snr_weight_is_finite():
  schedule = sched.ddpm_schedule(rescale_betas_zero_snr=True)
  assert float(schedule.alphas_cumprod[-1]) == 0.0
  assert np.isfinite(sched.min_snr_weight(schedule, jnp.array([999]), 5.0)).all()


def test_from_diffusers_config_file(tmp_path):
  # Stable Diffusion v1.x scheduler_config.json.
  config = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
  path = tmp_path / "scheduler_config.json"
  path.write_text(json.dumps(config))
  schedule = sched.from_diffusers_config(str(path))
  assert isinstance(schedule, sched.DDPMSchedule)
  assert (schedule.prediction_type, schedule.steps_offset, schedule.set_alpha_to_one,
          schedule.timestep_spacing, schedule.num_train_timesteps) == ("epsilon", 1, False, None,
                                                                        1000)
  flow = sched.from_diffusers_config(
      {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
  assert flow == sched.FlowSchedule(num_train_timesteps=1000, shift=3.0)


def test_bad_configs_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="beta_schedule='cosine'"):
    sched.from_diffusers_config({"beta_schedule": "cosine"})
  path = tmp_path / "flux.json"
  path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler",
                              "use_dynamic_shifting": True}))
  with pytest.raises(ValueError, match="flux.json.*use_dynamic_shifting"):
    sched.from_diffusers_config(str(path))
  with pytest.raises(ValueError, match="prediction_type"):
    sched.from_diffusers_config({"prediction_type": "flow"})


def test_shift_matches_flow_scheduler():
  ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
  unshifted = np.linspace(1, 1000, 1000)[::-1] / 1000
  np.testing.assert_allclose(sched.shift_sigmas(unshifted, 3.0), ref.sigmas.numpy(), rtol=1e-6)
  s = np.linspace(0, 1, 11)
  np.testing.assert_allclose(sched.shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s), rtol=1e-6)


def test_flow_noising_and_target():
  ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
  timesteps = ref.timesteps[T_IDX]
  sigma = ref.sigmas[T_IDX].numpy()
  expected = ref.scale_noise(torch.tensor(X0), timesteps, torch.tensor(NOISE)).numpy()
  np.testing.assert_allclose(sched.flow_add_noise(X0, NOISE, sigma), expected, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(sched.flow_target(X0, NOISE), NOISE - X0)
  x_s = sched.flow_add_noise(X0, NOISE, sigma)
  np.testing.assert_allclose(sched.flow_predict_x0(NOISE - X0, x_s, sigma), X0, atol=1e-5)
  np.testing.assert_allclose(sched.flow_timestep(sched.FlowSchedule(shift=3.0), sigma),
                             timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("weighting", sched.FLOW_LOSS_WEIGHTINGS)
def test_flow_loss_weights(weighting):
  sigma = np.linspace(0.05, 0.95, 7).astype(np.float32)
  expected = compute_loss_weighting_for_sd3(weighting, torch.tensor(sigma)).numpy()
  np.testing.assert_allclose(sched.flow_loss_weight(jnp.asarray(sigma), weighting), expected,
                             rtol=1e-5)


def _mode_cdf(s, scale):
  """P(f(U) <= s) for SD3's decreasing mode map f; f^{-1} by bisection."""
  f = lambda u: 1 - u - scale * (np.cos(np.pi * u / 2)**2 - 1 + u)
  lo, hi = np.zeros_like(s), np.ones_like(s)
  for _ in range(60):
    mid = (lo + hi) / 2
    above = f(mid) > s
    lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
  return 1 - lo


@pytest.mark.parametrize("sampling", sched.FLOW_SIGMA_SAMPLING)
def test_flow_sigma_sampling_distribution(sampling):
  shift, mean, std, mode_scale = 3.0, 0.3, 0.8, 1.29
  schedule = sched.FlowSchedule(shift=shift)
  sigma = np.asarray(sched.sample_flow_sigmas(
      jax.random.key(1), 20000, schedule, sampling=sampling, logit_mean=mean, logit_std=std,
      mode_scale=mode_scale))
  assert ((sigma >= 0) & (sigma <= 1)).all()
  grid = np.linspace(0.05, 0.95, 10)
  u = grid / (shift - (shift - 1) * grid)  # inverse shift
  expected = {"logit_normal": stats.norm.cdf((special.logit(u) - mean) / std),
              "mode": _mode_cdf(u, mode_scale), "uniform": u}[sampling]
  empirical = (sigma[:, None] <= grid).mean(0)
  np.testing.assert_allclose(empirical, expected, atol=0.015)  # > 4 binomial std devs
