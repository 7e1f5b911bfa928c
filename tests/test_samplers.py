"""Samplers vs diffusers' PyTorch schedulers, driven by the same deterministic toy model."""
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from grasp_jax.diffusion import samplers
from grasp_jax.diffusion import schedules as sched

B, H, W, C = 3, 4, 4, 2
RNG = np.random.RandomState(0)
X_INIT = RNG.randn(B, H, W, C).astype(np.float32)
EMB = RNG.randn(B, C).astype(np.float32)
NULL_EMB = RNG.randn(1, C).astype(np.float32)
CLUSTERS = np.array([0, 2, 1], np.int32)


def toy_np(x, t, emb, clusters):
  """A fixed function of x, t, condition and cluster (numpy; mirrors `toy_jax`)."""
  t = np.asarray(t, np.float64)[:, None, None, None]
  return (0.9 * np.cos(t / 1000) * x + 0.1 * np.sin(t / 100) + 0.3 * emb[:, None, None, :]
          + 0.05 * clusters[:, None, None, None])


def toy_jax(x, t, cond, cluster_ids):
  t = t.astype(jnp.float32)[:, None, None, None]
  return (0.9 * jnp.cos(t / 1000) * x + 0.1 * jnp.sin(t / 100)
          + 0.3 * cond["emb"][:, None, None, :] + 0.05 * cluster_ids[:, None, None, None])


def reference_loop(scheduler, num_steps, guidance_scale):
  """diffusers' denoising loop with manual classifier-free guidance."""
  scheduler.set_timesteps(num_steps)
  x = torch.tensor(X_INIT)
  for t in scheduler.timesteps:
    ts = np.full(B, float(t))
    pred = toy_np(x.numpy(), ts, EMB, CLUSTERS)
    if guidance_scale is not None:
      uncond = toy_np(x.numpy(), ts, np.broadcast_to(NULL_EMB, EMB.shape), CLUSTERS)
      pred = uncond + guidance_scale * (pred - uncond)
    x = scheduler.step(torch.tensor(pred, dtype=torch.float32), t, x).prev_sample
  return x.numpy()


CASES = {
    # name: (diffusers scheduler class, its config, sampler, steps, guidance scale, sample kwargs)
    "ddim_sd_leading_cfg": (DDIMScheduler, dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        set_alpha_to_one=False, clip_sample=False), "ddim", 10, 7.5, {}),
    "ddim_v_trailing_zero_snr": (DDIMScheduler, dict(
        prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
        clip_sample=False), "ddim", 10, None, {}),
    "ddim_x0_linspace_clip_cosine": (DDIMScheduler, dict(
        beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace",
        clip_sample=True, clip_sample_range=0.8), "ddim", 12, None, {}),
    "dpm_eps_linspace_cfg": (DPMSolverMultistepScheduler, dict(), "dpmsolver++", 10, 3.0, {}),
    "dpm_v_leading_sigma_min": (DPMSolverMultistepScheduler, dict(
        prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
        final_sigmas_type="sigma_min", beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012), "dpmsolver++", 20, None, {"final_sigmas_type": "sigma_min"}),
    "dpm_eps_trailing_zero_snr": (DPMSolverMultistepScheduler, dict(
        timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        "dpmsolver++", 16, None, {}),
    "flow_sd3_cfg": (FlowMatchEulerDiscreteScheduler, dict(shift=3.0), "euler", 28, 5.0, {}),
    "flow_noshift": (FlowMatchEulerDiscreteScheduler, dict(shift=1.0), "euler", 7, None, {}),
}


@pytest.mark.parametrize("name", CASES)
def test_trajectory_matches_diffusers(name):
  cls, config, sampler, steps, scale, kwargs = CASES[name]
  scheduler = cls(**config)
  schedule = sched.from_diffusers_config(dict(scheduler.config))
  expected = reference_loop(scheduler, steps, scale)
  cond = {"emb": jnp.asarray(EMB)}
  null = None if scale is None else {"emb": jnp.asarray(NULL_EMB)}
  out = samplers.sample(toy_jax, schedule, X_INIT.shape, cond, jnp.asarray(CLUSTERS),
                        jax.random.key(0), null_cond=null, guidance_scale=scale or 1.0,
                        num_steps=steps, sampler=sampler, x_init=X_INIT, **kwargs)
  scale_ref = np.abs(expected).max()
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * scale_ref)


