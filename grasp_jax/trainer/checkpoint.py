"""orbax checkpoints: train state, data-iterator state, config, partition table, base-weights hash.

Saving is asynchronous and atomic (orbax writes to a temporary directory and renames it), so an
interrupted save never corrupts the previous checkpoint. Restoring onto abstract arrays that
carry shardings lets a checkpoint written on one mesh continue on another.

A checkpoint is resumed only under the config it was trained with, up to the fields listed in
MAY_CHANGE_ON_RESUME (`check_config`). An unreadable step is an error naming the step and the
file; `config.train.resume_from=N` then resumes from an earlier step, and the later steps are
moved to WORKDIR/checkpoints_set_aside/ (`set_aside_after`), never deleted.
"""
import hashlib
import json
import os
import re
import sys

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from grasp_jax import files
from grasp_jax.parallel import distributed

ITEMS = ("state", "data", "config", "partition", "base")
# Config fields that may differ between a checkpoint and the run resuming it (a name covers the
# fields under it): how long to train, how often to log / save / sample / evaluate, where inputs
# live (the base weights are checked by their hash), the mesh, recovery from a non-finite step,
# the memory knobs remat and grad_accum_steps (micro-batches of the same global batch: the same
# mean gradient per update, LR schedule and steps; only batch-coupled terms - CORAL's contrast
# set, MoE's load-balancing loss - see micro-batches), and everything after training. Every
# other field changes what is trained. Under a decaying learning-rate schedule, train.steps sets
# the schedule's length, so there it must match too.
MAY_CHANGE_ON_RESUME = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.sample_every", "train.diagnostics_every", "train.diagnostics_batches",
    "train.profile_steps", "train.resume_from", "train.nan_policy", "train.grad_accum_steps",
    "data.data_dir", "data.manual_dir", "model.pretrained", "model.remat", "text.cache", "mesh",
    "sample", "eval")
SET_ASIDE = "checkpoints_set_aside"  # WORKDIR/<this>/<step>: steps after a resume_from step.


class ConfigChangedError(ValueError):
  """The run's config differs from its checkpoint's in a field that changes what is trained."""


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint step cannot be read (truncated or missing files)."""


def manager(directory, *, save_every=1, keep=1, async_save=True, read_only=False):
  # A killed run's half-written step (a temporary directory) is removed when the next run starts.
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                         enable_async_checkpointing=async_save,
                                         create=not read_only, read_only=read_only,
                                         cleanup_tmp_directories=not read_only)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "partition": ocp.JsonCheckpointHandler(),
              "base": ocp.JsonCheckpointHandler()}
  # orbax's async save rejects relative paths (e.g. the README's --workdir=workdir/demo).
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS, item_handlers=handlers,
                               options=options)


def save(mngr, step, state, data_iter, config_json, partition_json, base_hash, *, force=False):
  """Queues a save of every item; returns whether orbax took it (save interval / force)."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config_json), partition=ocp.args.JsonSave(partition_json),
      base=ocp.args.JsonSave({"sha256": base_hash}))
  return mngr.save(step, args=args, force=force)


def restore(mngr, step, abstract_state, data_iter):
  """Restores the state onto `abstract_state`'s shardings and the iterator in place; returns
  (state, base sha256, partition table)."""
  items = dict(state=ocp.args.StandardRestore(abstract_state), base=ocp.args.JsonRestore(),
               partition=ocp.args.JsonRestore())
  data_dir = os.path.join(str(mngr.directory), str(step), "data")
  # grain keeps one iterator state per process: process_<i>-of-<n>.json.
  own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if os.path.exists(os.path.join(data_dir, own)):
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  sys.unraisablehook = _closed_loop_callbacks_are_quiet
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax / TensorStore: truncated, missing or corrupt files.
    raise _unreadable(mngr, step, e) from None
  if "data" not in items:
    _restore_data_on_new_process_count(data_dir, data_iter)
  return out.state, out.base["sha256"], out.partition


def _restore_data_on_new_process_count(data_dir, data_iter):
  """Written by another number of processes: carry the position over if all agreed on it.

  Every process's batch i is its slice of global batch i (data/pipeline.py), so one shared
  position continues the same global stream under any process count.
  """
  states = set()
  for name in os.listdir(data_dir):
    if name.startswith("process_") and name.endswith(".json"):
      with open(os.path.join(data_dir, name)) as f:
        states.add(json.dumps(json.load(f), sort_keys=True))
  if len(states) == 1:
    data_iter.set_state(json.loads(states.pop()))
    logging.info("data position carried over from %s (written by another process count)",
                 data_dir)
  else:
    logging.warning("%s holds differing data positions from another process count; the data "
                    "stream restarts from its beginning", data_dir)


# ---------------------------------------------------------------------------------------------
# Which step to resume, and under which config.

def resume_step(mngr, resume_from=0):
  """The step to start from: `resume_from` (> 0, must be on disk) or the newest; None if none."""
  steps = sorted(mngr.all_steps())
  if not resume_from:
    return steps[-1] if steps else None
  if resume_from not in steps:
    raise ValueError(f"config.train.resume_from={resume_from}: no such checkpoint in "
                     f"{mngr.directory}; steps there: {steps or 'none'}")
  return resume_from


