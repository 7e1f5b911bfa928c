"""Compile and step accounting: seconds, images/s, TFLOP/s and MFU per device, as CLU scalars.

FLOPs come from XLA's cost analysis of the compiled (SPMD-partitioned) train step, which counts
one device's share of the work, including any recomputation from rematerialisation (so with
remat on, "MFU" here is really hardware FLOP utilisation). Peaks are dense bf16 FLOP/s per JAX
device from the vendors' data sheets; for other devices (CPU, unknown accelerators) MFU is left
out. A float32 run is still compared against the bf16 peak.
"""
import re
import time

# (lower-cased device_kind pattern, dense bf16 peak TFLOP/s per JAX device); first match wins.
PEAK_BF16_TFLOPS = (
    (r"tpu v4 lite", 137.5),  # v4i: one TensorCore per device.
    (r"tpu v4", 275.0),  # Megacore: a JAX device is a chip.
    (r"tpu v5 ?lite|tpu v5e", 197.0),
    (r"tpu v5p?$", 459.0),  # Reported as 'TPU v5' or 'TPU v5p'.
    (r"tpu v6 ?lite|tpu v6e", 918.0),
    (r"a100", 312.0),
    (r"h100.*pcie", 756.0),
    (r"h100.*nvl", 835.0),
    (r"h100|gh200", 989.0),
    (r"h200", 989.0),
    (r"b200", 2250.0),
)


def peak_flops(device_kind):
  """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown (e.g. CPU)."""
  kind = device_kind.lower().strip()
  for pattern, tflops in PEAK_BF16_TFLOPS:
    if re.search(pattern, kind):
      return tflops * 1e12
  return None


def step_flops(compiled):
  """FLOPs per device of one call of a compiled function (XLA cost analysis), or None."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.  pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per computation.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


class Meter:
  """Turns wall time between log points into throughput scalars.

  `scalars(step)` reports the steps since its previous call; the first call only sets the
  reference point, so the first (warm-up) interval is never reported. Call it where the host has
  waited for the step's results (the trainer's loop syncs on the finite flag every step).
  """

  def __init__(self, compiled, *, global_batch, num_devices, device_kind,
               compile_seconds=None, clock=time.perf_counter):
    self.flops = step_flops(compiled)
    self.peak = peak_flops(device_kind)
    self.images_per_device = global_batch / num_devices
    self.compile_seconds = compile_seconds
    self._clock = clock
    self._last = None  # (step, time)

  def compile_scalars(self):
    """Once per run: compile time and the step's FLOPs per device."""
    out = {}
    if self.compile_seconds is not None:
      out["perf/compile_seconds"] = self.compile_seconds
    if self.flops is not None:
      out["perf/step_tflop_per_device"] = self.flops / 1e12
    return out

  def scalars(self, step):
    """Seconds per step, images/s/device, TFLOP/s/device and MFU since the previous call."""
    now = self._clock()
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0]:
      return {}
    seconds = (now - last[1]) / (step - last[0])
    out = {"perf/step_seconds": seconds,
           "perf/images_per_second_per_device": self.images_per_device / seconds}
    if self.flops is not None:
      out["perf/tflops_per_second_per_device"] = self.flops / seconds / 1e12
      if self.peak is not None:
        out["perf/mfu"] = self.flops / seconds / self.peak
    return out
