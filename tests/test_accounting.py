"""Accounting: XLA FLOPs of a compiled step against the matmul formula; throughput scalars."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grasp_jax.trainer import accounting

M, N, K = 256, 128, 64


def _compiled_matmul(devices):
  mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
  a = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, P("d")))
  b = jax.ShapeDtypeStruct((K, N), jnp.float32, sharding=NamedSharding(mesh, P()))
  return jax.jit(lambda a, b: a @ b).lower(a, b).compile()


@pytest.mark.parametrize("num_devices", [1, 8])
def test_step_flops_is_per_device_matmul_count(num_devices):
  flops = accounting.step_flops(_compiled_matmul(jax.devices()[:num_devices]))
  assert flops == 2 * M * N * K / num_devices


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459), ("TPU v5p", 459),
    ("TPU v6 lite", 918), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA B200", 2250), ("cpu", None),
    ("Some Future Chip", None)])
def test_peak_table(kind, tflops):
  peak = accounting.peak_flops(kind)
  assert peak == (None if tflops is None else tflops * 1e12)


def test_meter_scalars_follow_the_formulas():
  now = [100.0]
  compiled = _compiled_matmul(jax.devices()[:8])
  meter = accounting.Meter(compiled, global_batch=64, num_devices=8, device_kind="TPU v4",
                           compile_seconds=12.5, clock=lambda: now[0])
  flops = 2 * M * N * K / 8
  assert meter.compile_scalars() == {"perf/compile_seconds": 12.5,
                                     "perf/step_tflop_per_device": flops / 1e12}
  assert meter.scalars(10) == {}  # The first call sets the reference (warm-up excluded).
  now[0] += 5.0
  out = meter.scalars(20)  # 10 steps in 5 s.
  np.testing.assert_allclose(out["perf/step_seconds"], 0.5)
  np.testing.assert_allclose(out["perf/images_per_second_per_device"], 64 / 8 / 0.5)
  np.testing.assert_allclose(out["perf/tflops_per_second_per_device"], flops / 0.5 / 1e12)
  np.testing.assert_allclose(out["perf/mfu"], flops / 0.5 / 275e12)


def test_meter_on_cpu_has_no_mfu():
  meter = accounting.Meter(_compiled_matmul(jax.devices()[:1]), global_batch=4, num_devices=1,
                           device_kind="cpu", clock=iter([0.0, 2.0]).__next__)
  meter.scalars(0)
  out = meter.scalars(4)
  assert "perf/mfu" not in out and out["perf/step_seconds"] == 0.5
