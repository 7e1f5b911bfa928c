"""Training and scoring image classifiers (the networks of grasp_jax.evaluation.networks).

GRASP's downstream check trains a DenseNet on real and/or synthetic images and reports macro-F1,
balanced accuracy, per-class F1 and how many classes get a nonzero F1; the frozen evaluator and
the feature-level method's encoder are trained here too. This module holds the predictor
(`Classifier`: batched, jitted inference, `features` the penultimate pooled features), the
training loop (`train`, its loss and minibatches) and the classification metrics (`train`'s
early stopping uses them).

  model = networks.densenet(num_classes=10, **networks.TINY)
  clf = classifier.train(model, images, labels, steps=500)         # images [N,H,W,C] in [-1, 1]
  metrics = classifier.classification_metrics(test_labels, clf.predict(test_images), 10, groups)

Images are float in [-1, 1] (uint8 arrays are rescaled on the way in).
"""
import functools
from typing import Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grasp_jax.evaluation import augment
from grasp_jax.evaluation import networks


def cross_entropy(logits, labels, weights, step):
  """Weighted mean softmax cross-entropy, sum_i w_i l_i / sum_i w_i (torch's weighted mean).

  The common loss signature `(logits [B, C], labels [B], weights [B], step) -> scalar` is shared
  with grasp_jax.feature_ddpm.losses so any cost-sensitive loss can train this classifier.
  """
  del step
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-12)


