"""Label tables: a dataset's label CSV -> multi-hot labels with the file line of every row.

Reads one 0/1(/-1 uncertain) column per class (MIMIC-CXR-LT, CXR-LT 2023, CheXpert style) or a
'|'-separated findings column (NIH's `Finding Labels`); plain or gzip-compressed (told by the
content; a `.gz` name on a plain file is an error). Every bad cell is reported as
file:line:column. Unless the classes are given, every label column (or finding) must be a class of
a known dataset (grasp_jax.data.classes.CLASS_LISTS, named or recognised), so a misspelt class or
a stray 0/1 column cannot become a class of its own.
"""
import csv
import dataclasses
import difflib
import gzip
import itertools
import operator
import zlib
from typing import Sequence

import numpy as np

from grasp_jax.data import classes as class_lists

UNCERTAIN_POLICIES = ("error", "ones", "zeros", "ignore")


# Columns of CXR-LT / MIMIC / CheXpert / NIH label CSVs that are not labels (compared
# case-insensitively; names ending in "_id" or "path" are also skipped). The second group are
# MIMIC-CXR-JPG metadata columns some CXR-LT releases carry.
NON_LABEL_COLUMNS = frozenset((
    "", "unnamed: 0", "id", "image", "image_id", "image index", "filename", "file", "split",
    "sex", "age", "frontal/lateral", "ap/pa", "viewposition", "view", "patient id",
    "patient age", "patient gender", "follow-up #", "view position",
    "viewcodesequence_codemeaning", "performedprocedurestepdescription", "rows", "columns",
    "studydate", "studytime", "procedurecodesequence_codemeaning",
    "patientorientationcodesequence_codemeaning"))
_BAD = 2  # code of an unparseable cell
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """A label CSV: multi-hot labels uint8[N, C], the file line of each row, other columns.

  `dataset`: the known class list the classes were checked against (a key of CLASS_LISTS), None
  when the caller gave the classes without one.
  """
  path: str
  class_names: tuple[str, ...]
  labels: np.ndarray
  lines: np.ndarray
  columns: dict[str, list[str]]
  dataset: str | None = None

  @property
  def class_counts(self) -> np.ndarray:
    return self.labels.sum(axis=0, dtype=np.int64)

  def take(self, keep: np.ndarray) -> "LabelTable":
    """The rows where the bool mask `keep` is True."""
    keep = np.asarray(keep, bool)
    columns = {k: [v for v, m in zip(vals, keep) if m] for k, vals in self.columns.items()}
    return dataclasses.replace(self, labels=self.labels[keep], lines=self.lines[keep],
                               columns=columns)


def did_you_mean(name: str, choices: Sequence[str]) -> str:
  """" (did you mean 'X'?)" for the closest of `choices` (case-insensitive), else ""."""
  lower = {c.lower(): c for c in choices}
  close = difflib.get_close_matches(name.lower(), list(lower), n=1)
  return f" (did you mean {lower[close[0]]!r}?)" if close else ""


def _is_label_column(name: str) -> bool:
  n = name.strip().lower()
  return not (n in NON_LABEL_COLUMNS or n.endswith("_id") or n.endswith("path"))


def _open_text(path):
  with open(path, "rb") as f:
    head = f.read(2)
  if head == _GZIP_MAGIC:
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
  if str(path).endswith(".gz"):
    what = "is empty" if not head else "is not gzip-compressed (no gzip header)"
    raise ValueError(f"{path}: named .gz but {what}; rename it or compress it with gzip")
  return open(path, encoding="utf-8-sig", newline="")


def _read_csv(path):
  """Header, rows and 1-based line numbers; blank lines skipped; every row as wide as the header."""
  rows, lines, reader = [], [], None
  try:
    with _open_text(path) as f:
      reader = csv.reader(f, strict=True)
      header = next(reader, None)
      for row in reader:
        if row:
          rows.append(row)
          lines.append(reader.line_num)
  except csv.Error as e:
    raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
  except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
    where = f":{reader.line_num + 1}" if reader is not None else ""
    raise ValueError(f"{path}{where}: cannot read: {e}") from None
  if not header:
    raise ValueError(f"{path}: empty file (no header row)")
  dup = sorted({h for h in header if header.count(h) > 1})
  if dup:
    raise ValueError(f"{path}: duplicate columns {dup}")
  for row, line in zip(rows, lines):
    if len(row) != len(header):
      raise ValueError(f"{path}:{line}: expected {len(header)} fields as in the header, "
                       f"got {len(row)}")
  return header, rows, np.asarray(lines, np.int64)


