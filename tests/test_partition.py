"""Static partition: strategies, the rarest-label rule, JSON, and the label-table CLI."""
import csv
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from grasp_jax import partition as P
from grasp_jax.data import classes as class_lists
from grasp_jax.data import labels as label_tables
from grasp_jax.partition import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clusters(part):
  """{cluster name: set of classes}, read off the public table."""
  out = {}
  for name, cid in zip(part.class_names, part.class_to_cluster):
    out.setdefault(part.cluster_names[cid], set()).add(name)
  return out


# --- strategies ---------------------------------------------------------------------------------

NAMES = ("a", "b", "c", "d", "e", "f", "g", "h")
COUNTS = (19, 500, 100, 101, 20, 3, 150, 50)


def test_frequency_thresholds_imagenet_lt_shots():
  part = P.build_partition(NAMES, COUNTS, strategy="frequency", thresholds=(100, 20))
  # many > 100, medium 20..100, few < 20 (worked out by hand).
  assert part.cluster_names == ("head", "medium", "tail")
  assert _clusters(part) == {"head": {"b", "d", "g"}, "medium": {"c", "e", "h"},
                             "tail": {"a", "f"}}


def test_frequency_k_splits_count_sorted_classes():
  part = P.build_partition(NAMES, COUNTS, strategy="frequency", k=4)
  # Sorted by count: b g d c h e a f -> 2 classes per group.
  assert part.cluster_names == ("head", "medium_1", "medium_2", "tail")
  assert _clusters(part) == {"head": {"b", "g"}, "medium_1": {"d", "c"},
                             "medium_2": {"h", "e"}, "tail": {"a", "f"}}
  q = P.build_partition(NAMES, COUNTS, strategy="frequency", k=3, quantiles=(0.25, 0.5))
  assert _clusters(q) == {"head": {"b", "g"}, "medium": {"d", "c"},
                          "tail": {"h", "e", "a", "f"}}


def test_ties_use_one_rarity_order():
  # Equal counts: the lower class index counts as rarer, both for the split and for assign().
  part = P.build_partition(("w", "x", "y", "z"), (5, 5, 5, 5), strategy="frequency", k=2)
  assert _clusters(part) == {"head": {"y", "z"}, "tail": {"w", "x"}}
  np.testing.assert_array_equal(part.assign(np.array([[1, 0, 0, 1], [0, 0, 1, 1]])), [1, 0])


@pytest.mark.parametrize("c,k", [(19, 3), (20, 4), (26, 5), (7, 7), (13, 2)])
def test_frequency_k_groups_are_contiguous_and_balanced(c, k):
  rng = np.random.default_rng(c * 10 + k)
  counts = rng.integers(1, 50, size=c)  # many ties
  names = [f"c{i}" for i in range(c)]
  part = P.build_partition(names, counts, strategy="frequency", k=k)
  ids = np.asarray(part.class_to_cluster)
  sizes = np.bincount(ids, minlength=k)
  assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
  for j in range(k - 1):  # every class of a more frequent group has >= count of the next group
    assert counts[ids == j].min() >= counts[ids == j + 1].max()


def test_healthy_and_healthy_frequency():
  names = ("No Finding",) + NAMES
  counts = (1000,) + COUNTS
  part = P.build_partition(names, counts, strategy="healthy")
  assert part.cluster_names == ("healthy", "findings")
  assert _clusters(part) == {"healthy": {"No Finding"}, "findings": set(NAMES)}
  part = P.build_partition(names, counts, strategy="healthy+frequency", k=3)
  assert part.cluster_names == ("healthy", "head", "tail")
  assert _clusters(part) == {"healthy": {"No Finding"}, "head": {"b", "g", "d", "c"},
                             "tail": {"h", "e", "a", "f"}}
  part = P.build_partition(names, counts, strategy="healthy+frequency", thresholds=(100, 20))
  assert part.num_clusters == 4
  assert _clusters(part)["tail"] == {"a", "f"}


