"""The partition command as a function: a label CSV -> the partition, its table and JSON file."""
import json
import time
from typing import Mapping, Sequence

import numpy as np

from grasp_jax import partition
from grasp_jax.data import labels as labels_lib
from grasp_jax.partition import groups as partition_groups


def run(labels: str, *, strategy: str, k: int | None = None,
        thresholds: Sequence[float] | None = None, quantiles: Sequence[float] | None = None,
        groups: Mapping | str | None = None, healthy: str = "No Finding", uncertain: str = "error",
        label_column: str | None = None, classes: Sequence[str] | None = None,
        dataset: str | None = None, ignore_columns: Sequence[str] = (), empty: str = "error",
        as_json: bool = False, out: str | None = None) -> str:
  """The CLI as a function: reads `labels`, builds the partition, returns the report text.

  `classes`, `dataset` and `ignore_columns` are those of labels.read_label_table (the classes are
  checked against a known dataset's list unless given). `empty` says what happens to rows
  without a positive label: "error", "drop", or the name of the cluster that takes them (e.g.
  "healthy").
  """
  start = time.perf_counter()
  table = labels_lib.read_label_table(labels, label_column=label_column, classes=classes,
                                      dataset=dataset, ignore_columns=ignore_columns,
                                      uncertain=uncertain)
  hot, dropped, fallback = table.labels, 0, None
  none = ~hot.any(axis=1)
  if none.any():
    if empty == "error":
      raise ValueError(f"{labels}:{table.lines[np.argmax(none)]}: row has no positive label "
                       f"({int(none.sum())} such rows); pass --empty=drop or "
                       "--empty=<cluster name>")
    if empty == "drop":
      if none.all():
        raise ValueError(f"{labels}: none of the {len(hot)} rows has a positive label")
      hot, dropped = hot[~none], int(none.sum())
    else:
      fallback = empty
  if isinstance(groups, str):
    groups = partition_groups.load_groups(groups)
  part = partition.build_partition(table.class_names, hot.sum(axis=0, dtype=np.int64),
                                   strategy=strategy, k=k, groups=groups, healthy=healthy,
                                   thresholds=thresholds, quantiles=quantiles, labels=hot,
                                   fallback=fallback)
  if out:
    part.save(out)
  seconds = time.perf_counter() - start
  if as_json:
    return json.dumps({**part.to_json(), "labels": labels, "dataset": table.dataset,
                       "num_samples": len(hot), "dropped_empty_rows": dropped}, indent=2)
  of = f" of {table.dataset}" if table.dataset else ""
  head = (f"{labels}: {len(hot)} samples, {part.num_classes} classes{of}, strategy={strategy}, "
          f"K={part.num_clusters}" + (f", {dropped} rows without labels dropped" if dropped else "")
          + f" ({seconds:.2f} s)")
  return head + "\n" + partition.format_table(part, len(hot)) + (f"\nwrote {out}" if out else "")
