"""One process of a multi-process toy training run (started by tests/test_distributed.py).

  python tests/multiprocess_toy.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz

Joins a CPU process group on 127.0.0.1:PORT (gloo collectives, 2 CPU devices per process),
trains the toy experiment of tests/test_train.py with FSDP rules over all processes' devices, each
process feeding its slice of every global batch, and writes the final trainable parameters
(gathered from all processes) to OUT.npz.
"""
import os
import sys

import grain
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import sharding as sharding_configs  # noqa: E402
import test_train  # noqa: E402

STEPS, CHECKPOINT_EVERY = 4, 2


class ShardedToy(test_train.ToyExperiment):
  """The toy experiment with each process reading its contiguous slice of every global batch."""

  def train_iterator(self):
    rng = np.random.default_rng(1)
    records = [{"x": rng.normal(size=(3, test_train.DIM)).astype(np.float32),
                "cluster_id": np.int32(rng.choice(self.clusters))} for _ in range(64)]
    n, p = jax.process_count(), jax.process_index()
    rows = slice(p * test_train.B // n, (p + 1) * test_train.B // n)
    ds = grain.MapDataset.source(records).shuffle(seed=3).repeat().batch(test_train.B)
    return iter(ds.map(lambda batch: {k: v[rows] for k, v in batch.items()}).to_iter_dataset())


def config():
  c = test_train.toy_config(STEPS, CHECKPOINT_EVERY, data=2, fsdp=-1)
  c.mesh.rules = sharding_configs.fsdp_rules()
  return c


def main(process_id, num_processes, port, workdir, out):
  from grasp_jax.parallel import distributed
  from grasp_jax.trainer import loop
  from jax.experimental import multihost_utils
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)
  distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  trainer = loop.fit(ShardedToy(config(), (0, 1, 2, 3)), config(), workdir)
  params = multihost_utils.process_allgather(trainer.state.params, tiled=True)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(out, step=int(trainer.state.step), num_devices=jax.device_count(), **flat)


if __name__ == "__main__":
  pid, count, port_, workdir_, out_ = sys.argv[1:]
  main(int(pid), int(count), int(port_), workdir_, out_)
