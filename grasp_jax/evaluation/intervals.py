"""Percentile-bootstrap intervals, paired run-vs-run verdicts and the real-vs-real floor.

`metric_fn` is any callable on arrays returning a float: `metrics.fid`, `lambda r, f:
metrics.prdc(r, f)["coverage"]`, or a closure over data that is not a sample and must not be
resampled, e.g. `lambda s: metrics.memorization_rate(train, test, s)["rate"]`.

Data layout:
* `arrays`: a sequence of items, each an array [N, ...] whose rows are resampled on their own, or
  a tuple of arrays of one N resampled with shared row indices (a paired group). `metric_fn`
  gets the arrays in order, groups flattened: `((a, b), c)` -> `metric_fn(a, b, c)`.
* `strata`: None, or one entry per item: None or labels [N]. Rows are then resampled within each
  label, so the counts the experiment fixed (e.g. samples per class) stay fixed.
* Seeds: `over_seeds` takes one `arrays` per seed (independent replicates of a run, e.g. training
  or sampling seeds) and reports the mean over seeds of the per-seed metric; `paired_difference`
  takes per-seed lists for runs sampled with matched seeds.

Resampling with replacement duplicates rows, which biases metrics built on nearest neighbours
(k-NN radii in `metrics.prdc`; collisions in `metrics.irs`, whose own likelihood interval is the
one to use for one sample set). For those, resample whole seeds only (`within=False`).
"""
import numpy as np


def verdict(lo, hi, higher_is_better):
  """'better' / 'worse' when the interval [lo, hi] of (a - b) excludes 0 in a's favour / against
  it, with the metric's direction; 'inconclusive' otherwise (and for NaN)."""
  if lo > 0:
    return "better" if higher_is_better else "worse"
  if hi < 0:
    return "worse" if higher_is_better else "better"
  return "inconclusive"


def _items(arrays, strata):
  """[(arrays of the item, cells)]: cells are the row-index sets resampled within."""
  strata = [None] * len(arrays) if strata is None else list(strata)
  if len(strata) != len(arrays):
    raise ValueError(f"strata has {len(strata)} entries for {len(arrays)} items")
  items = []
  for i, (item, labels) in enumerate(zip(arrays, strata)):
    group = tuple(map(np.asarray, item if isinstance(item, (tuple, list)) else (item,)))
    n = len(group[0])
    if not n or any(len(x) != n for x in group):
      raise ValueError(f"item {i}: paired arrays need one N >= 1, got {[len(x) for x in group]}")
    if labels is None:
      cells = [np.arange(n)]
    else:
      labels = np.asarray(labels)
      if labels.shape != (n,):
        raise ValueError(f"item {i}: strata labels have shape {labels.shape}; expected ({n},)")
      cells = [np.flatnonzero(labels == v) for v in np.unique(labels)]
    items.append((group, cells))
  return items


def _full(items):
  return [x for group, _ in items for x in group]


def _resample(items, rng):
  """Rows drawn with replacement within each cell; one index vector per paired group."""
  out = []
  for group, cells in items:
    index = np.empty(len(group[0]), np.int64)
    for cell in cells:
      index[cell] = cell[rng.integers(0, len(cell), len(cell))]
    out.extend(x[index] for x in group)
  return out


def over_seeds(metric_fn, arrays_per_seed, *, n_boot=200, seed=0, level=0.95, strata=None,
               within=True):
  """Mean over seeds of `metric_fn(*arrays)` with a two-stage percentile-bootstrap interval.

  Each of `n_boot` replicates draws the seeds with replacement, then (`within=True`) the rows of
  each drawn seed as in `bootstrap`, and averages the per-seed metrics; the interval is the
  (1 - level) / 2 and (1 + level) / 2 percentiles of the replicates. Resampling both stages
  counts the within-seed noise twice, so the interval is conservative; with many seeds
  `within=False` (seeds only) is the sharper choice, and the only sound one for
  nearest-neighbour metrics. With one seed this is the plain row bootstrap.

  Args:
    metric_fn: fn(*arrays) -> float.
    arrays_per_seed: one `arrays` (see the module docstring) per seed, all of one layout.
    strata: None, or one `strata` per seed.

  Returns:
    {"value", "lo", "hi", "se" (std of the replicates), "n" (rows per item summed over
    seeds), "n_seeds", "n_boot"}.
  """
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  n_seeds = len(arrays_per_seed)
  strata = [None] * n_seeds if strata is None else list(strata)
  if len(strata) != n_seeds:
    raise ValueError(f"strata has {len(strata)} entries for {n_seeds} seeds")
  seeds = [_items(arrays, labels) for arrays, labels in zip(arrays_per_seed, strata)]
  if not seeds or len({len(items) for items in seeds}) != 1:
    raise ValueError(f"need >= 1 seed with the same number of items in each, got "
                     f"{[len(items) for items in seeds]}")
  if not within and n_seeds < 2:
    raise ValueError(f"within=False resamples seeds only and needs >= 2 of them, got {n_seeds}")
  per_seed, replicates = _replicates(metric_fn, seeds, n_boot, seed, within)
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(replicates, [tail, 100.0 - tail])
  n = tuple(sum(len(items[j][0][0]) for items in seeds) for j in range(len(seeds[0])))
  return {"value": float(per_seed.mean()), "lo": float(lo), "hi": float(hi),
          "se": float(replicates.std(ddof=1)) if n_boot > 1 else float("nan"), "n": n,
          "n_seeds": n_seeds, "n_boot": n_boot}


