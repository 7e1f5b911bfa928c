"""Cost-sensitive losses (CSL) for long-tailed classification, and confidence-adaptive weights.

Every loss has the signature of grasp_jax.evaluation.classifier.cross_entropy,
`(logits [B, C], labels [B], weights [B], step) -> sum_i w_i l_i / sum_i w_i` with
w_i = gamma_{y_i}(step) * weights_i: gamma is the CSL's class weight and `weights` the
per-sample confidence (1 for real samples, conf in [0, 1] for synthetic ones), so
gamma_c^adaptive = gamma_c^CSL * conf.

  ce         plain softmax cross-entropy, gamma = 1.
  cb         class-balanced (Cui et al. 2019): gamma_c = (1 - beta) / (1 - beta^n_c), normalised
             to sum to C; beta = 0.9999.
  ldam_drw   LDAM (Cao et al. 2019): CE(s * (z - m_y e_y), y), margins m_c = K / n_c^(1/4) with
             max_c m_c = max_m (0.5), s = 30, on cosine logits z (a normalised linear head,
             NORMED_LOSSES); deferred re-weighting: gamma = 1 before `drw_step`, CB weights after.
  logit_adj  logit-adjusted loss (Menon et al. 2021): CE(z + tau log pi, y), pi the class prior
             (tau = 1); predictions use the unadjusted logits.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("ce", "cb", "ldam_drw", "logit_adj")
NORMED_LOSSES = ("ldam_drw",)  # Losses defined on cosine logits (use a normalised head).
CONFIDENCES = ("none", "cosine", "entropy")


def _counts(counts):
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or not len(counts) or (counts <= 0).any():
    raise ValueError(f"class counts must be a 1-d list of positive numbers, got {counts.tolist()}")
  return counts


def class_balanced_weights(counts, beta: float = 0.9999) -> np.ndarray:
  """(1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
  counts = _counts(counts)
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"class-balanced beta={beta} must lie in [0, 1)")
  w = (1.0 - beta) / (1.0 - np.power(beta, counts))
  return w / w.sum() * len(counts)


def ldam_margins(counts, max_m: float = 0.5) -> np.ndarray:
  """LDAM margins n_c^(-1/4), scaled so the largest is `max_m`."""
  m = 1.0 / np.power(_counts(counts), 0.25)
  return m * (max_m / m.max())


def log_prior(counts) -> np.ndarray:
  """log(n_c / sum n)."""
  counts = _counts(counts)
  return np.log(counts / counts.sum())


def cosine_confidence(features, labels, prototypes, center=None) -> np.ndarray:
  """max(0, cos(f - center, M_y - center)): agreement of a feature with its class prototype.

  `center` (e.g. the mean real feature) matters for non-negative (post-ReLU) features, whose raw
  cosines are all close to 1.
  """
  f = np.asarray(features, np.float64)
  p = np.asarray(prototypes, np.float64)[np.asarray(labels)]
  if center is not None:
    f, p = f - center, p - center
  cos = np.sum(f * p, -1) / np.maximum(np.linalg.norm(f, axis=-1) * np.linalg.norm(p, axis=-1),
                                        1e-12)
  return np.clip(cos, 0.0, 1.0)


def entropy_confidence(logits) -> np.ndarray:
  """1 - H(softmax(z)) / log C: 1 for a one-hot prediction, 0 for a uniform one."""
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.sum(np.exp(logp), -1, keepdims=True))
  entropy = -np.sum(np.exp(logp) * logp, -1)
  return 1.0 - entropy / np.log(logits.shape[-1])


def class_weights(kind: str, counts, step, *, beta: float = 0.9999, drw_step: int = 0):
  """gamma_c^CSL at `step` (a jnp array [C]; `step` may be traced)."""
  num = len(_counts(counts))
  if kind == "cb":
    return jnp.asarray(class_balanced_weights(counts, beta), jnp.float32)
  if kind == "ldam_drw":
    cb = jnp.asarray(class_balanced_weights(counts, beta), jnp.float32)
    return jnp.where(jnp.asarray(step) >= drw_step, cb, jnp.ones((num,), jnp.float32))
  if kind in ("ce", "logit_adj"):
    return jnp.ones((num,), jnp.float32)
  raise ValueError(f"unknown loss {kind!r}; known: {LOSSES}")


def make_loss(kind: str, counts, *, beta: float = 0.9999, max_m: float = 0.5, s: float = 30.0,
              drw_step: int = 0, tau: float = 1.0):
  """The loss `(logits, labels, weights, step) -> scalar` of the CSL `kind` (see module doc)."""
  if kind not in LOSSES:
    raise ValueError(f"unknown loss {kind!r}; known: {LOSSES}")
  margins = jnp.asarray(ldam_margins(counts, max_m), jnp.float32)
  prior = jnp.asarray(log_prior(counts), jnp.float32)

  def loss(logits, labels, weights, step):
    if kind == "ldam_drw":
      onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
      logits = s * (logits - onehot * margins[labels][:, None])
    elif kind == "logit_adj":
      logits = logits + tau * prior
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = class_weights(kind, counts, step, beta=beta, drw_step=drw_step)[labels] * weights
    return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1e-12)

  return loss
