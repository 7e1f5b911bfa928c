r"""Our Flax UNet train step vs diffusers' PyTorch UNet2DConditionModel train step, one process.

  python -m benchmarks.vs_diffusers            # full: configs tiny and sd (~10 min, 2 cores)
  python -m benchmarks.vs_diffusers --quick    # smoke test, < 1 min

Both sides: full fine-tuning, the eps (MSE) denoising loss on the linear DDPM schedule, AdamW
(lr 1e-4, weight decay 1e-2, eps 1e-8) with global-norm clipping at 1.0, fp32, the same diffusers
config, the same weights (torch's initialisation converted with models/convert.py) and the same
batch; timesteps and noise are drawn inside each step on both sides. Ours is
`grasp_jax.trainer.loop.train_step` compiled with donated state; theirs is the loop of diffusers'
train_text_to_image.py (zero_grad, backward, clip_grad_norm_, step) with torch's default AdamW.
CPU threads: torch.set_num_threads(N) and XLA_FLAGS intra_op_parallelism_threads=N with the Eigen
pool on; N = nproc unless --threads. Times are medians of interleaved rounds (timing.interleaved).

Configs:
  tiny  models/unet.tiny_config(): the small UNet, 32x32x1, MiniLM context [B, 1, 384].
  sd    SD 1.x's architecture (3 cross-attention down blocks + 1 plain, 2 layers per block, 8
        heads, conv proj_in, context 77 x 768) at a fifth of its width (64, 128, 256, 256) on a
        32x32x4 latent (256 px).
--breakdown (default on in full runs) also times forward only and forward + backward on both
sides, so the gap can be attributed to the forward, the backward or the optimizer update.
--profile DIR traces a few steps on both sides (jax.profiler -> XLA thunk times per HLO op, read
from the trace's xplane.pb; torch.profiler -> self CPU time per aten op) and prints the top ops.
"""
import argparse
import collections
import dataclasses
import functools
import glob
import os
import re

from benchmarks import timing


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes, few runs (< 1 min)")
  p.add_argument("--configs", default="tiny,sd")
  p.add_argument("--tiny_batch", type=int, default=32)
  p.add_argument("--sd_batch", type=int, default=4)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                 help="also time forward and forward+backward (default: on unless --quick)")
  p.add_argument("--threads", type=int, default=None, help="CPU threads (default: nproc)")
  p.add_argument("--profile", default="", help="trace directory: also print per-op profiles")
  p.add_argument("--profile_steps", type=int, default=3)
  args = p.parse_args()
  if args.quick:
    args.configs, args.tiny_batch, args.warmup, args.runs = "tiny", 8, 1, 3
  if args.breakdown is None:
    args.breakdown = not args.quick
  args.threads = args.threads or os.cpu_count()
  return args


ARGS = _parse()
timing.set_cpu_threads(ARGS.threads)

# pylint: disable=g-import-not-at-top,wrong-import-position
import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import torch
import torch.nn.functional as F

from configs import common
from grasp_jax.trainer import optim
from grasp_jax.trainer import loop
from grasp_jax.diffusion import objectives
from grasp_jax.diffusion import schedules
from grasp_jax.models import convert
from grasp_jax.models import unet
from grasp_jax.models import trainable as trainable_lib

TARGET = 0.8  # Our step <= 0.8x diffusers'.
LR, WEIGHT_DECAY, CLIP = 1e-4, 1e-2, 1.0


def sd_like_config():
  """SD 1.x UNet architecture at 1/5 width (see the module docstring)."""
  return dict(_class_name="UNet2DConditionModel", sample_size=32, in_channels=4, out_channels=4,
              down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
              block_out_channels=[64, 128, 256, 256], layers_per_block=2, norm_num_groups=32,
              attention_head_dim=8, cross_attention_dim=768)


def quick_config():
  """A two-level demo UNet that compiles in seconds (the smoke test)."""
  return unet.tiny_config(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                          block_out_channels=[16, 32])