class _CellCodes(dict):
  """Cell text -> 1 / 0 / -1 / _BAD, parsed once per distinct text."""

  def __missing__(self, text):
    s = text.strip().lower()
    if not s or s == "nan":
      code = 0
    else:
      try:
        code = {1.0: 1, 0.0: 0, -1.0: -1}.get(float(s), _BAD)
      except ValueError:
        code = _BAD
    self[text] = code
    return code


def _names(names, choices) -> str:
  return ", ".join(repr(n) + did_you_mean(n, choices) for n in names)


def _recognise(path, found, what) -> str:
  """The known class list sharing most names with `found` (ties: the shortest list)."""
  overlap = {d: len(set(found) & set(c)) for d, c in class_lists.CLASS_LISTS.items()}
  best = max(overlap, key=lambda d: (overlap[d], -len(class_lists.CLASS_LISTS[d])))
  if not overlap[best]:
    raise ValueError(f"{path}: the {what} {list(found)} match no known class list "
                     f"{sorted(class_lists.CLASS_LISTS)}; pass --classes to name the classes")
  return best


def _check_known(path, names, dataset, how, what):
  """Every one of `names` (label columns or --classes) must be a class of `dataset`."""
  known = class_lists.CLASS_LISTS[dataset]
  bad = [n for n in names if n not in known]
  if not bad:
    return
  hint = ("fix the names or drop --dataset" if what == "--classes" else
          f"fix misspelt names, pass --ignore_columns={','.join(bad)} for columns that are not "
          "labels, or --classes to name the classes")
  one = len(bad) == 1
  what = what if one or what == "--classes" else what + "s"
  raise ValueError(f"{path}: {what} {_names(bad, known)} {'is' if one else 'are'} not "
                   f"{'a class' if one else 'classes'} of {dataset} ({how}); {hint}")


def _how(dataset):
  return "--dataset" if dataset else "recognised from the file; --dataset picks another list"


def _label_columns(path, header, classes, dataset, ignore):
  """The class columns and the dataset they were checked against."""
  if classes is not None:
    missing = [c for c in classes if c not in header]
    if missing:
      are = "class {} is not a column" if len(missing) == 1 else "classes {} are not columns"
      raise ValueError(f"{path}: {are.format(_names(missing, header))}; columns are {header}")
    if dataset:
      _check_known(path, classes, dataset, "--dataset", "--classes")
    return list(classes), dataset
  names = [h for h in header if _is_label_column(h) and h not in ignore]
  if not names:
    raise ValueError(f"{path}: no label columns among {header}")
  known = dataset or _recognise(path, names, "label columns")
  _check_known(path, names, known, _how(dataset), "column")
  return names, known


def _one_column_per_class(path, header, rows, lines, names, uncertain):
  cols = [header.index(n) for n in names]
  get = operator.itemgetter(*cols) if len(cols) > 1 else (lambda r: (r[cols[0]],))
  cells = list(itertools.chain.from_iterable(map(get, rows)))
  codes = np.fromiter(map(_CellCodes().__getitem__, cells), np.int8, count=len(cells))
  codes = codes.reshape(len(rows), len(cols))
  bad = np.argwhere(codes == _BAD)
  if bad.size:
    r, j = bad[0]
    raise ValueError(
        f"{path}:{lines[r]}: column {names[j]!r} has value {rows[r][cols[j]]!r}; expected 1, 0, "
        "-1 (uncertain) or blank")
  unsure = codes == -1
  if unsure.any():
    if uncertain == "error":
      r, j = np.argwhere(unsure)[0]
      raise ValueError(f"{path}:{lines[r]}: column {names[j]!r} is -1 (uncertain); choose "
                       "--uncertain=ones|zeros|ignore")
    # The partition only uses positives, so "ignore" (masked) and "zeros" give the same labels.
    codes[unsure] = 1 if uncertain == "ones" else 0
  others = [j for j, h in enumerate(header) if h not in names]
  return codes.astype(np.uint8), others