def test_groups_both_mapping_forms_and_healthy_groups():
  by_group = {"x": ["a", "b", "c"], "y": ["d", "e"], "z": ["f", "g", "h"]}
  by_class = {c: g for g, cs in by_group.items() for c in cs}
  for mapping in (by_group, by_class):
    part = P.build_partition(NAMES, COUNTS, strategy="groups", groups=mapping, k=3)
    assert part.cluster_names == ("x", "y", "z")
    assert _clusters(part) == {g: set(cs) for g, cs in by_group.items()}
  names = ("No Finding",) + NAMES
  part = P.build_partition(names, (5,) + COUNTS, strategy="healthy+groups",
                           groups={**by_class, "No Finding": "normal"})
  assert part.cluster_names == ("healthy", "x", "y", "z")
  assert _clusters(part)["healthy"] == {"No Finding"}


def test_single_and_class_strategies():
  assert P.build_partition(NAMES, COUNTS, strategy="single").class_to_cluster == (0,) * 8
  part = P.build_partition(NAMES, COUNTS, strategy="class")
  assert part.cluster_names == NAMES and part.class_to_cluster == tuple(range(8))


@pytest.mark.parametrize("classes,c,k", [(class_lists.MIMIC_CXR_LT_CLASSES, 19, 7),
                                         (class_lists.NIH_CXR_LT_CLASSES, 20, 6),
                                         (class_lists.CXR_LT_2023_CLASSES, 26, 7)])
def test_default_anatomical_groups(classes, c, k):
  assert len(set(classes)) == len(classes) == c
  part = P.build_partition(classes, range(len(classes)), strategy="groups", groups="anatomical")
  assert part.num_clusters == k
  cluster = {c: part.cluster_names[i] for c, i in zip(part.class_names, part.class_to_cluster)}
  expected = {"No Finding": "healthy", "Cardiomegaly": "cardiac", "Effusion": "pleural",
              "Pleural Effusion": "pleural", "Pleural_Thickening": "pleural",
              "Pleural Thickening": "pleural", "Pneumothorax": "pleural",
              "Support Devices": "devices", "Hernia": "mediastinal",
              "Tortuous Aorta": "mediastinal", "Nodule": "parenchymal",
              "Lung Opacity": "parenchymal", "Edema": "parenchymal",
              "Fracture": "chest_wall_abdomen", "Pneumoperitoneum": "chest_wall_abdomen"}
  for c, g in expected.items():
    if c in cluster:
      assert cluster[c] == g, c
  hg = P.build_partition(classes, range(len(classes)), strategy="healthy+groups",
                         groups="anatomical")
  assert hg.cluster_names == part.cluster_names  # healthy is already its own group


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="groups", groups={"x": ["a", "b", "c", "d", "e", "f", "g", "h", "zz"]}),
     "'zz'"),
    (dict(strategy="groups", groups={"x": ["a", "b", "c", "d", "e", "f"]}), r"'g', 'h'"),
    (dict(strategy="groups", groups={"x": ["a", "b"], "y": ["b", "c"]}), "'b' is in both"),
    (dict(strategy="groups", groups={"x": list("abcdefgh"), "y": []}), "'y' lists no"),
    (dict(strategy="groups", groups="anatomic"), "'anatomic'"),
    (dict(strategy="groups"), "needs groups"),
    (dict(strategy="groups", groups={"x": list("abcd"), "y": list("efgh")}, k=3), "k=3"),
    (dict(strategy="frequency", k=9), "k=9"),
    (dict(strategy="class", k=9), "k=9"),
    (dict(strategy="frequency"), "need k or thresholds"),
    (dict(strategy="frequency", thresholds=(20, 100)), "decreasing"),
    (dict(strategy="frequency", thresholds=(1000, 600)), r"\['head', 'medium'\]"),
    (dict(strategy="frequency", thresholds=(100, 20), k=4), "k=4"),
    (dict(strategy="frequency", k=3, quantiles=(0.5,)), "quantiles"),
    (dict(strategy="frequency", k=2, thresholds=(100,), quantiles=(0.5,)), "not both"),
    (dict(strategy="healthy"), "'No Finding'"),
    (dict(strategy="frequency", k=2, groups="anatomical"), "groups is only"),
    (dict(strategy="head+tail"), "'head\\+tail'"),
])
def test_strategy_errors_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    P.build_partition(NAMES, COUNTS, **kwargs)


