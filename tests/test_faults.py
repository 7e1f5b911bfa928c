"""Faults a careless user or a crash can cause (issue 18), on the toy experiment of test_train:
two runs on one workdir, a changed config on resume, an unreadable checkpoint, kill -9 during an
asynchronous save. Each must fail loudly or recover, and lose nothing already written.

  python tests/test_faults.py WORKDIR   (the run the kill test kills: trains with a save per step)
"""
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from grasp_jax.run import lock  # noqa: E402

STEPS, EVERY = 4, 2


def digests(root):
  """relative path -> sha256 of every file under `root`."""
  out = {}
  for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


# ---------------------------------------------------------------------------------------------
# Two runs on one workdir.

def test_second_run_on_one_workdir_fails_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  code = ("import sys; from grasp_jax.run import lock\n"
          "with lock.hold(sys.argv[1]): pass")
  with lock.hold(workdir):
    with pytest.raises(lock.WorkdirInUseError,
                       match=rf"workdir {workdir} is in use by pid {os.getpid()} on "
                             rf"{socket.gethostname()}, started 20"):
      with lock.hold(workdir):
        pass
    other = subprocess.run([sys.executable, "-c", code, workdir], capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert other.returncode != 0
    assert f"is in use by pid {os.getpid()}" in other.stderr
  with lock.hold(workdir):  # Released at the end of the first run.
    pass


def test_other_processes_check_the_lock(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(lock.WorkdirInUseError, match="holds no lock"):
    lock.check(workdir)
  synced = []
  with lock.hold(workdir, sync=lambda: synced.append(True)):
    lock.check(workdir)  # What processes 1.. do after the barrier.
    with lock.hold(workdir, primary=False):
      pass
  assert synced == [True]
  with pytest.raises(lock.WorkdirInUseError, match="is not held by process 0"):
    lock.check(workdir)


# ---------------------------------------------------------------------------------------------
# Resume: changed config, unreadable step.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished toy run: checkpoints at steps 2 and 4; its final trainable params."""
  import jax
  import test_train
  from grasp_jax.trainer import loop
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  config = toy(STEPS)
  trainer = loop.fit(test_train.ToyExperiment(config, (0, 1, 2, 3)), config, workdir,
                     devices=jax.devices()[:1])
  return workdir, jax.device_get(trainer.state.params)


def toy(steps):
  import test_train
  config = test_train.toy_config(steps, EVERY)
  config.train.keep_checkpoints = 10
  return config


def fit(config, workdir):
  import jax
  import test_train
  from grasp_jax.trainer import loop
  return loop.fit(test_train.ToyExperiment(config, (0, 1, 2, 3)), config, workdir,
                  devices=jax.devices()[:1])


def test_changed_config_on_resume_is_refused(trained, tmp_path):
  from grasp_jax.trainer import checkpoint
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  before = digests(workdir)
  config = toy(STEPS + 2)
  config.optim.learning_rate = 0.5
  config.method.rank = 3
  message = (r"checkpoints/4 was trained under another config; these fields differ "
             r"\(checkpoint -> now\):\n  method.rank: 2 -> 3\n  optim.learning_rate: 0.01 -> "
             r"0.5\nRerun with the checkpoint's values, or use a fresh --workdir")
  with pytest.raises(checkpoint.ConfigChangedError, match=message):
    checkpoint.check_resume(workdir, config)  # main: before config.json is written.
  with pytest.raises(checkpoint.ConfigChangedError, match=message):
    fit(config, workdir)
  assert digests(workdir) == before
  # What may change: more steps, logging, checkpoint cadence, sampling, evaluation, the mesh.
  config = toy(STEPS + 2)
  config.train.log_every, config.train.checkpoint_every = 1, 3
  config.sample.steps, config.eval.every, config.mesh.fsdp = 7, 2, 1
  assert checkpoint.check_resume(workdir, config) == STEPS
  assert checkpoint.config_hash(config) == checkpoint.config_hash(toy(STEPS))


def test_steps_are_fixed_under_a_decaying_schedule():
  from grasp_jax.trainer import checkpoint
  a, b = toy(STEPS), toy(STEPS + 2)
  assert checkpoint.config_hash(a) == checkpoint.config_hash(b)
  a.optim.schedule = b.optim.schedule = "cosine"
  assert checkpoint.config_hash(a) != checkpoint.config_hash(b)


def test_unreadable_checkpoint_then_resume_from_an_earlier_step(trained, tmp_path):
  import jax
  import numpy as np
  from grasp_jax.trainer import checkpoint
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  broken = glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "d", "*"))
  assert broken
  for path in broken:
    os.truncate(path, 10)
  with pytest.raises(checkpoint.UnreadableCheckpointError) as e:
    fit(toy(STEPS), workdir)
  message = str(e.value)
  named = re.match(rf"checkpoint step 4 in {workdir}/checkpoints is unreadable: (\S+) "
                   r"\(ValueError: Requested byte range", message)
  assert named and named.group(1) in broken, message
  on_disk = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))
  assert on_disk[-2:] == [2, 4]  # orbax also keeps the first step.
  assert message.endswith("resume from an earlier step with --config.train.resume_from=2 "
                          f"(steps on disk: {on_disk}); the later ones are moved to "
                          "checkpoints_set_aside/")
  assert "\n" not in message and len(message) < 600

  config = toy(STEPS)
  config.train.resume_from = 2
  set_aside = digests(os.path.join(workdir, "checkpoints", "4"))
  resumed = fit(config, workdir)
  assert int(resumed.state.step) == STEPS
  jax.tree.map(np.testing.assert_array_equal, trained[1], jax.device_get(resumed.state.params))
  assert digests(os.path.join(workdir, "checkpoints_set_aside", "4")) == set_aside
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))) == on_disk