def _findings_column(path, header, rows, lines, column, classes, dataset):
  if column not in header:
    raise ValueError(f"{path}: no label column {column!r}{did_you_mean(column, header)}; "
                     f"columns are {header}")
  j = header.index(column)
  cells = [r[j] for r in rows]
  distinct = list(dict.fromkeys(cells))  # in the order of their first line
  tokens = {}
  for cell in distinct:
    parts = [t.strip() for t in cell.split("|")] if cell.strip() else []
    if "" in parts:
      line = lines[cells.index(cell)]
      raise ValueError(f"{path}:{line}: column {column!r} has an empty finding in {cell!r}")
    tokens[cell] = parts
  found = list(dict.fromkeys(t for p in tokens.values() for t in p))
  if classes is not None:
    if dataset:
      _check_known(path, classes, dataset, "--dataset", "--classes")
    names, allowed, where = list(classes), list(classes), f"in --classes {list(classes)}"
  else:
    if not found:
      raise ValueError(f"{path}: column {column!r} holds no findings")
    how = _how(dataset)
    dataset = dataset or _recognise(path, found, f"findings of column {column!r}")
    allowed = class_lists.CLASS_LISTS[dataset]
    names, where = sorted(found), f"a class of {dataset} ({how})"
  index = {n: i for i, n in enumerate(names)}
  hot = np.zeros((len(distinct), len(names)), np.uint8)
  for d, cell in enumerate(distinct):
    for t in tokens[cell]:
      if t not in allowed:
        line = lines[cells.index(cell)]
        raise ValueError(f"{path}:{line}: column {column!r} has finding "
                         f"{_names([t], allowed)}, which is not {where}")
      hot[d, index[t]] = 1
  cell_id = {cell: d for d, cell in enumerate(distinct)}
  inv = np.fromiter(map(cell_id.__getitem__, cells), np.int64, count=len(cells))
  return names, hot[inv], [i for i in range(len(header)) if i != j], dataset


def read_label_table(path: str, *, label_column: str | None = None,
                     classes: Sequence[str] | None = None, dataset: str | None = None,
                     ignore_columns: Sequence[str] = (), uncertain: str = "error") -> LabelTable:
  """Reads a label CSV (optionally gzipped); a file without data rows is an error.

  Two layouts: one 1/0/-1/blank column per class (CXR-LT, MIMIC-CXR-LT, CheXpert; id, path and
  `ignore_columns` are skipped, `uncertain` resolves -1), or one `|`-separated findings column
  (`label_column`, NIH Data_Entry_2017 style; used by default when a "Finding Labels" column
  exists). `classes` picks and orders the classes (default: all label columns / all findings,
  sorted). Without `classes`, every label column / finding must be a class of `dataset` (a key
  of CLASS_LISTS; default: the list that shares most names with the file); with both, `classes`
  must be classes of `dataset`.
  """
  if uncertain not in UNCERTAIN_POLICIES:
    raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
  if dataset is not None and dataset not in class_lists.CLASS_LISTS:
    raise ValueError(f"unknown dataset {dataset!r}{did_you_mean(dataset, class_lists.CLASS_LISTS)}"
                     f"; known class lists: {sorted(class_lists.CLASS_LISTS)}")
  header, rows, lines = _read_csv(path)
  if not rows:
    raise ValueError(f"{path}: no data rows (only a header)")
  stray = [c for c in ignore_columns if c not in header]
  if stray:
    are = "is not a column" if len(stray) == 1 else "are not columns"
    raise ValueError(f"{path}: --ignore_columns {_names(stray, header)} {are}; columns are "
                     f"{header}")
  if label_column is None and "Finding Labels" in header:
    label_column = "Finding Labels"
  if label_column is None:
    names, dataset = _label_columns(path, header, classes, dataset, set(ignore_columns))
    labels, others = _one_column_per_class(path, header, rows, lines, names, uncertain)
  else:
    names, labels, others, dataset = _findings_column(path, header, rows, lines, label_column,
                                                      classes, dataset)
  columns = {header[j]: [r[j] for r in rows] for j in others}
  return LabelTable(path, tuple(names), labels, lines, columns, dataset)
