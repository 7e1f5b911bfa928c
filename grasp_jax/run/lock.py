"""One run per workdir: an advisory lock on WORKDIR/run.lock, held for the life of the run.

Two runs writing one workdir would resume each other's checkpoints and overwrite each other's
exports, samples and results. `hold(workdir)` takes an exclusive `flock` (released by the kernel
when the process ends, even on kill -9, so a crashed run never leaves a stale lock) and records
the holder's host, pid, start time and command line in the file; a second run fails at once
with them. Multi-process runs: process 0 holds the lock, the others check that it is held (so
the workdir is on a filesystem all processes share and locks work there).
"""
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from absl import logging

NAME = "run.lock"
# Filesystems without flock (some FUSE / object-store mounts): a warning, no lock.
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir."""


def _holder(path):
  try:
    with open(path) as f:
      h = json.load(f)
    return (f"pid {h['pid']} on {h['host']}, started {h['started']} "
            f"({' '.join(h['command'])})")
  except (OSError, ValueError, KeyError):
    return "a process that has not recorded itself yet"


def _try_lock(fd, path, mode):
  """True when locked; False when another process holds it; None when unsupported."""
  try:
    fcntl.flock(fd, mode | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno not in _UNSUPPORTED:
      raise
    logging.warning("%s: this filesystem has no file locks (%s); nothing stops a second run "
                    "on this workdir", path, e)
    return None


@contextlib.contextmanager
def hold(workdir, *, primary=True, sync=None):
  """Holds WORKDIR's lock for the `with` block; raises WorkdirInUseError if another run has it.

  Multi-process: every process enters with `primary` = (process index 0) and `sync` = a barrier
  of all processes; process 0 locks before the barrier, the others check after it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if primary:
      if _try_lock(fd, path, fcntl.LOCK_EX) is False:
        raise WorkdirInUseError(
            f"workdir {workdir} is in use by {_holder(path)}; wait for that run to finish, stop "
            f"it, or use another --workdir")
      info = dict(host=socket.gethostname(), pid=os.getpid(), command=sys.argv,
                  started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(info).encode(), 0)
    if sync is not None:
      sync()
    if not primary:
      check(workdir)
    yield path
  finally:
    os.close(fd)  # Releases the lock.


def check(workdir):
  """Raises unless some process holds WORKDIR's lock (the others of a multi-process run)."""
  path = os.path.join(workdir, NAME)
  if not os.path.exists(path):
    raise WorkdirInUseError(f"{path} does not exist: process 0 holds no lock on {workdir}; is "
                            "the workdir on a filesystem every process shares?")
  fd = os.open(path, os.O_RDONLY)
  try:
    if _try_lock(fd, path, fcntl.LOCK_SH):
      raise WorkdirInUseError(f"{path} is not held by process 0 of this run; is the workdir on "
                              "a filesystem every process shares?")
  finally:
    os.close(fd)