def _replicates(metric_fn, seeds, n_boot, seed, within):
  """(per-seed metrics [S, ...], bootstrap replicates [n_boot, ...]) of `over_seeds`; metric_fn
  may return a vector: its entries then share every replicate's resample."""
  per_seed = np.array([metric_fn(*_full(items)) for items in seeds], np.float64)
  rng = np.random.default_rng(seed)
  replicates = np.empty((n_boot,) + per_seed.shape[1:])
  for b in range(n_boot):
    chosen = rng.integers(0, len(seeds), len(seeds))
    replicates[b] = (np.mean([metric_fn(*_resample(seeds[c], rng)) for c in chosen], axis=0)
                     if within else per_seed[chosen].mean(axis=0))
  return per_seed, replicates


def bootstrap_many(metric_fn, arrays, *, n_boot=200, seed=0, level=0.95, strata=None):
  """`bootstrap` of a metric_fn returning {name: float}, one resample and one call per
  replicate for all names (each name's numbers equal its own `bootstrap`'s at the same seed).
  Returns {name: {"value", "lo", "hi"}}."""
  items = _items(arrays, strata)
  names = list(metric_fn(*_full(items)))

  def vector(*a):
    out = metric_fn(*a)
    return np.array([out[k] for k in names], np.float64)
  per_seed, replicates = _replicates(vector, [items], n_boot, seed, True)
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(replicates, [tail, 100.0 - tail], axis=0)
  return {k: {"value": float(per_seed[0, i]), "lo": float(lo[i]), "hi": float(hi[i])}
          for i, k in enumerate(names)}


def bootstrap(metric_fn, arrays, *, n_boot=200, seed=0, level=0.95, strata=None):
  """`metric_fn(*arrays)` on the full data ("value") with a percentile-bootstrap interval
  ("lo", "hi") over rows: items resampled independently, paired groups with shared indices.
  Returns `over_seeds`' dict for one seed."""
  return over_seeds(metric_fn, [arrays], n_boot=n_boot, seed=seed, level=level,
                    strata=None if strata is None else [strata])


def paired_difference(metric_fn, reference, a, b, *, higher_is_better, n_boot=200, seed=0,
                      level=0.95, strata=None, within=True):
  """diff = metric(reference, a) - metric(reference, b), bootstrap interval and `verdict`.

  Runs a and b were sampled with the same seeds and initial noise, so row i of a and row i of b
  are paired: their rows are resampled with shared indices (the noise they share cancels in the
  difference), the reference's rows independently.

  Args:
    metric_fn: fn(reference, samples) -> float, or fn(samples) -> float when `reference` is None
      (a closure holds any fixed data, e.g. the training set for `metrics.irs`).
    reference: real features [Nr, ...] or None.
    a, b: samples [N, ...] of the two runs, or lists of them per matched seed (a[s] pairs
      with b[s]); the seeds are then resampled too, as in `over_seeds`.
    higher_is_better: direction of the metric (False for FID, True for coverage).
    strata: None or (reference labels or None, sample labels [N] (a list per seed) or None).
    within: as in `over_seeds`.

  Returns:
    {"diff", "lo", "hi", "verdict", "se", "n" (paired samples), "n_seeds", "n_boot"}.
  """
  per_seed = isinstance(a, (list, tuple))
  a, b = (list(a), list(b)) if per_seed else ([a], [b])
  if len(a) != len(b):
    raise ValueError(f"a has {len(a)} seeds and b {len(b)}; seeds must be matched")
  reference_labels, sample_labels = (None, None) if strata is None else strata
  if not per_seed or sample_labels is None:
    sample_labels = [sample_labels] * len(a)
  if reference is None:
    arrays = [((x, y),) for x, y in zip(a, b)]
    labels = [(s,) for s in sample_labels]
    diff_fn = lambda x, y: metric_fn(x) - metric_fn(y)
  else:
    arrays = [(reference, (x, y)) for x, y in zip(a, b)]
    labels = [(reference_labels, s) for s in sample_labels]
    diff_fn = lambda r, x, y: metric_fn(r, x) - metric_fn(r, y)
  out = over_seeds(diff_fn, arrays, n_boot=n_boot, seed=seed, level=level, strata=labels,
                   within=within)
  return {"diff": out["value"], "lo": out["lo"], "hi": out["hi"],
          "verdict": verdict(out["lo"], out["hi"], higher_is_better), "se": out["se"],
          "n": out["n"][-1], "n_seeds": out["n_seeds"], "n_boot": n_boot}


def floor(metric_fn, real_features, n, *, seed=0):
  """`metric_fn(half_1, half_2)` on two disjoint random halves of n real rows each: the value a
  perfect generator would get with n samples (FID and friends are biased in n, not 0)."""
  real = np.asarray(real_features)
  if len(real) < 2 * n:
    raise ValueError(f"floor needs 2n = {2 * n} real rows for two disjoint halves of n = {n}, "
                     f"got {len(real)}")
  order = np.random.default_rng(seed).permutation(len(real))
  return float(metric_fn(real[order[:n]], real[order[n:2 * n]]))