def test_partition_rejects_empty_cluster_and_bad_table():
  with pytest.raises(ValueError, match="'unused'"):
    P.Partition(("a", "b"), (0, 0), ("used", "unused"), (1, 2))
  with pytest.raises(ValueError, match="cluster 2"):
    P.Partition(("a", "b"), (0, 2), ("x", "y"), (1, 2))
  with pytest.raises(ValueError, match="duplicate class"):
    P.build_partition(("a", "a"), (1, 2), strategy="single")


# --- assignment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,k", [("frequency", 4), ("class", None)])
def test_rarest_label_rule_matches_python_loop(strategy, k):
  rng = np.random.default_rng(0)
  c, n = 12, 3000
  counts = rng.integers(0, 6, size=c) * 10  # ties on purpose: broken by lower class index
  names = [f"c{i}" for i in range(c)]
  part = P.build_partition(names, counts, strategy=strategy, k=k)
  k = part.num_clusters
  hot = (rng.random((n, c)) < rng.uniform(0.02, 0.4, size=c)).astype(np.int64)
  hot[hot.sum(1) == 0, rng.integers(0, c)] = 1
  expected = []
  for row in hot:
    positives = [j for j in range(c) if row[j] == 1]
    rarest = min(positives, key=lambda j: (counts[j], j))
    expected.append(part.class_to_cluster[rarest])
  got = part.assign(hot)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(part.assign(hot.astype(bool)), expected)
  np.testing.assert_array_equal(part.assign(hot.astype(np.float32)), expected)
  # Sample counts are counts of assigned samples, not summed class counts.
  with_counts = part.with_sample_counts(hot)
  assert with_counts.sample_counts == tuple(np.bincount(expected, minlength=k))
  assert sum(with_counts.sample_counts) == n


def test_assign_single_label_names_and_errors():
  part = P.build_partition(("No Finding",) + NAMES, (1000,) + COUNTS,
                           strategy="healthy+frequency", thresholds=(100, 20))
  ids = part.assign(np.array([0, 2, 1, 6]))  # No Finding, b, a, f
  np.testing.assert_array_equal(ids, [0, 1, 3, 3])
  np.testing.assert_array_equal(part.assign_names([["b", "a"], ["No Finding"], ["e", "c"]]),
                                [3, 0, 2])
  hot = np.zeros((3, 9), np.int8)
  hot[0, 2] = 1
  with pytest.raises(ValueError, match="no positive label.*row 1"):
    part.assign(hot)
  np.testing.assert_array_equal(part.assign(hot, fallback="healthy"), [1, 0, 0])
  np.testing.assert_array_equal(part.assign(hot, fallback=3), [1, 3, 3])
  with pytest.raises(ValueError, match="'sick'"):
    part.assign(hot, fallback="sick")
  with pytest.raises(ValueError, match="label 9 at row 1"):
    part.assign(np.array([0, 9]))
  with pytest.raises(ValueError, match="integer class indices"):
    part.assign(np.array([0.0, 1.0]))
  hot[1, 4] = -1
  with pytest.raises(ValueError, match="row 1, class 'd' has -1 .*uncertain"):
    part.assign(hot)
  with pytest.raises(ValueError, match=r"\[N, 9\]"):
    part.assign(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="'zz'"):
    part.assign_names([["zz"]])


