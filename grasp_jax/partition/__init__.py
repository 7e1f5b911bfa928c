"""Static partition: every class goes to one of K clusters, every sample to the cluster of a label.

GRASP fixes the partition before training from external priors (label frequency, a healthy
group, anatomy), so a sample's cluster is a pure function of its condition and is known from
the prompt at inference. A multi-label sample goes to the cluster of its *rarest* positive label
(lowest training count): that way every tail sample updates the tail adapter instead of being
absorbed by a head cluster. One rarity order serves both the frequency split and that rule: among
equal counts the lower class index counts as rarer.

Strategies (`build_partition(strategy=...)`):
  single            one cluster "all" (a plain shared adapter; the K=1 ablation).
  class             one cluster per class, named after it (the K=C ablation).
  frequency         head / medium / tail. With `thresholds=(t_0 > t_1 > ...)`: head is
                    count > t_0, group j is count >= t_j, the last group is the rest (ImageNet-LT
                    shots: (100, 20) -> many > 100, medium 20..100, few < 20). Otherwise `k`
                    groups of (nearly) equal numbers of classes along the count-sorted class
                    list, or cut at `quantiles` (fractions of that list).
  healthy           the `healthy` class ("No Finding") alone, every other class in "findings".
  groups            an explicit mapping, {group: [classes]} or {class: group}, or "anatomical"
                    (ANATOMICAL_GROUPS, covering the MIMIC-CXR-LT, NIH-CXR-LT and CXR-LT 2023
                    classes; groups with no class in the data are left out).
  healthy+frequency the healthy class apart (cluster 0), the rest by frequency into k-1 groups.
  healthy+groups    the healthy class apart, the rest by the mapping.
  gradient          k clusters of the classes whose measured gradients agree, from `cosine`, a
                    [C, C] cosine matrix of per-class loss gradients on the frozen base
                    (`grasp_jax.run.gradient_partition`); see `alignment.gradient_groups`.
  healthy+gradient  the healthy class apart, the rest by gradient alignment into k-1 clusters.
  random            the control: the classes in a seeded random order, dealt into k clusters of
                    (nearly) equal numbers of classes; healthy+random keeps the healthy class apart.
Empty clusters are an error, never merged silently: K must match the adapter bank.

CLI (prints the table; --json for JSON; --out writes the partition file):
  python -m grasp_jax.partition --labels=train.csv.gz --strategy=healthy+frequency --k=4
"""
import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np

from grasp_jax.partition import alignment
from grasp_jax.partition import groups as groups_lib

STRATEGIES = ("single", "class", "frequency", "healthy", "groups", "healthy+frequency",
              "healthy+groups", "gradient", "healthy+gradient", "random", "healthy+random")
GRADIENT_STRATEGIES = ("gradient", "healthy+gradient")  # Measured on the base model, not priors.

