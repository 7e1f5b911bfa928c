"""Strict label inputs: what the partition CLI and the builders refuse instead of misreading.

Label CSVs: a `.gz` name on plain text, a header without rows, a stray 0/1 column, a misspelt
class column or finding. Split files: an image listed twice in one split or in two splits.
"""
import csv
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data as fx
from grasp_jax.data import labels as label_tables
from grasp_jax.data import pipeline
from grasp_jax.data.builders import imagenet_lt
from grasp_jax.data.builders import manual_dir
from grasp_jax.partition import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NIH = ["No Finding", "Effusion", "Mass", "Hernia"]  # Classes of NIH-CXR-LT, not of MIMIC-CXR-LT.
ROWS = [["a.png", 1, 0, 0, 0], ["b.png", 0, 1, 1, 0], ["c.png", 0, 1, 0, 0]]


def _csv(path, header, rows, opener=open):
  with opener(path, "wt", newline="") as f:
    csv.writer(f).writerows([header, *rows])
  return os.fspath(path)


# --- label CSVs -----------------------------------------------------------------------------------

def test_compression_is_told_by_content(tmp_path):
  fake = tmp_path / "t.csv.gz"
  fake.write_text("not gzip\n")
  with pytest.raises(ValueError, match=r"t\.csv\.gz: named \.gz but is not gzip-compressed"):
    cli.run(os.fspath(fake), strategy="single")
  # gzip content under a plain name is read as gzip.
  path = _csv(tmp_path / "z.csv", ["id", *NIH], ROWS, opener=gzip.open)
  assert json.loads(cli.run(path, strategy="single", as_json=True))["num_samples"] == 3


def test_no_samples_is_an_error(tmp_path):
  path = _csv(tmp_path / "h.csv", ["id", *NIH], [])
  with pytest.raises(ValueError, match=r"h\.csv: no data rows \(only a header\)"):
    cli.run(path, strategy="single")
  path = _csv(tmp_path / "e.csv", ["id", *NIH], [["a.png", 0, 0, 0, 0], ["b.png", 0, 0, 0, 0]])
  with pytest.raises(ValueError, match=r"e\.csv: none of the 2 rows has a positive label"):
    cli.run(path, strategy="single", empty="drop")


def test_extra_column_needs_ignore_columns(tmp_path):
  path = _csv(tmp_path / "f.csv", ["id", *NIH, "fold"], [r + [i % 2] for i, r in enumerate(ROWS)])
  with pytest.raises(ValueError, match=r"f\.csv: column 'fold' is not a class of nih_cxr_lt "
                                       r"\(recognised from the file.*--ignore_columns=fold"):
    cli.run(path, strategy="single")
  d = json.loads(cli.run(path, strategy="single", ignore_columns=["fold"], as_json=True))
  assert d["class_counts"] == {"No Finding": 1, "Effusion": 2, "Mass": 1, "Hernia": 0}
  assert d["dataset"] == "nih_cxr_lt"
  with pytest.raises(ValueError, match=r"--ignore_columns 'flod' \(did you mean 'fold'\?\) is "
                                       "not a column"):
    cli.run(path, strategy="single", ignore_columns=["flod"])


def test_misspelt_class_column_did_you_mean(tmp_path):
  path = _csv(tmp_path / "m.csv", ["id", "No Finding", "Efusion", "Mass", "Hernia"], ROWS)
  with pytest.raises(ValueError, match=r"m\.csv: column 'Efusion' \(did you mean 'Effusion'\?\) "
                                       r"is not a class of nih_cxr_lt"):
    cli.run(path, strategy="single")
  # Named explicitly, the classes are whatever the user says.
  d = json.loads(cli.run(path, strategy="single", classes=["Efusion", "Mass"], empty="drop",
                         as_json=True))
  assert d["class_counts"] == {"Efusion": 2, "Mass": 1} and d["dataset"] is None
  with pytest.raises(ValueError, match=r"--classes 'Efusion' \(did you mean 'Effusion'\?\) is "
                                       r"not a class of nih_cxr_lt \(--dataset\)"):
    cli.run(path, strategy="single", classes=["Efusion"], dataset="nih_cxr_lt")