@functools.lru_cache(maxsize=16)
def _forward(model):
  """One jitted inference function per (hashable) model: equal models share compilations."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))


class Classifier:
  """A trained network: batched, jitted inference on numpy arrays. `history` holds what `train`
  recorded (steps run, early-stopping curve)."""

  def __init__(self, model, variables, history=None):
    self.model = model
    self.variables = variables
    self.history = history or {}
    self._forward = _forward(model)

  def _run(self, images, batch_size):
    images = networks.to_model_input(images)
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      n = len(chunk)
      if n < batch_size:  # Pad: one compiled shape whatever the number of images.
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      lo, fe = self._forward(self.variables, chunk)
      logits.append(np.asarray(lo)[:n])
      feats.append(np.asarray(fe)[:n])
    if not logits:
      return (np.zeros((0, self.model.num_classes), np.float32),
              np.zeros((0, self.feature_dim), np.float32))
    return np.concatenate(logits), np.concatenate(feats)

  @property
  def feature_dim(self) -> int:
    return self.variables["params"]["head"]["kernel"].shape[0]

  def logits(self, images, batch_size=256) -> np.ndarray:
    return self._run(images, batch_size)[0]

  def features(self, images, batch_size=256) -> np.ndarray:
    """Penultimate pooled features [N, F] (the domain features / the encoder phi)."""
    return self._run(images, batch_size)[1]

  def predict(self, images, batch_size=256) -> np.ndarray:
    return np.argmax(self.logits(images, batch_size), axis=-1)

  def head_logits(self, features) -> np.ndarray:
    """The final linear layer applied to given features [N, F] (e.g. synthetic ones)."""
    head = self.variables["params"]["head"]
    return np.asarray(features, np.float32) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])


class _Batches:
  """Row indices of minibatches: real rows uniformly (or class-balanced: a uniform class, then a
  uniform image of it), then round(batch_size * extra_fraction) rows of the extra source."""

  def __init__(self, seed, real_labels, num_extra, batch_size, extra_fraction, balanced):
    self.rng = np.random.default_rng(seed)
    self.num_real, self.num_extra = len(real_labels), num_extra
    self.n_extra = int(round(batch_size * extra_fraction)) if num_extra else 0
    self.n_real = batch_size - self.n_extra
    self.members = [np.flatnonzero(real_labels == c) for c in np.unique(real_labels)] \
        if balanced else None

  def __call__(self):
    if self.members is None:
      real = self.rng.integers(0, self.num_real, self.n_real)
    else:
      classes = self.rng.integers(0, len(self.members), self.n_real)
      real = np.array([self.members[c][self.rng.integers(len(self.members[c]))] for c in classes],
                      np.int64)
    if not self.n_extra:
      return real
    return np.concatenate([real, self.num_real + self.rng.integers(0, self.num_extra,
                                                                   self.n_extra)])


@functools.lru_cache(maxsize=8)
def _step_fn(model, learning_rate, cosine_steps, weight_decay, loss_fn, flip, shift, appearance):
  """(jitted init, jitted train step, optimizer): cached, so classifiers of one kind compile
  once (batches are gathered on the host, so the data set's size is not part of the compiled
  shape; a jitted init is one compilation instead of one per eager op)."""
  rate = optax.cosine_decay_schedule(learning_rate, cosine_steps) if cosine_steps else \
      learning_rate
  tx = optax.adamw(rate, weight_decay=weight_decay) if weight_decay else optax.adam(rate)

  @jax.jit
  def step_fn(params, batch_stats, opt_state, x, y, step, flip_key):
    key = jax.random.fold_in(flip_key, step)
    if flip:
      mirror = jax.random.bernoulli(key, 0.5, (x.shape[0],))
      x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1], x)
    if shift:
      x = augment.shift(x, jax.random.fold_in(key, 1), shift)
    if appearance:
      x = augment.random_appearance(x, jax.random.fold_in(key, 2), appearance)

    def loss(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
      return loss_fn(logits, y, jnp.ones(y.shape, jnp.float32), step), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grads_, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, grads_), updates["batch_stats"], opt_state, value
  return jax.jit(lambda k, x: model.init(k, x, train=False)), step_fn, tx


def train(model, images, labels, *, steps: int, batch_size: int = 64,
          learning_rate: float = 1e-3, seed: int = 0,
          loss_fn: Callable = cross_entropy, extra=None, extra_fraction: float = 0.5,
          flip: bool = True, shift: int = 0, appearance=None, balanced: bool = False,
          cosine: bool = False,
          weight_decay: float = 0.0, validation=None, validate_every: int = 0,
          patience: int = 0, log_every: int = 0, writer=None, prefix: str = "classifier"
          ) -> Classifier:
  """Trains `model` (DenseNet or CNN) with Adam on numpy arrays; deterministic given `seed`.

  images: [N, H, W, C] float in [-1, 1] (or uint8); labels: int [N].
  loss_fn: `(logits, labels, weights, step) -> scalar` (cross-entropy by default; any loss of
    grasp_jax.feature_ddpm.losses).
  extra: an optional second source `(images, labels)` (e.g. GRASP-generated images); every
    minibatch then holds round(batch_size * extra_fraction) of its samples.
  flip, shift: random horizontal flips; random translations by up to `shift` pixels.
  appearance: None or (brightness, noise, block sizes): half of each batch under one random
    low-level change (`augment.random_appearance`), so that predictions rest on shape more than on
    brightness, grain or blockiness, which generators' samples often get wrong.
  balanced: draw the (real) rows class-balanced instead of uniformly.
  cosine: cosine decay of the learning rate to 0 over `steps`; weight_decay: AdamW's.
  validation: `(images, labels)`: every `validate_every` steps the macro-F1 on them is measured
    and the best variables are returned (early stopping); training stops after `patience`
    measurements without improvement (0: runs all steps).
  writer: a CLU metric writer for the training loss every `log_every` steps (`prefix/loss`).
  """
  images = networks.to_model_input(images)
  labels = np.asarray(labels, np.int32)
  if len(images) != len(labels) or not len(images):
    raise ValueError(f"{len(images)} images and {len(labels)} labels: need equal, nonzero counts")
  real_labels = labels
  num_extra = 0
  if extra is not None:
    extra_images, extra_labels = networks.to_model_input(extra[0]), np.asarray(extra[1], np.int32)
    if len(extra_images) != len(extra_labels):
      raise ValueError(f"extra source: {len(extra_images)} images, {len(extra_labels)} labels")
    if extra_images.shape[1:] != images.shape[1:]:
      raise ValueError(f"extra images have shape {extra_images.shape[1:]}, real ones "
                       f"{images.shape[1:]}")
    if not 0.0 <= extra_fraction <= 1.0:
      raise ValueError(f"extra_fraction={extra_fraction} must lie in [0, 1]")
    num_extra = len(extra_images)
    images = np.concatenate([images, extra_images])
    labels = np.concatenate([labels, extra_labels])
  if labels.min() < 0 or labels.max() >= model.num_classes:
    raise ValueError(f"labels must lie in [0, {model.num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")
  if validation is not None and validate_every < 1:
    raise ValueError("validation needs validate_every >= 1")

  key = jax.random.PRNGKey(seed)
  init_key, flip_key = jax.random.split(key)
  if appearance:
    brightness, noise_sd, blocks = appearance
    appearance = (float(brightness), float(noise_sd), tuple(int(k) for k in blocks))
    if not any(appearance) or any(images.shape[1] % k or images.shape[2] % k for k in blocks):
      raise ValueError(f"appearance={appearance}: needs a change, and block sizes that divide "
                       f"the images' {images.shape[1]}x{images.shape[2]}")
  init_fn, step_fn, tx = _step_fn(model, learning_rate, steps if cosine else 0, weight_decay,
                                  loss_fn, flip, shift, appearance or None)
  variables = nn.unbox(init_fn(init_key, jnp.asarray(images[:1])))
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  batches = _Batches(seed, real_labels, num_extra, batch_size, extra_fraction, balanced)
  history = {"steps": steps, "val_macro_f1": []}
  best, waited = None, 0  # best: (macro-F1, step, variables)
  for step in range(steps):
    idx = batches()
    params, batch_stats, opt_state, value = step_fn(params, batch_stats, opt_state, images[idx],
                                                    labels[idx], step, flip_key)
    if log_every and (step + 1) % log_every == 0:
      value = float(value)
      logging.info("%s step %d/%d loss %.4f", prefix, step + 1, steps, value)
      if writer is not None:
        writer.write_scalars(step + 1, {f"{prefix}/loss": value})
    if validation is not None and ((step + 1) % validate_every == 0 or step + 1 == steps):
      current = {"params": params, "batch_stats": batch_stats}
      preds = Classifier(model, current).predict(validation[0])
      f1 = float(np.mean(per_class_f1(validation[1], preds, model.num_classes)[
          np.unique(validation[1])]))
      history["val_macro_f1"].append([step + 1, f1])
      if best is None or f1 > best[0]:
        best, waited = (f1, step + 1, current), 0
      else:
        waited += 1
        if patience and waited >= patience:
          break
  history["steps_run"] = step + 1 if steps else 0
  variables = {"params": params, "batch_stats": batch_stats}
  if best is not None:
    history["best_val_macro_f1"], history["best_step"], variables = best
  return Classifier(model, variables, history)


def per_class_f1(labels, preds, num_classes) -> np.ndarray:
  """F1 per class (0 where a class has neither true nor predicted samples, as scikit-learn)."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  tp = np.bincount(labels[labels == preds], minlength=num_classes).astype(np.float64)
  true = np.bincount(labels, minlength=num_classes).astype(np.float64)
  pred = np.bincount(preds, minlength=num_classes).astype(np.float64)
  denom = true + pred
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def classification_metrics(labels, preds, num_classes: int,
                           groups: Mapping[str, Sequence[int]] | None = None,
                           class_names: Sequence[str] | None = None) -> dict:
  """Accuracy, macro-F1, balanced accuracy, per-class F1 and nonzero-F1 count; per group too.

  A group's numbers are over the test samples of its classes: accuracy of those samples,
  macro-F1 and balanced accuracy (mean recall) over its classes, F1 being the global per-class
  F1 (predictions into other groups count as errors).
  """
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  if labels.shape != preds.shape or labels.ndim != 1 or not len(labels):
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} must be equal 1-d shapes")
  for name, y in (("labels", labels), ("preds", preds)):
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f"{name} must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  f1 = per_class_f1(labels, preds, num_classes)
  true = np.bincount(labels, minlength=num_classes)
  recall = np.bincount(labels[labels == preds], minlength=num_classes) / np.maximum(true, 1)
  present = true > 0
  out = {
      "num_samples": int(len(labels)),
      "accuracy": float(np.mean(labels == preds)),
      "macro_f1": float(np.mean(f1[present | (np.bincount(preds, minlength=num_classes) > 0)])),
      "balanced_accuracy": float(np.mean(recall[present])),
      "nonzero_f1_classes": int(np.sum(f1 > 0)),
      "per_class_f1": {n: float(v) for n, v in zip(names, f1)},
      "per_class_recall": {n: float(v) for n, v in zip(names, recall)},
  }
  out["groups"] = {}
  for group, members in (groups or {}).items():
    members = np.asarray(members, np.int64)
    mask = np.isin(labels, members)
    kept = members[present[members]]
    out["groups"][group] = {
        "num_classes": int(len(members)),
        "num_samples": int(mask.sum()),
        "accuracy": float(np.mean(labels[mask] == preds[mask])) if mask.any() else float("nan"),
        "macro_f1": float(np.mean(f1[members])) if len(members) else float("nan"),
        "balanced_accuracy": float(np.mean(recall[kept])) if len(kept) else float("nan"),
        "nonzero_f1_classes": int(np.sum(f1[members] > 0)),
    }
  return out
