"""Building from a user's local copy of a dataset (the TFDS `manual_dir`).

Label tables are read with grasp_jax.data.labels.read_label_table (one 0/1 column per class, errors
name file and line); this module adds the per-dataset schema checks, the check that splits list
each image once and share none, and the example loop shared by the chest X-ray and ImageNet
builders.
"""
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from grasp_jax.data import labels as label_tables
from grasp_jax.data.builders import specs

# Worker threads for image decoding on build; PIL releases the GIL, so this scales with cores.
NUM_THREADS = min(16, os.cpu_count() or 1)


def find_file(manual_dir: epath.Path, candidates: Sequence[str], what: str) -> epath.Path:
  """The first of `candidates` (paths relative to manual_dir) that exists."""
  for c in candidates:
    path = manual_dir / c
    if path.exists():
      return path
  tried = ", ".join(str(manual_dir / c) for c in candidates)
  raise FileNotFoundError(f"{what} not found in manual_dir {manual_dir}: expected one of "
                          f"{tried} (see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS)")


def read_labels(path: epath.Path, class_names: Sequence[str], *,
                required_columns: Sequence[str], metadata_columns: Sequence[str],
                single_label: bool) -> label_tables.LabelTable:
  """A label CSV with one 0/1 column per class in `class_names`, checked against the schema.

  A column that is neither a class nor one of `metadata_columns` is an error (a class this
  builder does not know, e.g. a file from another release), as is a missing class column.
  Single-label files need exactly one positive per row, multi-label files at least one.
  """
  table = label_tables.read_label_table(os.fspath(path), classes=list(class_names),
                                     uncertain="error")
  unknown = [c for c in table.columns if c not in metadata_columns]
  if unknown:
    named = ", ".join(repr(c) + label_tables.did_you_mean(c, class_names) for c in unknown)
    raise ValueError(f"{path}: unknown columns {named}: not one of the {len(class_names)} "
                     f"classes {list(class_names)} nor a metadata column {list(metadata_columns)}")
  missing = [c for c in required_columns if c not in table.columns]
  if missing:
    raise ValueError(f"{path}: missing columns {missing} (header has "
                     f"{list(table.columns) + list(class_names)})")
  positives = table.labels.sum(axis=1)
  bad = np.flatnonzero(positives != 1) if single_label else np.flatnonzero(positives == 0)
  if bad.size:
    r = bad[0]
    want = "exactly one positive class (single-label)" if single_label else "a positive class"
    raise ValueError(f"{path}:{table.lines[r]}: row has {positives[r]} positive classes; "
                     f"expected {want}")
  return table


def primary_labels(labels: np.ndarray, class_counts: Sequence[int]) -> np.ndarray:
  """Per row, the positive class with the lowest count (ties: lower index), int64[N]."""
  c = labels.shape[1]
  order = np.lexsort((np.arange(c), np.asarray(class_counts)))  # rarest first
  rank = np.empty(c, np.int64)
  rank[order] = np.arange(c)
  best = np.where(labels.astype(bool), rank, c).min(axis=1)
  if (best == c).any():
    raise ValueError("rows without a positive class have no primary label")
  return order[best]


