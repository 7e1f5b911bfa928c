"""The frozen evaluator of a dataset: one small CNN trained once on real images that neither the
generator nor the generative evaluation sees. Its penultimate features are the space of FD, KID,
precision/recall/density/coverage, IRS and memorisation; its predictions give the conditional
accuracy of samples.

Roles of the evaluation split's records (`roles`): each class's records are permuted with
`split_seed` (a property of the dataset, not of a run); the first min(heldout_per_class,
n_c // 2) form the class's held-out pool, the rest train the evaluator (with every record of
any further split the caller names that the generator never trains on; class-balanced batches).
The caller takes the reference images, then the real twin (the floor), from the start of the
pool, and the downstream classifier's validation and test images from the evaluator's part: so
the evaluator is scored on images it never saw, the reference and the twin are disjoint, and
the downstream test set is disjoint from the reference.

Cache: CACHE/domain_classifier/<key>.msgpack and <key>.json, key = sha256 of `spec` (dataset,
resolution, the roles, architecture and training budget; not a run's seed), so every run and
seed of a study is measured with the same yardstick. The .json records the spec and the
evaluator's accuracy on the whole held-out pool, the number compared to the configured floor.
An evaluator absent from CACHE is looked up in the package (`SHIPPED`, the same layout) before
it is trained: the embedded data's evaluators ship, so the demo and the study do not spend CPU
minutes training them and every machine measures with the same weights.
"""
import hashlib
import json
import os
import time

from absl import logging
import flax.serialization
import jax
import numpy as np

from grasp_jax import files
from grasp_jax.evaluation import classifier
from grasp_jax.evaluation import networks

FEATURES = "evaluator_cnn_penultimate"
_LOADED = {}  # cache file -> (Classifier, record): evaluations of one process share them


def roles(labels, heldout_per_class, seed):
  """{"heldout": {class: record indices}, "evaluator": {class: record indices}} of one split
  (labels [N]), each class's indices in its seeded permuted order (module docstring)."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  out = {"heldout": {}, "evaluator": {}}
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    n = min(int(heldout_per_class), len(members) // 2)
    out["heldout"][int(c)], out["evaluator"][int(c)] = members[:n], members[n:]
  return out


def indices_sha1(indices):
  """sha1 of {class: indices}: what a spec records of a role."""
  h = hashlib.sha1()
  for c in sorted(indices):
    h.update(f"{c}:".encode() + np.asarray(indices[c], np.int64).tobytes())
  return h.hexdigest()


def model(spec):
  arch = spec["arch"]  # "hidden" is in the spec only when nonzero: older keys stay valid.
  return networks.CNN(num_classes=spec["classes"], widths=tuple(arch["widths"]),
                      convs=arch["convs"], hidden=arch.get("hidden", 0))


def key(spec):
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# Low-level changes a generator's samples often carry (uint8 scale): how much of "conditional
# accuracy" is class identity and how much is matching the real images' brightness and texture.
PERTURBATIONS = ("brightness+40", "noise_sd20", "blocks4x4")


def perturb(images, name, seed=0):
  """uint8 images [N, H, W, C] under one of PERTURBATIONS: +40 grey levels; Gaussian noise of
  sd 20 (seeded); every 4x4 block replaced by its mean (a patch-4 model's blockiness)."""
  x = images.astype(np.float32)
  if name == "brightness+40":
    x = x + 40
  elif name == "noise_sd20":
    x = x + np.random.default_rng(seed).normal(0, 20, x.shape)
  elif name == "blocks4x4":
    n, h, w, c = x.shape
    x = np.repeat(np.repeat(x.reshape(n, h // 4, 4, w // 4, 4, c).mean((2, 4)), 4, 1), 4, 2)
  else:
    raise ValueError(f"unknown perturbation {name!r}; known: {PERTURBATIONS}")
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def robustness(clf, images, labels):
  """{"none" and each of PERTURBATIONS: the evaluator's accuracy on `images`}."""
  out = {"none": float(np.mean(clf.predict(images) == labels))}
  for name in PERTURBATIONS:
    out[name] = float(np.mean(clf.predict(perturb(images, name)) == labels))
  return out


# The package's caches of the embedded data: SHIPPED/domain_classifier/<key>.* (evaluators) and
# SHIPPED/downstream_real/<key>.json (grasp_jax.run.evaluate.downstream_block).
SHIPPED = os.path.dirname(os.path.abspath(__file__))


def cache_path(cache_dir, spec):
  return os.path.join(cache_dir, "domain_classifier", f"{key(spec)}.msgpack")


def _appearance(a):
  """The spec's {"brightness", "noise", "blocks"} -> classifier.train's `appearance`."""
  return (a["brightness"], a["noise"], a["blocks"]) if any(a.values()) else None


def train(spec, images, labels):
  """The evaluator of `spec` trained on uint8 images [N, H, W, C] and labels [N]."""
  t = spec["train"]
  return classifier.train(model(spec), images, labels, steps=t["steps"],
                          batch_size=t["batch_size"], learning_rate=t["learning_rate"],
                          seed=t["seed"], flip=t["flip"], shift=t["shift"],
                          appearance=_appearance(t["appearance"]), balanced=t["balanced"], cosine=True,
                          weight_decay=t["weight_decay"], prefix="evaluator")


def load_or_train(cache_dir, spec, load_data):
  """(Classifier, record) of `spec`: from memory, from CACHE, or trained and cached.

  load_data: () -> (train images, train labels, held-out images, held-out labels), called only
  when training; the held-out pool gives the recorded accuracy. record: {"file",
  "weights_sha1", "features", "feature_dim", "accuracy" (held-out pool), "n_heldout",
  "n_train", "train_seconds", "spec"}.
  """
  path = cache_path(cache_dir, spec)
  if path in _LOADED:
    return _LOADED[path]
  if not os.path.exists(path) and os.path.exists(cache_path(SHIPPED, spec)):
    path = cache_path(SHIPPED, spec)
  meta = path.replace(".msgpack", ".json")
  if os.path.exists(path) and os.path.exists(meta):
    with open(path, "rb") as f:
      data = f.read()
    record = files.read_json(meta)
    clf = classifier.Classifier(model(spec), flax.serialization.msgpack_restore(data))
    logging.info("evaluator restored from %s", path)
  else:
    images, labels, heldout, heldout_y = load_data()
    start = time.perf_counter()
    clf = train(spec, images, labels)
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(clf.predict(heldout) == heldout_y))
    logging.info("evaluator trained in %.1f s: accuracy %.4f on %d held-out images", seconds,
                 accuracy, len(heldout_y))
    data = flax.serialization.msgpack_serialize(jax.device_get(clf.variables))
    record = {"accuracy": accuracy, "n_heldout": int(len(heldout_y)),
              "n_train": int(len(labels)), "train_seconds": round(seconds, 1), "spec": spec}
    if jax.process_index() == 0:
      files.write_bytes(path, data)
      files.write_json(meta, record)
  record = {**record, "file": path, "weights_sha1": hashlib.sha1(data).hexdigest(),
            "features": FEATURES, "feature_dim": clf.feature_dim}
  _LOADED[path] = (clf, record)
  return clf, record
