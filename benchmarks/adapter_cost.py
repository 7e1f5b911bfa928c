r"""Train-step cost of GRASP's K gathered adapters vs one shared adapter vs dense learned-gating MoE.

  python -m benchmarks.adapter_cost            # full: workloads ffn, site, unet (~10 min, 2 cores)
  python -m benchmarks.adapter_cost --quick    # smoke test, < 1 min

Every row is one compiled train step, `grasp_jax.trainer.loop.train_step` itself (value_and_grad over the
trainable adapters only, AdamW with lazy per-cluster rows, global-norm clipping), on the same batch
with the backbone frozen. Times are medians of interleaved rounds (see timing.interleaved); memory
is XLA's buffer assignment of the compiled step (arguments + temporaries; CPU has no peak counter).

Workloads:
  ffn   `--blocks` SD-style feed-forward blocks, x + FeedForward_geglu(LayerNorm(x)) with the
        adapter site, at SD 1.x's first-level width C=320, N=256 tokens (a 16x16 latent), batch 8.
  site  The adapters alone (x + adapter(LayerNorm(x)), no FFN): the routing cost in isolation.
  unet  The small text-conditioned UNet of models/unet.tiny_config (attention at 16x16 and 8x8;
        the CPU demo's base keeps only 8x8) with the eps loss and CFG dropout: 32x32x1, batch 32.
Methods: `shared` one bottleneck adapter of rank r applied to every sample (no bank, no gather;
for unet, where the site is fixed, GRASP K=1 plays it), `grasp<K>` the bank with the sample's row
gathered, `moe<K>` the soft learned-gating MoE with K experts of the same shape (all computed).
"""
import argparse
import dataclasses
import functools
import os

from benchmarks import timing


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes, few runs (< 1 min)")
  p.add_argument("--workloads", default="ffn,site,unet")
  p.add_argument("--ks", default="1,4,8,32", help="GRASP K values (MoE: the ones > 1)")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--width", type=int, default=320)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--batch", type=int, default=8, help="batch of ffn/site (unet: --unet_batch)")
  p.add_argument("--unet_batch", type=int, default=32)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--threads", type=int, default=None, help="XLA CPU threads (default: nproc)")
  args = p.parse_args()
  if args.quick:
    args.workloads = "ffn"
    args.ks, args.width, args.tokens, args.blocks, args.batch = "1,8", 64, 64, 2, 4
    args.warmup, args.runs = 1, 3
  return args


ARGS = _parse()
timing.set_cpu_threads(ARGS.threads or os.cpu_count())

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from configs import common
from grasp_jax.trainer import optim
from grasp_jax.trainer import loop
from grasp_jax.diffusion import objectives
from grasp_jax.diffusion import schedules
from grasp_jax.models import adapters
from grasp_jax.models import attention
from grasp_jax.models import unet
from grasp_jax.models import trainable as trainable_lib

TARGET_GRASP_VS_SHARED = 1.05  # GRASP K=8 step <= 1.05x the shared adapter's.
TARGET_MOE_VS_GRASP = 2.0  # Dense MoE K=8 step >= 2x GRASP K=8's.


class SharedAdapter(nn.Module):
  """One bottleneck adapter for every sample, `up(act(down(x)))`: GRASP's single-adapter baseline."""
  rank: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    param = lambda name, init, axes, shape: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    down = param("down", nn.initializers.lecun_normal(), ("embed", "rank"), (c, self.rank))
    down_bias = param("down_bias", nn.initializers.zeros, ("rank",), (self.rank,))
    up = param("up", nn.initializers.zeros, ("rank", "embed"), (self.rank, c))
    up_bias = param("up_bias", nn.initializers.zeros, ("embed",), (c,))
    # Tokens flattened to one [B*N, C] matmul, the fastest form on XLA CPU: the weight gradient
    # of the 3-D einsum 'bnc,cr->bnr' (contracting b and n) runs ~2x slower.
    tokens = x.reshape(-1, c)
    h = adapters.ACTIVATIONS[self.activation](tokens @ down + down_bias)
    return (h @ up + up_bias).reshape(x.shape)


class Block(nn.Module):
  """x + FeedForward(LayerNorm(x)) with the adapter site (`with_ffn=False`: x + adapter only)."""
  adapter: adapters.AdapterConfig
  shared_rank: int = 0
  with_ffn: bool = True

  @nn.compact
  def __call__(self, x, cluster_ids):
    h = attention.layer_norm(1e-5, None, "norm")(x)
    if self.with_ffn:
      delta = attention.FeedForward(activation="geglu", adapter=self.adapter, name="ff")(
          h, cluster_ids)
    else:
      delta = adapters.FFNAdapter(self.adapter, name="adapter")(h, cluster_ids)
    if self.shared_rank:
      delta = delta + SharedAdapter(self.shared_rank, name="shared_adapter")(h)
    return x + delta