# --- JSON ---------------------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  hot = rng.random((200, 9)) < 0.3
  hot[:, 0] |= ~hot.any(1)
  part = P.build_partition(("No Finding",) + NAMES, hot.sum(0), strategy="healthy+frequency",
                           k=3, labels=hot)
  d = part.to_json()
  assert [c["id"] for c in d["clusters"]] == [0, 1, 2]
  assert d["clusters"][0] == {"id": 0, "name": "healthy", "classes": ["No Finding"],
                              "count": int(np.sum(part.assign(hot) == 0))}
  assert d["class_to_cluster"]["No Finding"] == 0
  assert d["class_counts"] == dict(zip(part.class_names, map(int, hot.sum(0))))
  assert P.Partition.from_json(json.loads(json.dumps(d))) == part
  part.save(tmp_path / "p.json")
  assert P.Partition.load(tmp_path / "p.json") == part
  plain = P.build_partition(NAMES, COUNTS, strategy="frequency", k=2)
  assert plain.to_json()["counts_from"] == "class_counts"
  assert P.Partition.from_json(plain.to_json()) == plain
  bad = dict(d, clusters=d["clusters"][::-1])
  with pytest.raises(ValueError, match="clusters\\[0\\] has id 2"):
    P.Partition.from_json(bad)
  (tmp_path / "bad.json").write_text("{oops")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    P.Partition.load(tmp_path / "bad.json")


# --- label tables and the CLI -------------------------------------------------------------------

def _write_csv(path, header, rows):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


CXR_HEADER = ["subject_id", "study_id", "dicom_id", "path", "No Finding", "Edema", "Mass",
              "Hernia"]
CXR_ROWS = [
    [1, 10, "d1", "files/p1.jpg", "1", "0", "0", "0"],
    [2, 20, "d2", "files/p2.jpg", "0", "1", "", "0"],
    [3, 30, "d3", "files/p3.jpg", "0", "1.0", "1", "0"],
    [4, 40, "d4", "files/p4.jpg", "0", "1", "1", "1"],
    [5, 50, "d5", "files/p5.jpg", "0", "-1", "1", "0"],
]


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_read_cxr_lt_table_and_uncertain(tmp_path, suffix):
  path = _write_csv(tmp_path / f"t{suffix}", CXR_HEADER, CXR_ROWS)
  with pytest.raises(ValueError, match=f"{path}:6: column 'Edema' is -1"):
    label_tables.read_label_table(path)
  ones = label_tables.read_label_table(path, uncertain="ones")
  assert ones.class_names == ("No Finding", "Edema", "Mass", "Hernia")
  np.testing.assert_array_equal(ones.labels, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0],
                                              [0, 1, 1, 1], [0, 1, 1, 0]])
  np.testing.assert_array_equal(ones.lines, [2, 3, 4, 5, 6])
  assert ones.columns["dicom_id"] == ["d1", "d2", "d3", "d4", "d5"]
  for policy in ("zeros", "ignore"):
    np.testing.assert_array_equal(label_tables.read_label_table(path, uncertain=policy).labels[4],
                                  [0, 0, 1, 0])
  sub = label_tables.read_label_table(path, classes=["Mass", "Edema"], uncertain="zeros")
  np.testing.assert_array_equal(sub.labels[:, 0], [0, 0, 1, 1, 1])


def test_cli_cxr_lt_table(tmp_path):
  path = _write_csv(tmp_path / "t.csv.gz", CXR_HEADER, CXR_ROWS)
  out = tmp_path / "part.json"
  d = json.loads(cli.run(path, strategy="healthy+frequency", k=3, uncertain="ones", as_json=True,
                       out=str(out)))
  # Class counts: No Finding 1, Edema 4, Mass 3, Hernia 1 -> head {Edema, Mass}, tail {Hernia}.
  # Rarest label per row: NF, Edema, Mass, Hernia, Mass -> healthy 1, head 3, tail 1.
  assert [(c["name"], c["classes"], c["count"]) for c in d["clusters"]] == [
      ("healthy", ["No Finding"], 1), ("head", ["Edema", "Mass"], 3), ("tail", ["Hernia"], 1)]
  assert d["class_to_cluster"] == {"No Finding": 0, "Edema": 1, "Mass": 1, "Hernia": 2}
  assert P.Partition.load(out).to_json() == {k: d[k] for k in P.Partition.load(out).to_json()}
  # Counts 1, 3, 3, 1: head (> 2) {Edema, Mass}; rows NF, Edema, Edema=Mass tie -> Edema,
  # Hernia, Mass -> head 3 of 5.
  text = cli.run(path, strategy="frequency", thresholds=(2,), uncertain="zeros")
  assert "5 samples" in text and "Edema (3)" in text and "60.00%" in text


