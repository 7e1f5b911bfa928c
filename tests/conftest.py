"""Test setup: 8 fake CPU devices for sharding tests; PyTorch-only reference libraries."""
import os

# Must be set before jax is imported anywhere. The 8 fake devices share 2 cores: under load one
# device's thread can reach a collective more than XLA's default 40 s after the others, and XLA
# then aborts the process ("Termination timeout for `all reduce ...`", seen in the smoke study);
# the longer timeouts still end a real deadlock before a subprocess test's own timeout.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# transformers/diffusers are reference implementations here: keep them off TF and Flax.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
