"""What every benchmark here shares: CPU thread flags, interleaved medians, compiled memory.

Imports nothing from JAX at module level so that `set_cpu_threads` can still set XLA_FLAGS: the
flags are read when the CPU backend starts (the first array operation), not at `import jax`.
"""
import os
import platform
import statistics
import time


def set_cpu_threads(threads):
  """Pins XLA's CPU intra-op pool to `threads`; call before the first JAX array operation."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("set_cpu_threads must run before JAX's CPU backend starts")
  flags = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def machine():
  """One line naming the hardware, the load and the library versions."""
  import jax  # pylint: disable=g-import-not-at-top
  model = "unknown CPU"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
  return (f"{model}; nproc {os.cpu_count()}; load average {load}; python "
          f"{platform.python_version()}; jax {jax.__version__}; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")


def interleaved(fns, warmup, runs):
  """Median and min seconds of each `fn()` (which must block until its result is ready).

  Every callable is warmed up, then the timed calls go round-robin, one per callable per round,
  so drifting background load (other jobs on a shared machine) hits all of them alike.
  Returns {name: (median, min)}.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def memory(compiled):
  """Bytes of a compiled XLA executable: arguments, temporaries, and their sum.

  CPU has no peak-memory counter, so the compiler's buffer assignment stands in for it: the
  arguments (parameters, optimizer state, batch) plus the temporaries live during the step
  (activations kept for the backward pass, gradients). Outputs alias the donated state.
  """
  m = compiled.memory_analysis()
  arg, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
  return {"argument": arg, "temp": temp, "total": arg + temp}


def flops(compiled):
  """XLA's cost-analysis FLOP count of a compiled executable (load-independent)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops", float("nan"))


def mib(num_bytes):
  return num_bytes / 2**20