def test_dataset_named_recognised_or_unknown(tmp_path):
  path = _csv(tmp_path / "d.csv", ["id", *NIH], ROWS)
  with pytest.raises(ValueError, match=r"columns 'Effusion' \(did you mean 'Pleural Effusion'\?\)"
                                       r", 'Mass', 'Hernia' are not classes of "
                                       r"mimic_cxr_lt/cxr_lt_2022 \(--dataset\)"):
    cli.run(path, strategy="single", dataset="mimic_cxr_lt/cxr_lt_2022")
  with pytest.raises(ValueError, match=r"unknown dataset 'nih_cxr' \(did you mean "
                                       r"'nih_cxr_lt'\?\)"):
    label_tables.read_label_table(path, dataset="nih_cxr")
  other = _csv(tmp_path / "o.csv", ["id", "cat", "dog"], [["a", 1, 0]])
  with pytest.raises(ValueError, match=r"o\.csv: the label columns \['cat', 'dog'\] match no "
                                       r"known class list.*pass --classes"):
    label_tables.read_label_table(other)
  assert label_tables.read_label_table(other, classes=["dog", "cat"]).class_names == ("dog", "cat")
  # A MIMIC-CXR-LT file (19 classes) is also inside CXR-LT 2023's 26: the shorter list wins.
  classes = list(fx.MIMIC_2022_FILE_COLUMNS)
  mimic = _csv(tmp_path / "mimic.csv", ["dicom_id", *classes], [["d1", 1] + [0] * 18])
  assert label_tables.read_label_table(mimic).dataset == "mimic_cxr_lt/cxr_lt_2022"


def test_findings_outside_the_class_list_name_file_line_value(tmp_path):
  rows = [["a.png", "No Finding", 0], ["b.png", "Mass|Hernia", 1], ["c.png", "Efusion|Mass", 0]]
  path = _csv(tmp_path / "nih.csv", ["Image Index", "Finding Labels", "Follow-up #"], rows)
  with pytest.raises(ValueError, match=r"nih\.csv:4: column 'Finding Labels' has finding "
                                       r"'Efusion' \(did you mean 'Effusion'\?\), which is not a "
                                       r"class of nih_cxr_lt"):
    cli.run(path, strategy="single", label_column="Finding Labels")
  rows[2][1] = "Effusion|Mass"
  path = _csv(tmp_path / "nih.csv", ["Image Index", "Finding Labels", "Follow-up #"], rows)
  table = label_tables.read_label_table(path, label_column="Finding Labels")
  assert table.class_names == ("Effusion", "Hernia", "Mass", "No Finding")
  assert table.dataset == "nih_cxr_lt"


def test_module_flags(tmp_path):
  path = _csv(tmp_path / "f.csv", ["id", *NIH, "fold"], [r + [0] for r in ROWS])
  cmd = [sys.executable, "-m", "grasp_jax.partition", f"--labels={path}", "--strategy=single",
         "--json"]
  res = subprocess.run(cmd + ["--ignore_columns=fold", "--dataset=nih_cxr_lt"],
                       capture_output=True, text=True, cwd=ROOT, check=True)
  assert json.loads(res.stdout)["num_samples"] == 3
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert res.returncode == 1 and "column 'fold' is not a class" in res.stderr


# --- split files ----------------------------------------------------------------------------------

def _splits(**keys):
  return {s: (f"{s}.csv", k, list(range(2, 2 + len(k)))) for s, k in keys.items()}


def test_disjoint_splits_duplicates_and_leakage():
  with pytest.raises(ValueError, match=r"train\.csv:4: duplicate row: 'a' is already on line 2"):
    manual_dir.disjoint_splits(_splits(train=["a", "b", "a"]), drop_overlapping=False, stats={})
  splits = _splits(train=["a", "b", "c"], val=["d", "b"], test=["b", "e", "a"])
  with pytest.raises(ValueError, match=r"3 images are listed in more than one split \(leakage\), "
                                       r"e\.g\. 'a' in 'train' \(train\.csv:2\) and in 'test' "
                                       r"\(test\.csv:4\)"):
    manual_dir.disjoint_splits(splits, drop_overlapping=False, stats={})
  stats = {}
  keep = manual_dir.disjoint_splits(splits, drop_overlapping=True, stats=stats)
  # Each shared image stays in its last split only.
  kept = {s: [k for k, m in zip(splits[s][1], keep[s]) if m] for s in splits}
  assert kept == {"train": ["c"], "val": ["d"], "test": ["b", "e", "a"]}
  assert {s: (v["dropped_overlapping"], v["dropped_overlapping_ids"]) for s, v in stats.items()} \
      == {"train": (2, ["a", "b"]), "val": (1, ["b"]), "test": (0, [])}
  with pytest.raises(ValueError, match="split 'val' has no images left"):
    manual_dir.disjoint_splits(_splits(val=["b"], test=["b"]), drop_overlapping=True, stats={})


