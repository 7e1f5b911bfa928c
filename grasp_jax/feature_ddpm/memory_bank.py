"""Per-class memory of encoder features: an EMA prototype and a bounded reservoir sample.

For every class c the bank keeps
  * the prototype M_c <- (1 - a) M_c + a f, applied once per feature in stream order (the first
    feature of a class initialises M_c, so prototypes carry no bias towards zero), and
  * a uniform sample of at most `capacity` of the class's features seen so far (reservoir
    sampling, Vitter's algorithm R): the n-th feature of a class fills slot n - 1 while the
    reservoir has room, afterwards it replaces slot j = floor(u n) when j < capacity.
`update` applies a whole minibatch at once with the exact result of the per-feature sequential
loop: EMA terms get the geometric weights of their position in the class's sub-stream, and of
several reservoir writes to one slot only the last survives. It is jit-able.
"""
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np


@struct.dataclass
class MemoryBank:
  prototypes: jax.Array  # [C, D] EMA prototypes (zeros for classes not seen yet).
  samples: jax.Array  # [C, capacity, D]; slots >= seen[c] are empty (zeros).
  seen: jax.Array  # [C] int32: features of each class seen so far.
  momentum: float = struct.field(pytree_node=False, default=0.1)

  @property
  def capacity(self) -> int:
    return self.samples.shape[1]


def create(num_classes: int, dim: int, capacity: int, momentum: float = 0.1) -> MemoryBank:
  """An empty bank for `num_classes` classes of `dim`-d features."""
  if num_classes < 1 or dim < 1 or capacity < 1:
    raise ValueError(f"memory bank needs num_classes, dim, capacity >= 1, got "
                     f"{num_classes}, {dim}, {capacity}")
  if not 0.0 < momentum <= 1.0:
    raise ValueError(f"memory bank momentum={momentum} must lie in (0, 1]")
  return MemoryBank(prototypes=jnp.zeros((num_classes, dim), jnp.float32),
                    samples=jnp.zeros((num_classes, capacity, dim), jnp.float32),
                    seen=jnp.zeros((num_classes,), jnp.int32), momentum=float(momentum))


def update(bank: MemoryBank, features, labels, key) -> MemoryBank:
  """Streams a minibatch (features [B, D], labels int [B], in order) into the bank.

  The reservoir's random numbers are `u = jax.random.uniform(key, [B])`, one per feature.
  """
  features = jnp.asarray(features, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  num_classes, capacity = bank.prototypes.shape[0], bank.capacity
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)  # [B, C]
  # Position of each feature in its class's sub-stream of this batch.
  rank = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1
  in_batch = jnp.sum(onehot, axis=0)  # [C]
  seen_before = bank.seen[labels]

  # EMA: M <- (1-a)^k M + sum_j a (1-a)^(k-1-j) f_j; a class's very first feature has weight
  # (1-a)^(k-1) (it *is* the starting prototype) and the old (zero) prototype weight 0.
  a = bank.momentum
  later = (in_batch[labels] - 1 - rank).astype(jnp.float32)
  first = (seen_before == 0) & (rank == 0)
  weight = jnp.where(first, 1.0, a) * (1.0 - a) ** later
  decay = jnp.where(bank.seen == 0, 0.0, (1.0 - a) ** in_batch.astype(jnp.float32))
  prototypes = (decay[:, None] * bank.prototypes
                + jnp.einsum("bc,b,bd->cd", onehot.astype(jnp.float32), weight, features))

  # Reservoir (algorithm R), vectorised: the n-th item of a class (1-based) goes to slot n-1
  # while n <= capacity, else to slot floor(u n) if that is < capacity.
  n = seen_before + rank + 1
  u = jax.random.uniform(key, labels.shape)
  j = jnp.floor(u * n.astype(jnp.float32)).astype(jnp.int32)
  slot = jnp.where(n <= capacity, n - 1, j)
  writes = slot < capacity
  # Sequential semantics: a write is overwritten by any *later* write to the same (class, slot).
  same = (labels[:, None] == labels[None, :]) & (slot[:, None] == slot[None, :])
  later_pair = jnp.arange(labels.shape[0])[None, :] > jnp.arange(labels.shape[0])[:, None]
  overwritten = jnp.any(same & later_pair & writes[None, :], axis=1)
  keep = writes & ~overwritten
  slot = jnp.where(keep, slot, capacity)  # Out of range: dropped by the scatter.
  samples = bank.samples.at[labels, slot].set(features, mode="drop")
  return bank.replace(prototypes=prototypes, samples=samples, seen=bank.seen + in_batch)


def fill(bank: MemoryBank, features, labels, *, batch_size: int = 256, seed: int = 0
         ) -> MemoryBank:
  """Streams a whole feature set (numpy, in a seeded random order) through `update`."""
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  if features.ndim != 2 or len(features) != len(labels):
    raise ValueError(f"features {features.shape} and labels {labels.shape} must be [N, D], [N]")
  if features.shape[1] != bank.prototypes.shape[1]:
    raise ValueError(f"features have dim {features.shape[1]}, bank {bank.prototypes.shape[1]}")
  if len(labels) and (labels.min() < 0 or labels.max() >= bank.prototypes.shape[0]):
    raise ValueError(f"labels must lie in [0, {bank.prototypes.shape[0]}), got "
                     f"[{labels.min()}, {labels.max()}]")
  order = np.random.default_rng(seed).permutation(len(labels))
  step = jax.jit(update)
  key = jax.random.PRNGKey(seed)
  for i in range(0, len(order), batch_size):
    idx = order[i:i + batch_size]
    # The short last batch runs eagerly rather than compiling a second shape.
    fn = step if len(idx) == batch_size else update
    bank = fn(bank, features[idx], labels[idx], jax.random.fold_in(key, i))
  return bank


def contents(bank: MemoryBank):
  """The reservoir's filled slots as numpy (features [M, D], labels [M])."""
  samples, seen = np.asarray(bank.samples), np.asarray(bank.seen)
  filled = np.minimum(seen, bank.capacity)
  feats = np.concatenate([samples[c, :k] for c, k in enumerate(filled)])
  labels = np.concatenate([np.full(k, c, np.int32) for c, k in enumerate(filled)])
  return feats, labels
