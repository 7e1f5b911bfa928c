"""Multi-process training on localhost: two processes, gloo collectives, one checkpoint.

Two processes (tests/multiprocess_toy.py, 2 CPU devices each) train the toy experiment with FSDP
rules; the reference is the same run in this process on one device. Also: the process-group
settings from flags and the environment.
"""
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multiprocess_toy
from grasp_jax.parallel import distributed
from grasp_jax.trainer import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "multiprocess_toy.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def _reference_config():
  c = multiprocess_toy.config()
  c.mesh.data, c.mesh.fsdp = -1, 1
  return c


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Runs the 2-process job once; returns (workdir, [outputs of process 0 and 1])."""
  tmp = tmp_path_factory.mktemp("two_processes")
  workdir, port = str(tmp / "run"), _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  procs, logs = [], []
  for i in range(2):
    logs.append(open(tmp / f"process_{i}.log", "w"))
    procs.append(subprocess.Popen(
        [sys.executable, SCRIPT, str(i), "2", str(port), workdir, str(tmp / f"out_{i}.npz")],
        env=env, stdout=logs[-1], stderr=subprocess.STDOUT, cwd=ROOT))
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  if any(codes):
    tails = [(tmp / f"process_{i}.log").read_text()[-3000:] for i in range(2)]
    pytest.fail(f"exit codes {codes}\n" + "\n----\n".join(tails))
  return workdir, [dict(np.load(tmp / f"out_{i}.npz")) for i in range(2)]


def test_two_processes_agree_and_match_one_device(two_process_run, tmp_path):
  _, (out0, out1) = two_process_run
  assert int(out0["num_devices"]) == 4 and int(out0["step"]) == multiprocess_toy.STEPS
  assert out0.keys() == out1.keys()
  for k in out0:
    np.testing.assert_array_equal(out0[k], out1[k], err_msg=k)
  config = _reference_config()
  single = loop.fit(multiprocess_toy.ShardedToy(config, (0, 1, 2, 3)), config,
                     str(tmp_path / "one"), devices=jax.devices()[:1])
  ref = _flat(single.state.params)
  assert ref.keys() == {k for k in out0 if k.startswith("[")}
  for k, v in ref.items():
    np.testing.assert_allclose(out0[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_checkpoint_is_one_consistent_directory(two_process_run):
  workdir, (out0, _) = two_process_run
  ckpt = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  every = multiprocess_toy.CHECKPOINT_EVERY
  # orbax also saves the first step of a fresh run (its initial-save policy).
  assert set(range(every, multiprocess_toy.STEPS + 1, every)) <= set(steps) <= (
      {1} | set(range(every, multiprocess_toy.STEPS + 1, every)))
  assert not [d for d in os.listdir(ckpt) if "tmp" in d]  # No half-written saves.
  final = os.path.join(ckpt, str(steps[-1]))
  assert {"state", "data", "config", "partition", "base"} <= set(os.listdir(final))
  # Each process saved its own data-iterator position.
  data_files = sorted(os.listdir(os.path.join(final, "data")))
  assert len([f for f in data_files if "process_" in f]) == 2, data_files


def test_restores_in_one_process_on_one_device_and_continues(two_process_run, tmp_path):
  workdir, (out0, _) = two_process_run
  shutil.copytree(workdir, tmp_path / "copy")
  config = _reference_config()
  restored = loop.fit(multiprocess_toy.ShardedToy(config, (0, 1, 2, 3)), config,
                       str(tmp_path / "copy"), devices=jax.devices()[:1])
  assert int(restored.state.step) == multiprocess_toy.STEPS
  for k, v in _flat(restored.state.params).items():
    np.testing.assert_array_equal(v, out0[k], err_msg=k)
  # Two more steps here continue the same data stream: equal to 6 steps in one process.
  steps = multiprocess_toy.STEPS + 2
  config.train.steps = steps
  continued = loop.fit(multiprocess_toy.ShardedToy(config, (0, 1, 2, 3)), config,
                        str(tmp_path / "copy"), devices=jax.devices()[:1])
  reference = loop.fit(multiprocess_toy.ShardedToy(config, (0, 1, 2, 3)), config,
                        str(tmp_path / "reference"), devices=jax.devices()[:1])
  assert int(continued.state.step) == steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _flat(continued.state.params), _flat(reference.state.params))


# ---------------------------------------------------------------------------------------------
# Process-group settings (no process group is started: single-process answers only).

def test_single_process_is_a_no_op(monkeypatch):
  for name in ("GRASP_COORDINATOR", "GRASP_NUM_PROCESSES", "GRASP_PROCESS_ID",
               "GRASP_DISTRIBUTED", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
               "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
  assert distributed.initialize() is False
  assert distributed.initialize("127.0.0.1:1234", 1, 0) is False


@pytest.mark.parametrize("env, match", [
    ({"GRASP_COORDINATOR": "127.0.0.1:1234"}, "needs all of"),
    ({"GRASP_COORDINATOR": "127.0.0.1:1", "GRASP_NUM_PROCESSES": "2",
      "GRASP_PROCESS_ID": "2"}, "outside"),
    ({"GRASP_COORDINATOR": "127.0.0.1:1", "GRASP_NUM_PROCESSES": "two",
      "GRASP_PROCESS_ID": "0"}, "GRASP_NUM_PROCESSES='two'"),
])
def test_bad_settings_are_named(monkeypatch, env, match):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=match):
    distributed.initialize()
