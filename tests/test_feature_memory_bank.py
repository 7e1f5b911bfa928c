"""Memory bank: vectorised EMA and reservoir updates vs the sequential per-feature algorithm."""
import jax
import numpy as np
import pytest

from grasp_jax.feature_ddpm import memory_bank

C, D, K, A = 3, 4, 5, 0.3


def sequential(batches, momentum, capacity):
  """Reference: one feature at a time, exactly as the algorithm is written down."""
  protos = np.zeros((C, D))
  samples = np.zeros((C, capacity, D))
  seen = np.zeros(C, int)
  for feats, labels, u in batches:
    for f, c, ui in zip(feats, labels, u):
      seen[c] += 1
      n = seen[c]
      protos[c] = f if n == 1 else (1 - momentum) * protos[c] + momentum * f
      if n <= capacity:
        samples[c, n - 1] = f
      else:
        j = int(np.floor(np.float32(ui) * np.float32(n)))
        if j < capacity:
          samples[c, j] = f
  return protos, samples, seen


@pytest.fixture(scope="module")
def update():
  return jax.jit(memory_bank.update)


def test_matches_sequential_loop(update):
  rng = np.random.default_rng(0)
  bank = memory_bank.create(C, D, K, momentum=A)
  batches = []
  for i in range(6):  # Batches of 9 with repeated classes: collisions within a batch happen.
    feats = rng.normal(size=(9, D)).astype(np.float32)
    labels = rng.choice(C, 9, p=[0.6, 0.3, 0.1]).astype(np.int32)
    key = jax.random.PRNGKey(i)
    batches.append((feats, labels, np.asarray(jax.random.uniform(key, (9,)))))
    bank = update(bank, feats, labels, key)
  protos, samples, seen = sequential(batches, A, K)
  np.testing.assert_array_equal(np.asarray(bank.seen), seen)
  np.testing.assert_allclose(np.asarray(bank.prototypes), protos, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(bank.samples), samples.astype(np.float32))
  assert seen[0] > K  # The reservoir of the frequent class really overflowed.


def test_contents_bounded():
  bank = memory_bank.create(C, D, K, momentum=A)
  labels = np.array([0] * 20 + [1] * 3, np.int32)
  feats = np.arange(23 * D, dtype=np.float32).reshape(23, D)
  bank = memory_bank.fill(bank, feats, labels, batch_size=8)
  got, got_labels = memory_bank.contents(bank)
  np.testing.assert_array_equal(np.bincount(got_labels, minlength=C), [K, 3, 0])
  # Every stored row is one of the class's own features.
  for f, c in zip(got, got_labels):
    assert any(np.array_equal(f, g) for g in feats[labels == c])


def test_reservoir_is_uniform():
  """Each of N streamed items ends in the reservoir with probability K/N."""
  n_items, batch, runs = 40, 8, 2000
  feats = np.tile(np.arange(n_items, dtype=np.float32)[:, None], (1, D))
  labels = np.zeros(n_items, np.int32)

  def one_run(key):
    bank = memory_bank.create(C, D, K)
    for i in range(0, n_items, batch):
      bank = memory_bank.update(bank, feats[i:i + batch], labels[i:i + batch],
                                jax.random.fold_in(key, i))
    return bank.samples[0, :, 0]

  kept = jax.jit(jax.vmap(one_run))(jax.random.split(jax.random.PRNGKey(0), runs))
  kept = np.asarray(kept).astype(int)
  assert all(len(set(row)) == K for row in kept)  # No duplicates, always full.
  freq = np.bincount(kept.ravel(), minlength=n_items) / runs
  # Binomial std of each frequency: sqrt(p(1-p)/runs) ~ 0.008; allow ~6 sigma.
  np.testing.assert_allclose(freq, K / n_items, atol=0.05)
  # The late items must not be favoured over the early ones (mean order statistic ~ (N-1)/2).
  assert abs(np.mean(kept) - (n_items - 1) / 2) < 0.5


def test_bad_input():
  with pytest.raises(ValueError, match="momentum"):
    memory_bank.create(C, D, K, momentum=0.0)
  bank = memory_bank.create(C, D, K)
  with pytest.raises(ValueError, match="labels must lie"):
    memory_bank.fill(bank, np.zeros((2, D)), np.array([0, C]))
  with pytest.raises(ValueError, match="dim"):
    memory_bank.fill(bank, np.zeros((2, D + 1)), np.array([0, 1]))