def test_resume_from_a_missing_step_names_the_steps(trained):
  from grasp_jax.trainer import checkpoint
  config = toy(STEPS)
  config.train.resume_from = 3
  with pytest.raises(ValueError, match=r"config.train.resume_from=3: no such checkpoint in "
                                       r".*; steps there: \[1, 2, 4\]"):
    checkpoint.check_resume(trained[0], config)


# ---------------------------------------------------------------------------------------------
# kill -9 during an asynchronous save.

def test_kill_during_async_save_then_resume(tmp_path):
  workdir = str(tmp_path / "run")
  ckpt = os.path.join(workdir, "checkpoints")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  run = subprocess.Popen([sys.executable, os.path.abspath(__file__), workdir], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
      names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
      done = [int(n) for n in names if n.isdigit()]
      if len(done) >= 2 and any("tmp" in n for n in names):
        os.kill(run.pid, signal.SIGKILL)  # While orbax writes the next step in the background.
        break
      time.sleep(0.002)
  finally:
    if run.poll() is None:
      run.kill()
    run.wait()
  assert run.returncode == -signal.SIGKILL, run.stderr.read().decode()[-2000:]
  names = os.listdir(ckpt)
  assert any("tmp" in n for n in names), names  # Killed mid-save.
  done = sorted(int(n) for n in names if n.isdigit())
  written = {s: digests(os.path.join(ckpt, str(s))) for s in done}

  with lock.hold(workdir):  # kill -9 leaves no stale lock.
    resumed = fit(toy(done[-1] + 2), workdir)
  assert int(resumed.state.step) == done[-1] + 2
  names = os.listdir(ckpt)
  assert not any("tmp" in n for n in names), names
  for s in done:  # Every step saved before the kill is still there, byte for byte.
    assert digests(os.path.join(ckpt, str(s))) == written[s]
  assert str(done[-1] + 2) in names


def _killed_run(workdir):
  """Trains the toy with a checkpoint every step until killed."""
  import jax
  jax.config.update("jax_platforms", "cpu")
  config = toy(100000)
  config.train.checkpoint_every, config.train.keep_checkpoints = 1, 100000
  with lock.hold(workdir):
    fit(config, workdir)


if __name__ == "__main__":
  _killed_run(sys.argv[1])
