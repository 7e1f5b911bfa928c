r"""Training throughput at the real scale: SD 2 base UNet and SD3-medium MMDiT, GRASP vs full.

  python -m benchmarks.throughput                  # GPU / TPU: the real sizes at 512 px
  python -m benchmarks.throughput --scale=tiny     # the default on CPU (reduced, see below)

Run from the checkout's root. The architectures are those of configs/sharding.py (diffusers'
stabilityai/stable-diffusion-2-base UNet, ~866M parameters; stable-diffusion-3-medium's
SD3Transformer2DModel, ~2.0B) with random weights: nothing is downloaded. Each row is the
trainer's own step, `grasp_jax.trainer.loop.train_step`, set up and compiled by `loop.setup` on a
mesh over all local devices (data parallel; --fsdp shards parameters too): bf16 compute, fp32
parameters and AdamW state, remat on, as configs/sharding.py trains. The step's inputs are what it
trains on once VAE latents and text states are precomputed: latents 64x64x4 (SD2) / 64x64x16 (SD3)
for 512 px images, text states 77x1024 (OpenCLIP-H) / 333x4096 + pooled 2048 (CLIP-L/G + T5); the
VAE and the text encoders are not in the step. GRASP: K=4 clusters, rank 64 (configs/mimic.py).

Printed per model and method: ms per step (median and min of --runs after --warmup), images/s per
device, the step's TFLOP per device from XLA's cost analysis of the compiled step (it counts
remat's recomputation, so "MFU" is strictly hardware FLOP utilisation), TFLOP/s per device, and
MFU against the device's dense bf16 peak (grasp_jax.trainer.accounting: A100, H100, H200, TPU v4,
v5e, v5p, ...). A CPU has no data-sheet entry: its peak is a bf16 matmul measured here just before.

--scale=tiny (CPU): the full-size step takes minutes per call on a few cores, so the same block
structure runs reduced: 256 px (latent 32x32), 2 images per device, the UNet at widths
(32, 64, 128, 128) with one layer per block, the MMDiT with 2 of its 24 blocks at width 256; text
states keep their real sizes, GRASP rank 8. Its numbers only exercise the path; ratios between
methods are indicative at best.
"""
import argparse
import dataclasses
import os
import time

from benchmarks import timing

SCALES = {
    # Per-device batch, image size, GRASP rank, architecture changes (configs/sharding.py fields).
    "full": dict(batch=8, resolution=512, rank=64, arch={"sd2_unet": {}, "sd3_medium": {}}),
    "tiny": dict(batch=2, resolution=256, rank=8, arch={
        "sd2_unet": dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 2, 4, 4),
                         layers_per_block=1),
        "sd3_medium": dict(num_layers=2, num_attention_heads=4, caption_projection_dim=256)}),
}
VAE_FACTOR = 8  # SD's VAE: latent side = image side / 8.


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", choices=sorted(SCALES), default=None,
                 help="full (default on GPU/TPU) or tiny (default on CPU)")
  p.add_argument("--models", default="sd2_unet,sd3_medium")
  p.add_argument("--methods", default="grasp,full")
  p.add_argument("--batch", type=int, default=None, help="images per device (default: scale's)")
  p.add_argument("--resolution", type=int, default=None, help="image side in pixels")
  p.add_argument("--k", type=int, default=4, help="GRASP clusters")
  p.add_argument("--rank", type=int, default=None, help="GRASP rank (default: scale's)")
  p.add_argument("--fsdp", type=int, default=1, help="devices that shard each parameter")
  p.add_argument("--warmup", type=int, default=None, help="default 3 (tiny: 1)")
  p.add_argument("--runs", type=int, default=None, help="default 10 (tiny: 3)")
  p.add_argument("--threads", type=int, default=None, help="XLA CPU threads (default: nproc)")
  return p.parse_args()


ARGS = _parse()
timing.set_cpu_threads(ARGS.threads or os.cpu_count())

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from configs import sharding as sharding_configs
from grasp_jax.parallel import sharding
from grasp_jax.run import dry_run
from grasp_jax.trainer import accounting
from grasp_jax.trainer import loop


@dataclasses.dataclass
class Row:
  model: str
  method: str
  params: int
  trainable: int
  batch_per_device: int
  compile_seconds: float
  seconds: tuple  # (median, min) per step.
  flops: float | None  # Per device per step.


def make_config(model, method, args, mesh_size):
  """configs/sharding.py's config at the benchmark's scale, image size and batch."""
  scale = SCALES[args.scale]
  c = sharding_configs.get_config(
      f"model={model},method={method},data=-1,fsdp={args.fsdp},"
      f"batch={args.batch * mesh_size},k={args.k},rank={args.rank}")
  latent = args.resolution // VAE_FACTOR
  base = {**c.model.base.to_dict(), **scale["arch"][model], "sample_size": latent}
  c.model.base = base
  c.data.image_size = latent
  return c


