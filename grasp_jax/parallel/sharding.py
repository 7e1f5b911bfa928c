"""Device mesh from the config, and NamedShardings from the modules' logical axis names.

Every parameter carries logical names ('embed', 'mlp', 'conv_out', 'cluster', ...); the config's
`mesh.rules` map them to mesh axes. The same code runs on 1 CPU, 8 fake CPU devices, a GPU host,
a TPU pod slice or several hosts: only the mesh shape changes.
"""
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None):
  """A ('data', 'fsdp') mesh; a -1 size takes all devices the other axis leaves."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  sizes = [mesh_config.data, mesh_config.fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got data={sizes[0]}, "
                     f"fsdp={sizes[1]}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if devices.size % known:
    raise ValueError(f"config.mesh: data={sizes[0]} x fsdp={sizes[1]} does not divide "
                     f"{devices.size} devices")
  sizes = [devices.size // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"config.mesh: data={sizes[0]} x fsdp={sizes[1]} != {devices.size} devices")
  # Auto axes: XLA propagates shardings from the jit's in/out shardings (no sharding-in-types).
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices.tolist(),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules(mesh_config):
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_config.rules)


def logical_shardings(abstract_tree, mesh, mesh_config):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(mesh_config))


def mirror_shardings(tree, params, mesh):
  """Shardings for a tree whose leaves mirror parameters (optimizer moments, EMA, the params).

  A leaf takes the sharding of the parameter whose key path ends its own and whose shape it
  has (optax's mu/nu sit under their parameter's path); other leaves (step counts) are
  replicated. Without this, jit leaves `zeros_like(param)` state replicated on every device.
  """
  names = lambda kp: tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                           for k in kp)
  by_path = {names(kp): p for kp, p in jax.tree_util.tree_leaves_with_path(params)}
  lengths = sorted({len(k) for k in by_path}, reverse=True)

  def pick(kp, x):
    path = names(kp)
    for n in lengths:
      p = by_path.get(path[-n:])
      if p is not None and p.shape == x.shape:
        return p.sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh):
  """Leading (batch) axis over every mesh axis; the rest replicated."""
  return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def put_batch(batch, mesh):
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axis (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