def test_cli_nih_table_and_empty_rows(tmp_path):
  rows = [["00001.png", "No Finding", 0], ["00002.png", "Mass|Hernia", 1],
          ["00003.png", "Edema", 0], ["00004.png", "Edema|Mass", 2], ["00005.png", "", 0]]
  path = _write_csv(tmp_path / "nih.csv", ["Image Index", "Finding Labels", "Follow-up #"], rows)
  table = label_tables.read_label_table(path, label_column="Finding Labels")
  assert table.class_names == ("Edema", "Hernia", "Mass", "No Finding")
  np.testing.assert_array_equal(table.labels, [[0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0],
                                               [1, 0, 1, 0], [0, 0, 0, 0]])
  assert table.columns["Image Index"][1] == "00002.png"
  with pytest.raises(ValueError, match=f"{path}:6: row has no positive label"):
    cli.run(path, strategy="healthy", label_column="Finding Labels")
  d = json.loads(cli.run(path, strategy="healthy", empty="healthy", as_json=True))
  assert [c["count"] for c in d["clusters"]] == [2, 3]
  d = json.loads(cli.run(path, strategy="healthy", empty="drop", as_json=True))
  assert [c["count"] for c in d["clusters"]] == [1, 3] and d["dropped_empty_rows"] == 1
  with pytest.raises(ValueError, match=r"no label column 'Labels' \(did you mean 'Finding Labels'\?\); "
                     r"columns are \['Image Index'"):
    label_tables.read_label_table(path, label_column="Labels")
  with pytest.raises(ValueError, match=f"{path}:3: .*finding 'Hernia'"):
    label_tables.read_label_table(path, classes=["No Finding", "Edema", "Mass"])
  groups = tmp_path / "g.json"
  groups.write_text(json.dumps({"lung": ["Edema", "Mass"], "other": ["Hernia"]}))
  d = json.loads(cli.run(path, strategy="healthy+groups", groups=str(groups), empty="drop",
                       as_json=True))
  assert [(c["name"], c["count"]) for c in d["clusters"]] == [("healthy", 1), ("lung", 2),
                                                               ("other", 1)]


@pytest.mark.parametrize("row,match", [
    (["1", "10", "d", "p", "1", "0"], "t.csv:3: expected 8 fields as in the header, got 6"),
    (["1", "10", "d", "p", "1", "0", "2", "0"], "t.csv:3: column 'Mass' has value '2'"),
    (["1", "10", "d", "p", "1", "abc", "0", "0"], "t.csv:3: column 'Edema' has value 'abc'"),
])
def test_bad_rows_name_file_line_column(tmp_path, row, match):
  path = _write_csv(tmp_path / "t.csv", CXR_HEADER, [CXR_ROWS[0], row, CXR_ROWS[1]])
  with pytest.raises(ValueError, match=match):
    label_tables.read_label_table(path)


def test_malformed_csv_and_unknown_label_column(tmp_path):
  path = tmp_path / "q.csv"
  path.write_text("id,A,B\n1,0,1\n2,\"1\"x,0\n")
  with pytest.raises(ValueError, match="q.csv:3: malformed CSV"):
    label_tables.read_label_table(str(path))
  path.write_text("id,Sex2,Mass\n1,M,1\n")
  with pytest.raises(ValueError, match="q.csv: column 'Sex2' is not a class of nih_cxr_lt"):
    label_tables.read_label_table(str(path))
  with pytest.raises(ValueError, match="q.csv:2: column 'Sex2' has value 'M'; expected 1, 0"):
    label_tables.read_label_table(str(path), classes=["Sex2", "Mass"])
  (tmp_path / "e.csv").write_text("")
  with pytest.raises(ValueError, match="e.csv: empty file"):
    label_tables.read_label_table(str(tmp_path / "e.csv"))