def _append_row(path, row):
  with open(path, "a", newline="") as f:
    csv.writer(f).writerow(row)


def _nih_row(manual, split, i):
  with open(manual / f"nih-lt_single-label_{split}.csv", newline="") as f:
    return list(csv.reader(f))[i]


def test_nih_duplicate_row_names_file_line(tmp_path):
  manual = tmp_path / "manual"
  fx.make_nih_dir(manual)
  _append_row(manual / "nih-lt_single-label_train.csv", _nih_row(manual, "train", 2))
  with pytest.raises(ValueError, match=r"nih-lt_single-label_train\.csv:10: duplicate row: "
                                       r"'00000002_000\.png' is already on line 3"):
    pipeline.load_builder("nih_cxr_lt", os.fspath(tmp_path / "data"), build=True,
                          manual_dir=os.fspath(manual))


def test_nih_image_in_two_splits_refused_or_dropped(tmp_path):
  manual = tmp_path / "manual"
  rows = fx.make_nih_dir(manual)
  shared = rows["train"][0].key
  _append_row(manual / "nih-lt_single-label_test.csv", _nih_row(manual, "train", 1))
  data = os.fspath(tmp_path / "data")
  with pytest.raises(ValueError, match=rf"1 image is listed in more than one split \(leakage\), "
                                       rf"e\.g\. '{shared}' in 'train' \(.*train\.csv:2\) and in "
                                       rf"'test' \(.*test\.csv:4\).*drop_overlapping_images"):
    pipeline.load_builder("nih_cxr_lt", data, build=True, manual_dir=os.fspath(manual))
  builder = pipeline.load_builder("nih_cxr_lt", data, build=True, manual_dir=os.fspath(manual),
                                  options={"resolution": 16, "drop_overlapping_images": True})
  assert builder.builder_config.name == "r16_drop_overlapping_images"
  source = {s: builder.as_data_source(split=s) for s in ("train", "test")}
  ids = {s: {source[s][i]["id"].decode() for i in range(len(source[s]))} for s in source}
  assert shared in ids["test"] and shared not in ids["train"]
  assert ids["train"] == {r.key for r in rows["train"]} - {shared}
  stats = builder.info.metadata["splits"]
  assert stats["train"]["dropped_overlapping_ids"] == [shared]
  assert stats["test"]["dropped_overlapping"] == 0
  # The train counts and primary labels are those of what was written.
  np.testing.assert_array_equal(
      stats["train"]["class_counts"],
      list(builder.info.metadata["train_class_counts"].values()))


def test_mimic_and_imagenet_check_their_splits(tmp_path):
  rows = fx.make_mimic_dir(tmp_path / "mimic", with_reports=False)
  labels = tmp_path / "mimic" / "labels"
  with open(labels / "mimic-cxr-lt_single-label_train.csv", newline="") as f:
    first = list(csv.reader(f))[1]
  _append_row(labels / "mimic-cxr-lt_single-label_balanced-val.csv", first)
  with pytest.raises(ValueError, match=rf"'{rows['cxr_lt_2022']['train'][0].key}' in 'train' "
                                       r"\(.*train\.csv:2\) and in 'balanced_val'"):
    pipeline.load_builder("mimic_cxr_lt/cxr_lt_2022", os.fspath(tmp_path / "data"), build=True,
                          manual_dir=os.fspath(tmp_path / "mimic"))
  imagenet = fx.make_imagenet_dir(tmp_path / "imagenet")
  with open(tmp_path / "imagenet" / "ImageNet_LT" / "ImageNet_LT_train.txt", "a") as f:
    f.write(f"./{imagenet['train'][0].key} 0\n")  # The same file, written differently.
  config = imagenet_lt.ImagenetLtConfig(name="tiny", resolution=16, num_classes=4)
  builder = tfds.builder("imagenet_lt_t2i", config=config, data_dir=os.fspath(tmp_path / "data"))
  with pytest.raises(ValueError, match=r"ImageNet_LT_train\.txt:8: duplicate row: .* is already "
                                       "on line 1"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(tmp_path / "imagenet")))