def check_resume(workdir, config):
  """Before a run writes anything: the step it would start from (see `resume_step`) holds
  `config` up to MAY_CHANGE_ON_RESUME; returns that step (None: nothing to resume)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    if config.train.resume_from:
      raise ValueError(f"config.train.resume_from={config.train.resume_from}: no checkpoints "
                       f"in {workdir}")
    return None
  mngr = manager(directory, read_only=True)
  step = resume_step(mngr, config.train.resume_from)
  if step is not None:
    check_config(mngr, step, config)
  mngr.close()
  return step


def check_config(mngr, step, config):
  """Raises ConfigChangedError listing every field (checkpoint -> now) that may not change."""
  try:
    stored = json.loads(mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config)
  except Exception as e:
    raise _unreadable(mngr, step, e) from None
  now = json.loads(config.to_json_best_effort())
  old, new = _flat(stored), _flat(now)
  changed = sorted(n for n in set(old) | set(new)
                   if not _may_change(n, now) and old.get(n, _ABSENT) != new.get(n, _ABSENT))
  if changed:
    lines = "\n".join(f"  {n}: {_show(old.get(n, _ABSENT))} -> {_show(new.get(n, _ABSENT))}"
                      for n in changed)
    raise ConfigChangedError(
        f"{mngr.directory}/{step} was trained under another config; these fields differ "
        f"(checkpoint -> now):\n{lines}\nRerun with the checkpoint's values, or use a fresh "
        f"--workdir for the new config. Fields that may change on resume: "
        f"{', '.join(MAY_CHANGE_ON_RESUME)}.")


def config_hash(config):
  """16 hex digits of sha256 over what a run trains: every field outside MAY_CHANGE_ON_RESUME.

  Equal for every checkpoint of one workdir (check_config); results and exports carry it."""
  now = json.loads(config.to_json_best_effort())
  fixed = {n: v for n, v in _flat(now).items() if not _may_change(n, now)}
  return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def check_partition(stored, partition, where):
  """The checkpoint's class -> cluster table must be the run's (WORKDIR/partition.json)."""
  old = stored.get("class_to_cluster", {})
  new = files.jsonable(partition.to_json()["class_to_cluster"])
  if old != new:
    diff = sorted(set(old.items()) ^ set(new.items()))
    raise ValueError(f"{where} was trained with another class -> cluster table than "
                     f"partition.json (differing entries: {diff[:8]}); restore the run's "
                     "partition.json or use a fresh --workdir")


def set_aside_after(mngr, step):
  """Moves the steps after `step` to WORKDIR/checkpoints_set_aside/ (resume_from an earlier
  step: the run will write those steps again)."""
  later = [s for s in sorted(mngr.all_steps()) if s > step]
  if not later:
    return
  if distributed.is_primary():
    root = os.path.join(os.path.dirname(str(mngr.directory)), SET_ASIDE)
    os.makedirs(root, exist_ok=True)
    for s in later:
      dest, n = os.path.join(root, str(s)), 0
      while os.path.exists(dest):
        n += 1
        dest = os.path.join(root, f"{s}.{n}")
      os.replace(os.path.join(str(mngr.directory), str(s)), dest)
    logging.warning("resuming from step %d: the later steps %s are moved to %s (nothing is "
                    "deleted)", step, later, root)
  distributed.barrier("checkpoints_set_aside")
  mngr.reload()


_ABSENT = object()  # A field one of the two configs does not have.


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _may_change(name, config):
  if name == "train.steps" and config["optim"]["schedule"] != "constant":
    return False
  return any(name == f or name.startswith(f + ".") for f in MAY_CHANGE_ON_RESUME)


def _show(value):
  return "(absent)" if value is _ABSENT else json.dumps(value)


def _unreadable(mngr, step, error):
  """A short error naming the step, the file TensorStore could not read and the way on."""
  directory = str(mngr.directory)
  paths = re.findall(r'local file "([^"]+)"', str(error))
  where = paths[-1] if paths else os.path.join(directory, str(step))
  # TensorStore's message: context, the file, the cause, then a long spec; keep the cause.
  reason = str(error).split("[tensorstore_spec")[0].rsplit(f'"{where}"', 1)[-1]
  reason = (reason.strip(" :\n").splitlines() or [""])[0][-300:]
  earlier = [s for s in sorted(mngr.all_steps()) if s < step]
  way_on = (f"resume from an earlier step with --config.train.resume_from={earlier[-1]} "
            f"(steps on disk: {sorted(mngr.all_steps())}); the later ones are moved to "
            f"{SET_ASIDE}/" if earlier else
            "no earlier step is on disk: train again in a fresh --workdir")
  return UnreadableCheckpointError(
      f"checkpoint step {step} in {directory} is unreadable: {where} ({type(error).__name__}: "
      f"{reason}); {way_on}")


def _closed_loop_callbacks_are_quiet(unraisable, default=sys.unraisablehook):
  """After a failed restore, TensorStore's pending reads call back into orbax's closed event
  loop; each would print a 'RuntimeError: Event loop is closed' traceback around the error."""
  if not (isinstance(unraisable.exc_value, RuntimeError) and
          str(unraisable.exc_value) == "Event loop is closed"):
    default(unraisable)