@dataclasses.dataclass(frozen=True)
class Partition:
  """A class -> cluster table.

  `sample_counts` (samples per cluster under the rarest-label rule) is set when a label table
  was available; without it `cluster_counts` falls back to summed class counts, which equals the
  sample count only for single-label data.
  """
  class_names: tuple[str, ...]
  class_to_cluster: tuple[int, ...]
  cluster_names: tuple[str, ...]
  class_counts: tuple[int, ...]
  sample_counts: tuple[int, ...] | None = None
  strategy: str = ""

  def __post_init__(self):
    for field in ("class_names", "cluster_names"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    for field in ("class_to_cluster", "class_counts"):
      object.__setattr__(self, field, tuple(int(x) for x in getattr(self, field)))
    if self.sample_counts is not None:
      object.__setattr__(self, "sample_counts", tuple(int(c) for c in self.sample_counts))
    _check_names(self.class_names, "class")
    _check_names(self.cluster_names, "cluster")
    c, k = len(self.class_names), len(self.cluster_names)
    for field in ("class_to_cluster", "class_counts"):
      if len(getattr(self, field)) != c:
        raise ValueError(f"Partition.{field} has {len(getattr(self, field))} entries for "
                         f"{c} classes")
    for name, cid in zip(self.class_names, self.class_to_cluster):
      if not 0 <= cid < k:
        raise ValueError(f"class {name!r} maps to cluster {cid}, outside 0..{k - 1}")
    for name, n in zip(self.class_names, self.class_counts):
      if n < 0:
        raise ValueError(f"class {name!r} has a negative count {n}")
    used = set(self.class_to_cluster)
    empty = [self.cluster_names[i] for i in range(k) if i not in used]
    if empty:
      raise ValueError(f"clusters without classes: {empty}")
    if self.sample_counts is not None and len(self.sample_counts) != k:
      raise ValueError(f"Partition.sample_counts has {len(self.sample_counts)} entries for "
                       f"{k} clusters")

  @property
  def num_clusters(self) -> int:
    return len(self.cluster_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def cluster_counts(self) -> tuple[int, ...]:
    """Samples per cluster if known, else the summed class counts of its classes."""
    if self.sample_counts is not None:
      return self.sample_counts
    sums = np.zeros(self.num_clusters, np.int64)
    np.add.at(sums, list(self.class_to_cluster), list(self.class_counts))
    return tuple(int(s) for s in sums)

  def classes_of(self, cluster: int) -> tuple[str, ...]:
    return tuple(n for n, c in zip(self.class_names, self.class_to_cluster) if c == cluster)

  def cluster_id(self, cluster: int | str) -> int:
    """A cluster id from an id or a cluster name."""
    if isinstance(cluster, str):
      if cluster not in self.cluster_names:
        raise ValueError(f"unknown cluster {cluster!r}; clusters are {list(self.cluster_names)}")
      return self.cluster_names.index(cluster)
    if not 0 <= int(cluster) < self.num_clusters:
      raise ValueError(f"cluster id {cluster} outside 0..{self.num_clusters - 1}")
    return int(cluster)

  def assign(self, labels, *, fallback: int | str | None = None) -> np.ndarray:
    """Cluster ids int32[N] for class indices int[N] or a multi-hot (0/1) table [N, C].

    A multi-label row goes to the cluster of its rarest positive label. A row with no positive
    label is an error unless `fallback` (a cluster id or name, e.g. "healthy") is given.
    """
    labels = np.asarray(labels)
    table = np.asarray(self.class_to_cluster, np.int32)
    c = self.num_classes
    if labels.ndim == 1:
      if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"1-D labels must be integer class indices, got dtype {labels.dtype}")
      bad = np.flatnonzero((labels < 0) | (labels >= c))
      if bad.size:
        raise ValueError(f"label {labels[bad[0]]} at row {bad[0]} is not a class index "
                         f"in 0..{c - 1}")
      return table[labels]
    if labels.ndim != 2 or labels.shape[1] != c:
      raise ValueError(f"labels must be int[N] or multi-hot [N, {c}], got shape {labels.shape}")
    if labels.dtype != bool:
      bad = np.argwhere((labels != 0) & (labels != 1))
      if bad.size:
        r, j = bad[0]
        hint = " (uncertain: resolve -1 to 0 or 1 first)" if labels[r, j] == -1 else ""
        raise ValueError(f"multi-hot labels must be 0/1; row {r}, class "
                         f"{self.class_names[j]!r} has {labels[r, j]}{hint}")
    # Rank classes from rarest (0) to most frequent; the row's minimum rank is its rarest label.
    order = rarity_order(self.class_counts)
    rank = np.empty(c, np.int32)
    rank[order] = np.arange(c, dtype=np.int32)
    best = np.where(labels.astype(bool), rank, c).min(axis=1, initial=c)
    empty = best == c
    ids = table[order[np.minimum(best, c - 1)]]
    if empty.any():
      if fallback is None:
        raise ValueError(f"{int(empty.sum())} rows have no positive label (first: row "
                         f"{int(np.argmax(empty))}); pass fallback=<cluster> to assign them")
      ids[empty] = self.cluster_id(fallback)
    return ids

  def assign_names(self, label_sets: Sequence[Sequence[str]], *,
                   fallback: int | str | None = None) -> np.ndarray:
    """Cluster ids for label-name lists (e.g. the findings a prompt was built from)."""
    index = {n: i for i, n in enumerate(self.class_names)}
    hot = np.zeros((len(label_sets), self.num_classes), bool)
    for r, names in enumerate(label_sets):
      for name in names:
        if name not in index:
          raise ValueError(f"unknown class {name!r} in label set {r}; classes are "
                           f"{list(self.class_names)}")
        hot[r, index[name]] = True
    return self.assign(hot, fallback=fallback)

  def with_sample_counts(self, labels, *, fallback: int | str | None = None) -> "Partition":
    """The same partition with `sample_counts` taken from a label table."""
    counts = np.bincount(self.assign(labels, fallback=fallback), minlength=self.num_clusters)
    return dataclasses.replace(self, sample_counts=tuple(int(n) for n in counts))

  def to_json(self) -> dict:
    return {
        "strategy": self.strategy,
        "counts_from": "samples" if self.sample_counts is not None else "class_counts",
        "clusters": [{"id": i, "name": name, "classes": list(self.classes_of(i)), "count": n}
                     for i, (name, n) in enumerate(zip(self.cluster_names, self.cluster_counts))],
        "class_to_cluster": dict(zip(self.class_names, self.class_to_cluster)),
        "class_counts": dict(zip(self.class_names, self.class_counts)),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Partition":
    """Inverse of `to_json`; class order is the key order of `class_to_cluster`."""
    for key in ("clusters", "class_to_cluster", "class_counts"):
      if key not in d:
        raise ValueError(f"partition JSON lacks {key!r} (has {sorted(d)})")
    clusters = list(d["clusters"])
    for i, cl in enumerate(clusters):
      if cl.get("id") != i:
        raise ValueError(f"partition JSON: clusters[{i}] has id {cl.get('id')!r}, expected {i}")
    names = tuple(d["class_to_cluster"])
    if set(d["class_counts"]) != set(names):
      raise ValueError("partition JSON: class_counts and class_to_cluster name different "
                       f"classes: {sorted(set(d['class_counts']) ^ set(names))}")
    part = cls(
        class_names=names,
        class_to_cluster=tuple(int(d["class_to_cluster"][n]) for n in names),
        cluster_names=tuple(cl["name"] for cl in clusters),
        class_counts=tuple(int(d["class_counts"][n]) for n in names),
        sample_counts=(tuple(int(cl["count"]) for cl in clusters)
                       if d.get("counts_from") == "samples" else None),
        strategy=d.get("strategy", ""))
    for i, cl in enumerate(clusters):
      if "classes" in cl and set(cl["classes"]) != set(part.classes_of(i)):
        raise ValueError(f"partition JSON: clusters[{i}].classes {cl['classes']} disagrees with "
                         f"class_to_cluster {list(part.classes_of(i))}")
    return part

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=2)
      f.write("\n")

  @classmethod
  def load(cls, path: str) -> "Partition":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    try:
      return cls.from_json(d)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: {e}") from None


def _check_names(names, what):
  for n in names:
    if not isinstance(n, str) or not n:
      raise ValueError(f"{what} names must be non-empty strings, got {n!r}")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"duplicate {what} names: {dup}")