def test_sample_is_jittable_with_traced_schedule():
  schedule = sched.ddpm_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction")
  cond = {"emb": jnp.asarray(EMB)}

  @jax.jit
  def run(schedule, rng):
    return samplers.sample(toy_jax, schedule, X_INIT.shape, cond, jnp.asarray(CLUSTERS), rng,
                           null_cond={"emb": NULL_EMB}, guidance_scale=2.0, num_steps=6,
                           sampler="dpmsolver++")

  out = run(schedule, jax.random.key(3))
  eager = samplers.sample(toy_jax, schedule, X_INIT.shape, cond, jnp.asarray(CLUSTERS),
                          jax.random.key(3), null_cond={"emb": NULL_EMB}, guidance_scale=2.0,
                          num_steps=6, sampler="dpmsolver++")
  assert out.shape == X_INIT.shape and np.isfinite(out).all()
  np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-5)


def test_ddim_stochastic_step_matches_diffusers():
  scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  scheduler.set_timesteps(20)
  schedule = sched.from_diffusers_config(dict(scheduler.config))
  t = int(scheduler.timesteps[5])
  pred = RNG.randn(*X_INIT.shape).astype(np.float32)
  noise = RNG.randn(*X_INIT.shape).astype(np.float32)
  expected = scheduler.step(torch.tensor(pred), t, torch.tensor(X_INIT), eta=1.0,
                            variance_noise=torch.tensor(noise)).prev_sample.numpy()
  out, _ = samplers.ddim_step(schedule, pred, X_INIT, t, t - 1000 // 20, eta=1.0, noise=noise)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 7, 28, 50])
@pytest.mark.parametrize("spacing", sched.TIMESTEP_SPACINGS)
def test_timestep_grids_match_diffusers(spacing, steps):
  ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
  ddim.set_timesteps(steps)
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, steps, spacing, 1), ddim.timesteps)
  dpm = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1)
  dpm.set_timesteps(steps)
  np.testing.assert_array_equal(samplers.dpm_solver_timesteps(1000, steps, spacing, 1),
                                dpm.timesteps)
  flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
  flow.set_timesteps(steps)
  np.testing.assert_allclose(samplers.flow_euler_sigmas(sched.FlowSchedule(shift=3.0), steps),
                             flow.sigmas, rtol=1e-6, atol=1e-7)


def test_guidance_is_one_batched_call():
  calls = []

  def model_fn(x, t, cond, cluster_ids):
    calls.append(x.shape[0])
    return toy_jax(x, t, cond, cluster_ids)

  t = jnp.full((B,), 321, jnp.int32)
  null_ids = jnp.zeros((B,), jnp.int32)
  denoise = samplers.guided_denoiser(model_fn, {"emb": EMB}, jnp.asarray(CLUSTERS),
                                     {"emb": NULL_EMB}, 4.0, null_cluster_ids=null_ids)
  out = denoise(jnp.asarray(X_INIT), t)
  assert calls == [2 * B]
  cond = toy_np(X_INIT, np.full(B, 321), EMB, CLUSTERS)
  uncond = toy_np(X_INIT, np.full(B, 321), np.broadcast_to(NULL_EMB, EMB.shape), np.zeros(B))
  np.testing.assert_allclose(out, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(samplers.cfg_combine(cond, uncond, 4.0), uncond + 4 * (cond - uncond))


def test_bad_sampler_choice():
  with pytest.raises(ValueError, match="sampler"):
    samplers.sample(toy_jax, sched.FlowSchedule(), X_INIT.shape, {"emb": EMB}, None,
                    jax.random.key(0), sampler="ddim")
  with pytest.raises(ValueError, match="timestep_spacing"):
    samplers.ddim_timesteps(1000, 10, "karras")