def random_batch(exp, config, batch_size, seed=0):
  """One process's share of a step's inputs: random latents and text states, cluster ids."""
  rng = np.random.default_rng(seed)
  shapes = dry_run.abstract_batch(config, exp, batch_size)
  out = {}
  for name, s in shapes.items():
    if jnp.issubdtype(s.dtype, jnp.integer):
      out[name] = rng.integers(0, config.method.num_clusters, s.shape).astype(s.dtype)
    else:
      out[name] = rng.standard_normal(s.shape).astype(s.dtype)
  return out


def measure(model, method, args, mesh):
  config = make_config(model, method, args, mesh.size)
  exp = dry_run.abstract_experiment(config)  # The config's model and loss, no data or weights.
  per_process = config.data.batch_size // jax.process_count()
  host = random_batch(exp, config, per_process)
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
  with jax.set_mesh(mesh):
    trainer = loop.setup(exp, config, mesh, example)
    batch = sharding.put_batch(host, mesh)
    box = [trainer.state]

    def run():
      box[0], metrics, _ = trainer.step_fn(box[0], trainer.frozen, batch)
      jax.block_until_ready((box[0], metrics))

    seconds = timing.interleaved({method: run}, args.warmup, args.runs)[method]
  trainable = dry_run.count(trainer.state.params)
  return Row(model=model, method=method, params=trainable + dry_run.count(trainer.frozen),
             trainable=trainable, batch_per_device=args.batch,
             compile_seconds=trainer.compile_seconds, seconds=seconds,
             flops=accounting.step_flops(trainer.step_fn))


def measured_matmul_peak(n=1024, runs=5):
  """FLOP/s of the best of `runs` bf16 [n, n] @ [n, n] on the default device."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def main():
  args = ARGS
  on_cpu = jax.default_backend() == "cpu"
  args.scale = args.scale or ("tiny" if on_cpu else "full")
  scale = SCALES[args.scale]
  args.batch = args.batch or scale["batch"]
  args.resolution = args.resolution or scale["resolution"]
  args.rank = args.rank or scale["rank"]
  args.warmup = args.warmup if args.warmup is not None else (1 if args.scale == "tiny" else 3)
  args.runs = args.runs or (3 if args.scale == "tiny" else 10)
  mesh = sharding.make_mesh(sharding_configs.get_config(f"data=-1,fsdp={args.fsdp}").mesh)
  kind = mesh.devices.flat[0].device_kind
  print(timing.machine())
  print(f"args: {vars(args)}")
  print(f"mesh: {mesh.size} x {kind} (data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}); "
        f"{args.resolution} px images -> latents {args.resolution // VAE_FACTOR}^2; bf16 compute, "
        "fp32 params and AdamW state, remat on")
  if args.scale == "tiny":
    print(f"REDUCED (--scale=tiny): {args.resolution} px, {args.batch} images/device, "
          f"architectures changed by {scale['arch']}; not the real models' throughput")
  peak = accounting.peak_flops(kind)
  peak_note = f"{kind} dense bf16 peak from accounting.PEAK_BF16_TFLOPS"
  if peak is None:
    peak = measured_matmul_peak()
    peak_note = f"measured bf16 1024^3 matmul on this {kind} device (best of 5)"
  print(f"peak: {peak / 1e12:.4f} TFLOP/s per device ({peak_note})", flush=True)

  print(f"\n{'model':<11}{'method':<7}{'params':>9}{'trainable':>11}{'img/dev':>8}"
        f"{'compile s':>10}{'ms/step':>10}{'min ms':>9}{'img/s/dev':>10}{'TFLOP/step':>11}"
        f"{'TFLOP/s':>9}{'MFU':>8}", flush=True)
  rows = []
  for model in args.models.split(","):
    for method in args.methods.split(","):
      r = measure(model, method, args, mesh)
      rows.append(r)
      median, low = r.seconds
      tflop = r.flops / 1e12 if r.flops else float("nan")
      print(f"{r.model:<11}{r.method:<7}{r.params / 1e6:8.1f}M{r.trainable / 1e6:10.2f}M"
            f"{r.batch_per_device:>8}{r.compile_seconds:10.0f}{median * 1e3:10.1f}"
            f"{low * 1e3:9.1f}{r.batch_per_device / median:10.3f}{tflop:11.4f}"
            f"{tflop / median:9.4f}{tflop * 1e12 / median / peak:8.1%}", flush=True)
  print()
  by_key = {(r.model, r.method): r for r in rows}
  for model in args.models.split(","):
    grasp, full = by_key.get((model, "grasp")), by_key.get((model, "full"))
    if grasp and full:
      print(f"{model}: GRASP / full step time {grasp.seconds[0] / full.seconds[0]:.3f}, "
            f"FLOPs {grasp.flops / full.flops:.3f}")
  print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