class Stack(nn.Module):
  num_blocks: int
  adapter: adapters.AdapterConfig
  shared_rank: int = 0
  with_ffn: bool = True

  @nn.compact
  def __call__(self, x, cluster_ids):
    for i in range(self.num_blocks):
      x = Block(self.adapter, self.shared_rank, self.with_ffn, name=f"blocks_{i}")(x, cluster_ids)
    return x


class _Partition:
  def __init__(self, num_clusters):
    self.num_clusters = num_clusters


class StackExperiment:
  """What `loop.train_step` needs from an Experiment, for the FFN stack: per-sample MSE."""

  def __init__(self, module, num_clusters, aux_weight):
    self.module, self.partition, self.aux_weight = module, _Partition(num_clusters), aux_weight

  def loss_fn(self, params, extra, batch, rng):
    del rng
    out, mut = self.module.apply({"params": params, **extra}, batch["x"], batch["cluster_id"],
                                 mutable=["losses"])
    per_sample = jnp.mean(jnp.square(out - batch["target"]), axis=(1, 2))
    aux = sum(jnp.sum(v) for v in jax.tree.leaves(mut.get("losses", {})))
    return per_sample, self.aux_weight * aux


class UNetExperiment:
  """The demo's eps denoising loss with CFG dropout (as experiment.Experiment.loss_fn)."""

  def __init__(self, module, num_clusters, aux_weight, null_cond):
    self.module, self.partition, self.aux_weight = module, _Partition(num_clusters), aux_weight
    self.null_cond = null_cond
    self.schedule = schedules.ddpm_schedule("linear", 1000)

  def loss_fn(self, params, extra, batch, rng):
    def model_fn(x_t, t, cond, ids):
      return self.module.apply({"params": params, **extra}, x_t, t, cond["context"],
                               cluster_ids=ids, mutable=["intermediates", "losses"])
    losses, aux = objectives.diffusion_loss(
        model_fn, self.schedule, batch["image"], {"context": batch["context"]},
        batch["cluster_id"], rng, null_cond={"context": self.null_cond}, cond_drop_prob=0.1)
    extra_losses = aux["model"].get("losses", {})
    return losses, self.aux_weight * sum(jnp.sum(v) for v in jax.tree.leaves(extra_losses))


def _config(method):
  c = common.base_config()
  c.method = mlc.ConfigDict({"adapter": method})
  c.optim.learning_rate = 3e-4
  return c


def _method(name, rank, workload):
  """'shared' | 'grasp<K>' | 'moe<K>' -> (AdapterConfig, shared rank, K, optimizer method)."""
  if name == "shared" and workload == "unet":  # The UNet's adapter site is fixed: GRASP K=1.
    return adapters.AdapterConfig(method="grasp", num_clusters=1, rank=rank), 0, 1, "grasp"
  if name == "shared":
    return adapters.AdapterConfig(method="none"), rank, 1, "shared"
  kind, k = name.rstrip("0123456789"), int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))
  return adapters.AdapterConfig(method=kind, num_clusters=k, rank=rank), 0, k, kind


def build_step(exp, config, init_args, batch):
  """Compiled `train_step` on a fresh state; returns (compiled, state, frozen)."""
  variables = nn.unbox(exp.module.init(jax.random.key(0), *init_args))
  trainable, frozen = trainable_lib.split(variables["params"], (r".*/(adapter|shared_adapter)/.*",))
  tx = optim.make_optimizer(config.optim, config.train.steps, config.method)
  # Fields other than these (EMA, SeLoRA's) are empty for the methods measured here.
  fields = {f.name: {} for f in dataclasses.fields(loop.TrainState)}
  state = loop.TrainState(**{**fields, "step": jnp.zeros((), jnp.int32), "params": trainable,
                              "opt_state": tx.init(trainable)})
  step = jax.jit(functools.partial(loop.train_step, exp=exp, config=config, tx=tx),
                 donate_argnums=(0,))
  return step.lower(state, frozen, batch).compile(), state, frozen


def _runner(compiled, state, frozen, batch):
  box = [state]

  def run():
    box[0], metrics, _ = compiled(box[0], frozen, batch)
    jax.block_until_ready((box[0], metrics))
  return run