def make_batch(cfg, batch, context_len, rng):
  side, ch = cfg["sample_size"], cfg["in_channels"]
  return {"image": rng.standard_normal((batch, side, side, ch)).astype(np.float32),
          "context": rng.standard_normal((batch, context_len, cfg["cross_attention_dim"]))
                     .astype(np.float32),
          "cluster_id": np.zeros((batch,), np.int32)}


# ---------------------------------------------------------------------------------------------
# Ours.

class _Partition:
  num_clusters = 1


class FullFinetune:
  """What `loop.train_step` needs: the eps loss of the whole UNet, no CFG dropout."""
  partition = _Partition()

  def __init__(self, module):
    self.module = module
    self.schedule = schedules.ddpm_schedule("linear", 1000)

  def model_fn(self, params, x_t, t, cond, cluster_ids):
    return self.module.apply({"params": params}, x_t, t, cond["context"], cluster_ids=cluster_ids)

  def loss_fn(self, params, extra, batch, rng):
    del extra
    losses, _ = objectives.diffusion_loss(functools.partial(self.model_fn, params),
                                          self.schedule, batch["image"],
                                          {"context": batch["context"]}, None, rng)
    return losses, 0.0


def jax_side(cfg, torch_model, batch, breakdown):
  """{name: run} for our step (and forward / grad), plus the compiled step."""
  module = unet.from_config(cfg)
  abstract = jax.eval_shape(module.init, jax.random.key(0), *unet.example_inputs(module))
  state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  params = jax.tree.map(jnp.asarray, convert.torch_to_flax(state_dict, abstract["params"]))
  config = common.base_config()
  config.method = mlc.ConfigDict({"adapter": "none"})
  config.optim.weight_decay = WEIGHT_DECAY
  config.optim.learning_rate = LR
  config.optim.grad_clip = CLIP
  exp = FullFinetune(module)
  tx = optim.make_optimizer(config.optim, config.train.steps, config.method)
  trainable, frozen = trainable_lib.split(params, (".*",))
  fields = {f.name: {} for f in dataclasses.fields(loop.TrainState)}
  state = loop.TrainState(**{**fields, "step": jnp.zeros((), jnp.int32), "params": trainable,
                              "opt_state": tx.init(trainable)})
  batch = jax.tree.map(jnp.asarray, batch)
  step = jax.jit(functools.partial(loop.train_step, exp=exp, config=config, tx=tx),
                 donate_argnums=(0,)).lower(state, frozen, batch).compile()
  box = [state]

  def run_step():
    box[0], metrics, _ = step(box[0], frozen, batch)
    jax.block_until_ready((box[0], metrics))

  runs = {"step": run_step}
  if breakdown:
    rng = jax.random.key(1)
    loss = lambda p, b: jnp.mean(exp.loss_fn(p, {}, b, rng)[0])
    fwd = jax.jit(loss).lower(trainable, batch).compile()
    grad = jax.jit(jax.value_and_grad(loss)).lower(trainable, batch).compile()
    runs["forward"] = lambda: jax.block_until_ready(fwd(box[0].params, batch))
    runs["forward+backward"] = lambda: jax.block_until_ready(grad(box[0].params, batch))
  return runs, step


# ---------------------------------------------------------------------------------------------
# Theirs.

def torch_side(model, batch, breakdown):
  """{name: run} for diffusers' training step (and forward / forward+backward)."""
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-8)
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
  x0 = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
  context = torch.from_numpy(batch["context"])
  b = x0.shape[0]

  def loss_fn():
    noise = torch.randn_like(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,))
    pred = model(scheduler.add_noise(x0, noise, t), t, context).sample
    return F.mse_loss(pred, noise)

  def run_step():
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()

  runs = {"step": run_step}
  if breakdown:
    def forward():
      with torch.no_grad():
        loss_fn()

    def forward_backward():
      model.zero_grad(set_to_none=True)
      loss_fn().backward()

    runs["forward"] = forward
    runs["forward+backward"] = forward_backward
  return runs


# ---------------------------------------------------------------------------------------------
# Profiles.