def _fabricate_large(tmp_path, n=150_000):
  rng = np.random.default_rng(0)
  classes = class_lists.CXR_LT_2023_CLASSES
  hot = rng.random((n, len(classes))) < 0.3 / (1 + np.arange(len(classes)))
  nf = classes.index("No Finding")
  hot[~hot.any(1), nf] = True
  cxr = tmp_path / "cxr_lt.csv.gz"
  with gzip.open(cxr, "wt", newline="") as f:
    f.write(",".join(["dicom_id", "subject_id", "study_id", "path", *classes]) + "\n")
    f.write("".join(f"d{i},{i},{i},files/d{i}.jpg,{','.join(r)}\n"
                    for i, r in enumerate(hot.astype(np.uint8).astype(str))))
  nih = tmp_path / "Data_Entry.csv"
  names = np.asarray(classes, dtype=object)
  with open(nih, "w", newline="") as f:
    f.write("Image Index,Finding Labels,Follow-up #,Patient ID\n")
    f.write("".join(f"{i:08d}.png,{'|'.join(names[r])},0,{i}\n" for i, r in enumerate(hot)))
  return hot, str(cxr), str(nih)


def test_large_tables_through_cli(tmp_path):
  hot, cxr, nih = _fabricate_large(tmp_path)
  classes = class_lists.CXR_LT_2023_CLASSES
  expected_ids = None
  for path, kw in ((cxr, {}), (nih, dict(classes=list(classes)))):
    start = time.perf_counter()
    d = json.loads(cli.run(path, strategy="healthy+frequency", k=4, as_json=True, **kw))
    print(f"\n{os.path.basename(path)}: {len(hot)} rows in {time.perf_counter() - start:.2f} s")
    assert d["class_counts"] == dict(zip(classes, map(int, hot.sum(0))))
    part = P.Partition.from_json(d)
    # Independent count of the rarest-label rule, vectorised differently from assign():
    # overwrite from the most to the least frequent class so the rarest positive wins.
    counts = hot.sum(0)
    ids = np.full(len(hot), -1)
    for j in sorted(range(len(classes)), key=lambda j: (counts[j], j), reverse=True):
      ids[hot[:, j]] = part.class_to_cluster[j]
    assert [c["count"] for c in d["clusters"]] == np.bincount(ids, minlength=4).tolist()
    if expected_ids is not None:
      assert d["class_to_cluster"] == expected_ids
    expected_ids = d["class_to_cluster"]


def test_module_cli_subprocess(tmp_path):
  path = _write_csv(tmp_path / "t.csv", CXR_HEADER, CXR_ROWS)
  out = tmp_path / "p.json"
  cmd = [sys.executable, "-m", "grasp_jax.partition", f"--labels={path}", "--strategy=frequency",
         "--k=2", "--uncertain=ones", "--json", f"--out={out}"]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
  d = json.loads(res.stdout)
  assert d["clusters"][0]["name"] == "head" and sum(c["count"] for c in d["clusters"]) == 5
  assert P.Partition.load(out).num_clusters == 2
  res = subprocess.run(cmd[:4] + ["--thresholds=x"], capture_output=True, text=True, cwd=ROOT)
  assert res.returncode == 1 and "--thresholds must be numbers" in res.stderr
  res = subprocess.run(cmd[:4], capture_output=True, text=True, cwd=ROOT)
  assert res.returncode == 1 and "t.csv:6: column 'Edema' is -1" in res.stderr


def test_random_strategy_deals_classes_into_k_clusters():
  names = tuple(f"c{i}" for i in range(10))
  counts = tuple(range(100, 0, -10))
  part = P.build_partition(names, counts, strategy="healthy+random", k=4, healthy="c0", seed=3)
  assert part.cluster_names == ("healthy", "random_0", "random_1", "random_2")
  sizes = sorted(len(part.classes_of(c)) for c in range(1, 4))
  assert sizes == [3, 3, 3] and part.classes_of(0) == ("c0",)
  # Seeded: the same seed gives the same table, another seed (here) another one.
  again = P.build_partition(names, counts, strategy="healthy+random", k=4, healthy="c0", seed=3)
  other = P.build_partition(names, counts, strategy="healthy+random", k=4, healthy="c0", seed=4)
  assert again.class_to_cluster == part.class_to_cluster != other.class_to_cluster
  with pytest.raises(ValueError, match="leaves 11 clusters for 9 classes"):
    P.build_partition(names, counts, strategy="healthy+random", k=12, healthy="c0")
