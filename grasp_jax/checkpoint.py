"""orbax checkpoints: train state, data-iterator state, config, partition table, base-weights hash.

Saving is asynchronous and atomic (orbax writes to a temporary directory and renames it), so an
interrupted save never corrupts the previous checkpoint. Restoring onto abstract arrays that
carry shardings lets a checkpoint written on one mesh continue on another.
"""
import hashlib
import os

import grain
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config", "partition", "base")


def manager(directory, *, save_every, keep, async_save=True):
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                         enable_async_checkpointing=async_save, create=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "partition": ocp.JsonCheckpointHandler(),
              "base": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_names=ITEMS, item_handlers=handlers,
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
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                            data=grain.checkpoint.CheckpointRestore(data_iter),
                            base=ocp.args.JsonRestore(), partition=ocp.args.JsonRestore())
  out = mngr.restore(step, args=args)
  return out.state, out.base["sha256"], out.partition


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