def disjoint_splits(splits: Mapping[str, tuple[str, Sequence[str], Sequence[int]]], *,
                    drop_overlapping: bool, stats: dict) -> dict[str, np.ndarray]:
  """Which rows to build, bool[N] per split, after checking that each image is listed once.

  `splits` maps each split, in the builder's order, to (label file, image key per row, file
  line per row). A key twice in one split is an error naming both lines (TFDS would fail later
  with "Two examples share the same hashed key!"). A key in two splits is leakage: an error,
  unless `drop_overlapping`, which keeps the image only in its last split and records
  `dropped_overlapping` (and up to 100 `dropped_overlapping_ids`) in stats[split].
  """
  rows = {}  # split -> {key: row}
  for split, (file, keys, lines) in splits.items():
    rows[split] = {}
    for r, (key, line) in enumerate(zip(keys, lines)):
      if key in rows[split]:
        raise ValueError(f"{file}:{line}: duplicate row: {key!r} is already on line "
                         f"{lines[rows[split][key]]}; each image may be listed once per split")
      rows[split][key] = r
  names = list(splits)
  shared = []  # (split, row, later split holding the same key)
  for i, a in enumerate(names):
    for key, r in rows[a].items():
      later = next((b for b in names[i + 1:] if key in rows[b]), None)
      if later is not None:
        shared.append((a, r, later))
  if shared and not drop_overlapping:
    a, r, b = shared[0]
    key = splits[a][1][r]
    count = "1 image is" if len(shared) == 1 else f"{len(shared)} images are"
    raise ValueError(
        f"{count} listed in more than one split (leakage), e.g. {key!r} in {a!r} "
        f"({splits[a][0]}:{splits[a][2][r]}) and in {b!r} "
        f"({splits[b][0]}:{splits[b][2][rows[b][key]]}); fix the split files, or set the "
        "builder option drop_overlapping_images=True (e.g. "
        "--config.data.builder_options=drop_overlapping_images=true) to keep each such image "
        f"only in its last split (order {names}) and count it")
  keep = {split: np.ones(len(keys), bool) for split, (_, keys, _) in splits.items()}
  dropped = {split: [] for split in names}
  for a, r, _ in shared:
    keep[a][r] = False
    dropped[a].append(splits[a][1][r])
  for split in names:
    if dropped[split]:
      logging.warning("%s: dropping %d images listed in a later split too (e.g. %s)", split,
                      len(dropped[split]), dropped[split][0])
      if not keep[split].any():
        raise ValueError(f"split {split!r} has no images left after dropping those listed in a "
                         "later split")
    stats.setdefault(split, {}).update(
        dropped_overlapping=len(dropped[split]), dropped_overlapping_ids=dropped[split][:100])
  return keep


@dataclasses.dataclass(frozen=True)
class Item:
  """One example to build: where its image is and what its labels are."""
  key: str
  image_path: str | None  # None: not found
  labels: np.ndarray  # uint8 [C]
  label: int
  origin: str  # "file:line" of the label row, for error messages
  extra: Any = None  # builder-specific (e.g. the report path)


def generate_examples(items: Sequence[Item], make: Callable[[Item], dict], *,
                      skip_bad_images: bool, split_stats: dict,
                      num_threads: int = NUM_THREADS) -> Iterator[tuple[str, dict]]:
  """Yields (key, example) for TFDS, building examples on a thread pool in item order.

  `make` raises specs.BadImageError for an unreadable image: an error unless
  `skip_bad_images`, in which case the item is dropped and counted. `split_stats` (stored in
  the dataset metadata) receives the number of examples, skipped images, per-class counts of
  what was written and, when `make` sets example["prompt_source"], the prompt sources.
  """
  def work(item):
    try:
      return make(item)
    except specs.BadImageError as e:
      if not skip_bad_images:
        raise specs.BadImageError(
            f"{e} (example {item.key} from {item.origin}; set the builder option "
            "skip_bad_images=True, e.g. --config.data.builder_options=skip_bad_images=true, to "
            "skip and count such images)") from None
      logging.warning("skipping example %s: %s", item.key, e)
      return None

  class_counts = np.zeros(len(items[0].labels), np.int64)
  skipped, sources = [], {}
  for item, example in zip(items, specs.thread_map(work, items, num_threads)):
    if example is None:
      skipped.append(item.key)
      continue
    class_counts += example["labels"]
    source = example.pop("prompt_source", None)
    if source is not None:
      sources[source] = sources.get(source, 0) + 1
    yield item.key, example
  split_stats.update(examples=len(items) - len(skipped), skipped_images=len(skipped),
                     skipped_ids=skipped[:100], class_counts=class_counts.tolist())
  if sources:
    split_stats["prompt_sources"] = sources