def _xla_op_seconds(logdir):
  """{HLO op name without its .N suffix: seconds} summed over the XLA ops of a jax trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # Only TF can read the trace.
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {logdir}")
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  totals = collections.Counter()
  for plane in space.planes:
    hlo_stats = {k for k, v in plane.stat_metadata.items() if v.name == "hlo_op"}
    for line in plane.lines:
      for event in line.events:
        if any(s.metadata_id in hlo_stats for s in event.stats):
          name = plane.event_metadata[event.metadata_id].name
          totals[re.sub(r"\.\d+$", "", name)] += event.duration_ps * 1e-12
  return totals


def profile(name, our_step, their_step, args):
  """Prints the top ops per step of both train steps (after the timed runs)."""
  n = args.profile_steps
  logdir = os.path.join(args.profile, name)
  with jax.profiler.trace(logdir):
    for _ in range(n):
      our_step()
  ours = _xla_op_seconds(logdir)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(n):
      their_step()
  theirs = collections.Counter({e.key: e.self_cpu_time_total * 1e-6
                                for e in prof.key_averages()})
  for side, totals in (("ours (XLA ops)", ours), ("diffusers (aten ops, self time)", theirs)):
    total = sum(totals.values())
    print(f"[{name}] profile {side}: {total / n * 1e3:.1f} ms/step in ops; top 12:")
    for op, sec in totals.most_common(12):
      print(f"  {sec / n * 1e3:9.1f} ms {100 * sec / total:5.1f}%  {op}")


def main():
  args = ARGS
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  print(timing.machine())
  print(f"torch {torch.__version__} (threads {torch.get_num_threads()}, interop "
        f"{torch.get_num_interop_threads()}); diffusers {diffusers.__version__}")
  print(f"args: {vars(args)}")
  rng = np.random.default_rng(0)
  ratios = {}
  for name in args.configs.split(","):
    if name == "tiny":
      cfg, b, ctx_len = (quick_config() if args.quick else unet.tiny_config()), args.tiny_batch, 1
    elif name == "sd":
      cfg, b, ctx_len = sd_like_config(), args.sd_batch, 77
    else:
      raise ValueError(f"--configs: unknown config {name!r} (tiny, sd)")
    model = diffusers.UNet2DConditionModel.from_config(cfg)
    batch = make_batch(cfg, b, ctx_len, rng)
    ours, compiled = jax_side(cfg, model, batch, args.breakdown)
    theirs = torch_side(model, batch, args.breakdown)
    fns = {**{f"ours {k}": f for k, f in ours.items()},
           **{f"diffusers {k}": f for k, f in theirs.items()}}
    times = timing.interleaved(fns, args.warmup, args.runs)
    n_params = sum(p.numel() for p in model.parameters())
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
    mem = timing.memory(compiled)
    print(f"\n[{name}] {n_params / 1e6:.2f} M params, batch {b}, sample "
          f"{cfg['sample_size']}x{cfg['sample_size']}x{cfg['in_channels']}, context {ctx_len} x "
          f"{cfg['cross_attention_dim']}; median of {args.runs} interleaved runs after "
          f"{args.warmup} warm-up")
    print(f"{'part':>17} {'ours ms':>9} {'diffusers ms':>13} {'ours/diffusers':>15}")
    for part in ours:
      o, t = times[f"ours {part}"][0], times[f"diffusers {part}"][0]
      print(f"{part:>17} {o * 1e3:9.1f} {t * 1e3:13.1f} {o / t:15.3f}")
    if args.breakdown:
      o = times["ours step"][0] - times["ours forward+backward"][0]
      t = times["diffusers step"][0] - times["diffusers forward+backward"][0]
      print(f"{'update (diff.)':>17} {o * 1e3:9.1f} {t * 1e3:13.1f}")
    step_s = times["ours step"][0]
    print(f"our step: XLA cost analysis {flops / 1e9:.1f} GFLOP -> {flops / 1e9 / step_s:.1f} "
          f"GFLOP/s; arguments + temporaries {timing.mib(mem['total']):.0f} MiB")
    ratios[name] = step_s / times["diffusers step"][0]
    if args.profile:
      profile(name, ours["step"], theirs["step"], args)
  print()
  for name, r in ratios.items():
    verdict = "MET" if r <= TARGET else "MISSED"
    print(f"{name}: our train step / diffusers' = {r:.3f} {verdict} (target <= {TARGET})")
  print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
