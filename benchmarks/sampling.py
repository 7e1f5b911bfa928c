r"""Sampling throughput: images/s of DDIM (UNet) and flow Euler (MMDiT), with and without CFG.

  python -m benchmarks.sampling            # full (~5 min, 2 cores)
  python -m benchmarks.sampling --quick    # smoke test, < 1 min

Each row is one jitted `diffusion.samplers.sample` call (the whole loop is one lax.scan) producing
a batch of B images from noise: DDIM 50 steps on the small UNet (models/unet.tiny_config, eps,
linear schedule), Euler 28 steps on the small MMDiT (models/dit.tiny_config, flow, shift 3), both
at 32x32x1 with a MiniLM-sized context [B, 1, 384]. CFG (scale 3) runs the conditional and the
unconditional pass as one model call on 2B samples. Methods: `none` the base model, `grasp` with
K=4 rank-8 adapters and per-sample cluster ids (what the demo samples with). Times are medians of
interleaved rounds (timing.interleaved) after compilation and warm-up.
"""
import argparse
import os

from benchmarks import timing


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small models, few runs (< 1 min)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--methods", default="none,grasp")
  p.add_argument("--guidance", type=float, default=3.0)
  p.add_argument("--ddim_steps", type=int, default=50)
  p.add_argument("--euler_steps", type=int, default=28)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--threads", type=int, default=None, help="XLA CPU threads (default: nproc)")
  args = p.parse_args()
  if args.quick:
    args.batch, args.methods, args.runs = 4, "grasp", 2
  return args


ARGS = _parse()
timing.set_cpu_threads(ARGS.threads or os.cpu_count())

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.diffusion import samplers
from grasp_jax.diffusion import schedules
from grasp_jax.models import adapters
from grasp_jax.models import dit
from grasp_jax.models import unet

NUM_CLUSTERS, RANK, TEXT_DIM = 4, 8, 384


def _backbone(name, method, quick):
  """(module, model_fn(params), schedule, sampler name, steps) of one backbone."""
  adapter = (adapters.AdapterConfig(method="grasp", num_clusters=NUM_CLUSTERS, rank=RANK)
             if method == "grasp" else adapters.AdapterConfig())
  if name == "unet":
    cfg = unet.tiny_config()
    if quick:
      cfg = unet.tiny_config(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                             block_out_channels=[16, 32])
    module = unet.from_config(cfg, adapter=adapter)

    def model_fn(params):
      return lambda x, t, cond, ids: module.apply({"params": params}, x, t, cond["context"],
                                                  cluster_ids=ids)
    return (module, model_fn, schedules.ddpm_schedule("linear", 1000), "ddim",
            ARGS.ddim_steps)
  module = dit.from_config(dit.tiny_config(num_layers=2 if quick else 4), adapter=adapter)

  def model_fn(params):
    return lambda x, t, cond, ids: module.apply({"params": params}, x, cond["context"],
                                                cond["pooled"], t, cluster_ids=ids)
  return (module, model_fn, schedules.FlowSchedule(1000, shift=3.0), "euler", ARGS.euler_steps)


def build(name, method, guided, args):
  """A blocking `run()` sampling one batch, compiled."""
  module, model_fn, schedule, sampler, steps = _backbone(name, method, args.quick)
  b = args.batch
  rng = np.random.default_rng(0)
  cond = {"context": jnp.asarray(rng.standard_normal((b, 1, TEXT_DIM)), jnp.float32),
          "pooled": jnp.asarray(rng.standard_normal((b, TEXT_DIM)), jnp.float32)}
  null = jax.tree.map(lambda c: jnp.zeros((1,) + c.shape[1:], c.dtype), cond)
  ids = jnp.asarray(rng.integers(0, NUM_CLUSTERS, b), jnp.int32)
  x = jnp.zeros((1, 32, 32, 1))
  if name == "unet":
    init_args = (x, jnp.zeros((1,), jnp.int32), cond["context"][:1], ids[:1])
    params = jax.jit(module.init)(jax.random.key(0), *init_args)["params"]
  else:
    params = jax.jit(lambda r: module.init(r, x, cond["context"][:1], cond["pooled"][:1],
                                           jnp.zeros((1,)), cluster_ids=ids[:1]))(
                                               jax.random.key(0))["params"]
  cluster_ids = ids if method == "grasp" else None

  def generate(params, cond, null, key):
    return samplers.sample(model_fn(params), schedule, (b, 32, 32, 1), cond, cluster_ids, key,
                           null_cond=null if guided else None,
                           guidance_scale=args.guidance if guided else 1.0, num_steps=steps,
                           sampler=sampler)

  key = jax.random.key(1)
  compiled = jax.jit(generate).lower(params, cond, null, key).compile()
  return lambda: jax.block_until_ready(compiled(params, cond, null, key)), sampler, steps


def main():
  args = ARGS
  print(timing.machine())
  print(f"args: {vars(args)}")
  fns, info = {}, {}
  for name in ("unet", "dit"):
    for method in args.methods.split(","):
      if method not in ("none", "grasp"):
        raise ValueError(f"--methods: unknown method {method!r} (none, grasp)")
      for guided in (False, True):
        if args.quick and not guided:
          continue
        key = (name, method, guided)
        fns[key], *info[key] = build(name, method, guided, args)
        print(f"  compiled {name}/{method}/{'cfg' if guided else 'no cfg'}", flush=True)
  times = timing.interleaved(fns, args.warmup, args.runs)
  print(f"\nbatch {args.batch}, 32x32x1; median of {args.runs} interleaved runs after "
        f"{args.warmup} warm-up")
  print(f"{'backbone':>8} {'sampler':>8} {'steps':>5} {'method':>6} {'cfg':>4} "
        f"{'s/batch':>8} {'images/s':>9} {'ms/step':>8} {'cfg cost':>9}")
  for (name, method, guided), (med, _) in times.items():
    sampler, steps = info[(name, method, guided)]
    plain = times.get((name, method, False))
    cost = f"{med / plain[0]:9.2f}" if guided and plain else " " * 9
    print(f"{name:>8} {sampler:>8} {steps:5d} {method:>6} {'yes' if guided else 'no':>4} "
          f"{med:8.3f} {args.batch / med:9.2f} {med / steps * 1e3:8.1f} {cost}")
  print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
