"""orbax checkpoints: train state, data-iterator state, config, partition table, base-weights hash.

Saving is asynchronous and atomic (orbax writes to a temporary directory and renames it), so an
interrupted save never corrupts the previous checkpoint. Restoring onto abstract arrays that
carry shardings lets a checkpoint written on one mesh continue on another.
"""
import hashlib
import json
import os

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config", "partition", "base")


def manager(directory, *, save_every, keep, async_save=True):
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                         enable_async_checkpointing=async_save, create=True)
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
  """Restores the state onto `abstract_state`'s shardings and the iterator in place."""
  items = dict(state=ocp.args.StandardRestore(abstract_state), base=ocp.args.JsonRestore(),
               partition=ocp.args.JsonRestore())
  data_dir = os.path.join(str(mngr.directory), str(step), "data")
  # grain keeps one iterator state per process: process_<i>-of-<n>.json.
  own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if os.path.exists(os.path.join(data_dir, own)):
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
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


def folder_hash(path):
  """sha256 over a model folder's config and weight files: identifies the frozen base."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    if name.endswith((".json", ".safetensors")):
      h.update(name.encode())
      with open(os.path.join(path, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
          h.update(chunk)
  return h.hexdigest()
