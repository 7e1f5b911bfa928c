"""Multi-process start-up: `jax.distributed.initialize()` from flags or the environment.

Call `initialize()` once, before anything touches a device. Where the process group comes from,
first match wins:
  1. explicit arguments (main's --coordinator_address/--num_processes/--process_id);
  2. GRASP_COORDINATOR, GRASP_NUM_PROCESSES, GRASP_PROCESS_ID (launch/local.sh sets them);
  3. GRASP_DISTRIBUTED=auto (launch/tpu_vm.sh), a SLURM step with more than one task, or a TPU
     slice whose TPU_WORKER_HOSTNAMES lists more than one host: JAX's own cluster detection;
  4. otherwise a single process: nothing to do.
Once initialised, every process sees all devices of the job (`jax.devices()`) and its own
(`jax.local_devices()`); the trainer's mesh spans them all, each process feeds its slice of the
global batch (data/pipeline.py shards by `jax.process_index()`), only process 0 writes summaries,
and orbax checkpoints are written by all processes together.
"""
import os

from absl import logging
import jax
from jax.experimental import multihost_utils

_ENV = ("GRASP_COORDINATOR", "GRASP_NUM_PROCESSES", "GRASP_PROCESS_ID")


def _int_env(name):
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _auto_detect():
  """Whether the environment describes a multi-process job that JAX can detect by itself."""
  if os.environ.get("GRASP_DISTRIBUTED", "").lower() == "auto":
    return True
  if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
    return True
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  return bool(hosts) and len(hosts.split(",")) > 1


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins the process group described by the arguments or the environment (module docstring).

  Returns True when this is a multi-process job (jax.distributed is initialised), False for a
  single process. Must run before the first use of a device.
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV[0]) or None
  num_processes = num_processes if num_processes is not None else _int_env(_ENV[1])
  process_id = process_id if process_id is not None else _int_env(_ENV[2])
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("multi-process start-up needs all of coordinator address, number of "
                       "processes and process id (flags or " + ", ".join(_ENV) + "); got "
                       f"coordinator={coordinator_address!r}, num_processes={num_processes!r}, "
                       f"process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    if num_processes == 1:
      return False
  elif not _auto_detect():
    return False
  # Cross-process collectives on CPU (the local launcher; harmless on accelerators).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d; %d local of %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary():
  """Whether this process writes the files every process would otherwise write alike."""
  return jax.process_index() == 0


def barrier(name):
  """Blocks until every process reaches the barrier `name` (no-op for a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