# ---------------------------------------------------------------------------------------------
# Strategies.


def head_to_tail(counts: Sequence[int], classes: Sequence[int] | None = None) -> np.ndarray:
  """`classes` (default: all) from most to least frequent; among equal counts the lower index
  first. The one ordering every table and plot uses."""
  counts = np.asarray(counts)
  classes = np.arange(len(counts)) if classes is None else np.asarray(classes, np.int64)
  return classes[np.lexsort((classes, -counts[classes]))]


def rarity_order(counts: Sequence[int]) -> np.ndarray:
  """Class indices from rarest to most frequent; among equal counts the lower index first."""
  counts = np.asarray(counts)
  return np.lexsort((np.arange(len(counts)), counts))


def _frequency_names(n: int, single: str) -> list[str]:
  if n == 1:
    return [single]
  if n == 3:
    return ["head", "medium", "tail"]
  return ["head"] + [f"medium_{i}" for i in range(1, n - 1)] + ["tail"]


def _by_frequency(idx, counts, k, thresholds, quantiles, names_taken, single):
  """Groups (lists of class indices, head first) of the classes `idx` by their counts."""
  if thresholds is not None:
    t = [float(x) for x in thresholds]
    if not t or any(a <= b for a, b in zip(t, t[1:])):
      raise ValueError(f"thresholds must be a non-empty, strictly decreasing list, got {t}")
    if k is not None and k != len(t) + 1 + names_taken:
      raise ValueError(f"k={k} disagrees with {len(t)} thresholds ({len(t) + 1} frequency "
                       f"groups{' + healthy' if names_taken else ''})")
    groups = [[] for _ in range(len(t) + 1)]
    for i in idx:
      n = counts[i]
      g = 0 if n > t[0] else next((j for j in range(1, len(t)) if n >= t[j]), len(t))
      groups[g].append(i)
    names = _frequency_names(len(groups), single)
    empty = [nm for nm, g in zip(names, groups) if not g]
    if empty:
      raise ValueError(f"thresholds {t} leave clusters {empty} without classes (class counts "
                       f"range {min(counts[i] for i in idx)}..{max(counts[i] for i in idx)})")
    return groups, names
  if k is None:
    raise ValueError("frequency strategies need k or thresholds")
  n = k - names_taken
  if n < 1:
    raise ValueError(f"k={k} leaves no frequency group")
  if n > len(idx):
    raise ValueError(f"k={k} asks for {n} frequency groups but there are only {len(idx)} "
                     "classes to split")
  keep = set(idx)
  ranked = [int(i) for i in rarity_order(counts)[::-1] if i in keep]  # most frequent first
  if quantiles is None:
    cuts = [(2 * j * len(ranked) + n) // (2 * n) for j in range(1, n)]  # round half up
  else:
    q = [float(x) for x in quantiles]
    if len(q) != n - 1 or any(not 0 < x < 1 for x in q) or any(a >= b for a, b in zip(q, q[1:])):
      raise ValueError(f"quantiles must be {n - 1} increasing fractions in (0, 1) for {n} "
                       f"frequency groups, got {q}")
    cuts = [int(np.floor(x * len(ranked) + 0.5)) for x in q]
  bounds = [0, *cuts, len(ranked)]
  groups = [ranked[a:b] for a, b in zip(bounds, bounds[1:])]
  names = _frequency_names(n, single)
  empty = [nm for nm, g in zip(names, groups) if not g]
  if empty:
    raise ValueError(f"quantiles {quantiles} leave clusters {empty} without classes "
                     f"({len(ranked)} classes)")
  return groups, names


def build_partition(class_names: Sequence[str], class_counts: Sequence[int], *, strategy: str,
                    k: int | None = None, groups: Mapping | str | None = None,
                    healthy: str = "No Finding", thresholds: Sequence[float] | None = None,
                    quantiles: Sequence[float] | None = None, labels=None,
                    fallback: int | str | None = None, cosine=None, seed: int = 0) -> Partition:
  """A partition of the classes by `strategy` (see the module docstring).

  `class_counts[i]` is the number of training samples with class i positive. With a label table
  `labels` (int[N] or multi-hot [N, C]) the cluster counts are counted in samples. `cosine`: the
  gradient strategies' [C, C] class gradient cosines (NaN diagonal: class not measured).
  `seed`: the random strategies' permutation.
  """
  class_names = tuple(class_names)
  _check_names(class_names, "class")
  counts = [int(n) for n in class_counts]
  if len(counts) != len(class_names):
    raise ValueError(f"{len(counts)} class counts for {len(class_names)} classes")
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
  if k is not None and k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  parts = strategy.split("+")
  if groups is not None and "groups" not in parts:
    raise ValueError(f"groups is only used by the strategies groups / healthy+groups, "
                     f"not {strategy!r}")
  if (thresholds is not None or quantiles is not None) and "frequency" not in parts:
    raise ValueError(f"thresholds/quantiles are only used by frequency strategies, "
                     f"not {strategy!r}")
  if thresholds is not None and quantiles is not None:
    raise ValueError("give thresholds or quantiles, not both")
  if (cosine is not None) != (parts[-1] == "gradient"):
    raise ValueError(f"a cosine matrix is needed by, and only used by, the strategies "
                     f"{GRADIENT_STRATEGIES}; got strategy {strategy!r}")

  idx = list(range(len(class_names)))
  head_groups, head_names = [], []
  if parts[0] == "healthy":
    if healthy not in class_names:
      raise ValueError(f"healthy class {healthy!r} is not a class; classes are "
                       f"{list(class_names)}")
    h = class_names.index(healthy)
    idx.remove(h)
    head_groups, head_names = [[h]], ["healthy"]
    if not idx:
      raise ValueError(f"strategy {strategy!r} needs classes besides {healthy!r}")

  if strategy == "single":
    groups_, names = [idx], ["all"]
  elif strategy == "class":
    groups_, names = [[i] for i in idx], list(class_names)
  elif strategy == "healthy":
    groups_, names = [idx], ["findings"]
  elif parts[-1] == "frequency":
    groups_, names = _by_frequency(idx, counts, k, thresholds, quantiles, len(head_groups),
                                   "findings" if head_groups else "all")
  elif parts[-1] == "random":  # The control for a prior: the same K, classes dealt at random.
    k_rest = (k if k is not None else 3) - len(head_groups)
    if not 1 <= k_rest <= len(idx):
      raise ValueError(f"strategy {strategy!r}: k={k} leaves {k_rest} clusters for {len(idx)} "
                       "classes")
    order = np.random.default_rng(seed).permutation(idx)
    groups_ = [sorted(int(i) for i in g) for g in np.array_split(order, k_rest)]
    names = [f"random_{j}" for j in range(k_rest)]
  elif parts[-1] == "gradient":
    groups_, names = alignment.gradient_groups(
        idx, cosine, None if k is None else k - len(head_groups), rarity_order(counts))
  else:
    if groups is None:
      raise ValueError(f"strategy {strategy!r} needs groups (a mapping, a JSON file, or "
                       f"{sorted(groups_lib.BUILTIN_GROUPS)})")
    groups_, names = groups_lib.assign(idx, class_names, groups, isinstance(groups, str))
  groups_, names = head_groups + groups_, head_names + names
  if head_groups and names.count("healthy") > 1:
    raise ValueError("the groups mapping names a group 'healthy' besides the healthy class; "
                     "rename it")
  if k is not None and k != len(names):
    if len(class_names) < k:
      raise ValueError(f"k={k} clusters but there are only {len(class_names)} classes")
    raise ValueError(f"strategy {strategy!r} gives {len(names)} clusters {names}, but k={k}")

  table = [0] * len(class_names)
  for cid, members in enumerate(groups_):
    for i in members:
      table[i] = cid
  part = Partition(class_names, tuple(table), tuple(names), tuple(counts), strategy=strategy)
  return part if labels is None else part.with_sample_counts(labels, fallback=fallback)


def format_table(part: Partition, num_samples: int | None = None) -> str:
  """One line per cluster: id, name, samples, share, classes (most frequent first)."""
  counts = part.cluster_counts
  total = num_samples if num_samples is not None else sum(counts)
  width = max(len(n) for n in part.cluster_names)
  unit = "samples" if part.sample_counts is not None else "count"
  out = [f"{'id':>3}  {'name':<{width}}  {unit:>9}  {'share':>7}  classes (class count)"]
  for i, name in enumerate(part.cluster_names):
    members = [(part.class_counts[part.class_names.index(c)], c) for c in part.classes_of(i)]
    members = ", ".join(f"{c} ({n})" for n, c in sorted(members, key=lambda m: -m[0]))
    share = counts[i] / total if total else 0.0
    out.append(f"{i:>3}  {name:<{width}}  {counts[i]:>9}  {share:>7.2%}  {members}")
  return "\n".join(out)