def workload_steps(workload, methods, args):
  """{method: (run, memory)} for one workload."""
  rng = np.random.default_rng(0)
  out = {}
  for name in methods:
    adapter, shared_rank, k, kind = _method(name, args.rank, workload)
    config = _config(kind)
    ids = rng.integers(0, k, args.unet_batch if workload == "unet" else args.batch)
    ids = jnp.asarray(ids, jnp.int32)
    if workload == "unet":
      cfg = unet.tiny_config()
      module = unet.from_config(cfg, adapter=adapter)
      b, side = args.unet_batch, cfg["sample_size"]
      batch = {"image": jnp.asarray(rng.standard_normal((b, side, side, 1)), jnp.float32),
               "context": jnp.asarray(rng.standard_normal((b, 1, 384)), jnp.float32),
               "cluster_id": ids}
      null = jnp.zeros((1, 384), jnp.float32)
      exp = UNetExperiment(module, k, 0.01, null)
      init_args = (batch["image"][:1], jnp.zeros((1,), jnp.int32), batch["context"][:1],
                   ids[:1])
    else:
      module = Stack(args.blocks, adapter, shared_rank, with_ffn=workload == "ffn")
      shape = (args.batch, args.tokens, args.width)
      batch = {"x": jnp.asarray(rng.standard_normal(shape), jnp.float32),
               "target": jnp.asarray(rng.standard_normal(shape), jnp.float32),
               "cluster_id": ids}
      exp = StackExperiment(module, k, 0.01)
      init_args = (batch["x"][:1], ids[:1])
    compiled, state, frozen = build_step(exp, config, init_args, batch)
    out[name] = (_runner(compiled, state, frozen, batch),
                 {**timing.memory(compiled), "flops": timing.flops(compiled)})
    print(f"  compiled {workload}/{name}", flush=True)
  return out


def _verdict(value, target, at_most):
  ok = value <= target if at_most else value >= target
  return f"{'MET' if ok else 'MISSED'} (target {'<=' if at_most else '>='} {target})"


def main():
  args = ARGS
  print(timing.machine())
  print(f"args: {vars(args)}")
  ks = [int(k) for k in args.ks.split(",")]
  methods = ["shared"] + [f"grasp{k}" for k in ks] + [f"moe{k}" for k in ks if k > 1]
  for workload in args.workloads.split(","):
    if workload not in ("ffn", "site", "unet"):
      raise ValueError(f"--workloads: unknown workload {workload!r} (ffn, site, unet)")
    steps = workload_steps(workload, methods, args)
    times = timing.interleaved({m: run for m, (run, _) in steps.items()}, args.warmup, args.runs)
    base_t = times["shared"][0]
    base_m = steps["shared"][1]["total"]
    print(f"\n[{workload}] rank {args.rank}; median of {args.runs} interleaved runs after "
          f"{args.warmup} warm-up; memory = arguments + temporaries of the compiled step")
    print(f"{'method':>8} {'median ms':>10} {'min ms':>8} {'x shared':>9} {'x grasp K':>10} "
          f"{'GFLOP':>8} {'x shared':>9} {'args MiB':>9} {'temp MiB':>9} {'total MiB':>10} "
          f"{'x shared':>9}")
    for m in methods:
      med, low = times[m]
      mem = steps[m][1]
      k = m.lstrip("abcdefghijklmnopqrstuvwxyz")
      vs_grasp = f"{med / times['grasp' + k][0]:10.2f}" if m.startswith("moe") else " " * 10
      print(f"{m:>8} {med * 1e3:10.1f} {low * 1e3:8.1f} {med / base_t:9.3f} {vs_grasp} "
            f"{mem['flops'] / 1e9:8.3f} {mem['flops'] / steps['shared'][1]['flops']:9.3f} "
            f"{timing.mib(mem['argument']):9.2f} {timing.mib(mem['temp']):9.2f} "
            f"{timing.mib(mem['total']):10.2f} {mem['total'] / base_m:9.3f}")
    k = 8 if 8 in ks else max(ks)
    if f"grasp{k}" in times:
      r = times[f"grasp{k}"][0] / base_t
      rf = steps[f"grasp{k}"][1]["flops"] / steps["shared"][1]["flops"]
      print(f"GRASP K={k} / shared adapter, time: {r:.3f} "
            f"{_verdict(r, TARGET_GRASP_VS_SHARED, True)}; FLOPs: {rf:.3f}")
    if f"moe{k}" in times:
      r = times[f"moe{k}"][0] / times[f"grasp{k}"][0]
      rm = steps[f"moe{k}"][1]["total"] / steps[f"grasp{k}"][1]["total"]
      rf = steps[f"moe{k}"][1]["flops"] / steps[f"grasp{k}"][1]["flops"]
      print(f"dense MoE K={k} / GRASP K={k}, time: {r:.3f} "
            f"{_verdict(r, TARGET_MOE_VS_GRASP, False)}; FLOPs: {rf:.3f}; memory: {rm:.3f}")
  print(f"\nload average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
