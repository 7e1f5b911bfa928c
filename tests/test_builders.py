"""TFDS builders, built from fabricated miniature manual dirs with the official layouts."""
import csv
import dataclasses
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data as fx
import grasp_jax.data.builders  # pylint: disable=unused-import  (registers the builders)
from grasp_jax.data import pipeline
from grasp_jax.data.builders import base
from grasp_jax.data.builders import fashion_mnist_lt
from grasp_jax.data.builders import specs
from grasp_jax.data.builders import imagenet_lt
from grasp_jax.data.builders import mimic_cxr_lt
from grasp_jax.data.builders import nih_cxr_lt
from grasp_jax.data import prompts

# NIH ChestX-ray14 single-label counts of the ten most frequent labels, most frequent first.
NIH_COUNTS = [60361, 9547, 4215, 3955, 2705, 2194, 2139, 1310, 1126, 1093]
FMNIST_REAL_DIR = os.environ.get("FMNIST_DIR") or "/usr/share/datasets/fashion-mnist"


def build(name, data_dir, manual=None, **kwargs):
  builder = tfds.builder(name, data_dir=os.fspath(data_dir), **kwargs)
  config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual)) if manual else None
  builder.download_and_prepare(download_config=config)
  return builder


def read_split(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def by_id(examples):
  return {e["id"].decode(): e for e in examples}


def check_images_follow_labels(examples, rows, columns, label_names):
  """Each image's grey level encodes its row's first class (see fixtures_data)."""
  rows = {r.key: r for r in rows}
  for key, e in by_id(examples).items():
    k = columns.index(rows[key].classes[0])
    assert abs(float(e["image"][..., 0].mean()) - fx.class_intensity(k)) < 4, key
    assert e["class_name"].decode().split("|")[0] in label_names


# ---------------------------------------------------------------------------- fashion_mnist_lt.

def expected_profile(head):
  return [max(1, head * n // NIH_COUNTS[0]) for n in NIH_COUNTS]


def test_profile_formula_matches_published_counts():
  assert expected_profile(6000) == [6000, 948, 418, 393, 268, 218, 212, 130, 111, 108]
  assert fashion_mnist_lt.profile_counts(6000) == expected_profile(6000)


def test_fashion_small_from_fabricated_idx(tmp_path, monkeypatch):
  src = fx.make_fmnist_dir(tmp_path / "idx", [620] + [110] * 9, 60)
  monkeypatch.setenv("FMNIST_DIR", os.fspath(tmp_path / "idx"))
  builder = build("fashion_mnist_lt/small", tmp_path / "data")
  names = builder.info.features["label"].names
  assert names == list(fashion_mnist_lt.CLASS_NAMES)
  splits = {s: read_split(builder, s) for s in ("train", "val", "test")}

  counts = np.bincount([e["label"] for e in splits["train"]], minlength=10)
  np.testing.assert_array_equal(counts, expected_profile(600))
  np.testing.assert_array_equal(np.bincount([e["label"] for e in splits["val"]]), [10] * 10)
  np.testing.assert_array_equal(np.bincount([e["label"] for e in splits["test"]]), [50] * 10)
  train_ids, val_ids = set(by_id(splits["train"])), set(by_id(splits["val"]))
  assert not train_ids & val_ids

  for split, source in (("train", "train"), ("val", "train"), ("test", "test")):
    images, labels = src[source]
    for e in splits[split]:
      prefix, idx = e["id"].decode().split("_")
      assert prefix == ("t10k" if source == "test" else "train")
      i = int(idx)
      np.testing.assert_array_equal(e["image"][..., 0], images[i])  # PNG is lossless
      assert e["label"] == labels[i]
      np.testing.assert_array_equal(e["labels"], np.eye(10)[labels[i]])
      assert e["class_name"].decode() == names[labels[i]]

  prompts = {e["prompt"].decode() for e in splits["test"]}
  assert "a photo of a t-shirt/top" in prompts and "an ankle boot" in " ".join(prompts)
  meta = builder.info.metadata
  assert meta["seed"] == 0 and meta["head_count"] == 600
  assert list(meta["train_counts"].values()) == expected_profile(600)
  assert meta["nih_profile_class"]["T-shirt/top"] == "No Finding"
  assert "seed 0" in builder.info.description and "Ankle boot" in builder.info.description


def test_fashion_subsample_is_seeded():
  labels = np.repeat(np.arange(10), 30)
  a = fashion_mnist_lt.subsample(labels, [20] * 10, seed=1, spare_per_class=5)
  b = fashion_mnist_lt.subsample(labels, [20] * 10, seed=1, spare_per_class=5)
  c = fashion_mnist_lt.subsample(labels, [20] * 10, seed=2, spare_per_class=5)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_fashion_missing_files_say_how_to_install(tmp_path, monkeypatch):
  monkeypatch.delenv("FMNIST_DIR", raising=False)
  monkeypatch.setattr(fashion_mnist_lt, "DEBIAN_PACKAGE", "no-such-package-grasp-test")
  monkeypatch.setattr(fashion_mnist_lt, "DEFAULT_DIR", os.fspath(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="apt-get install no-such-package-grasp-test"):
    fashion_mnist_lt.fmnist_dir()
  monkeypatch.setenv("FMNIST_DIR", os.fspath(tmp_path))
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz does not exist"):
    build("fashion_mnist_lt/small", tmp_path / "data")


def test_fashion_bad_idx_magic(tmp_path, monkeypatch):
  fx.make_fmnist_dir(tmp_path, [620] + [110] * 9, 60)
  fx.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((5, 2, 2), np.uint8))
  monkeypatch.setenv("FMNIST_DIR", os.fspath(tmp_path))
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: IDX magic number 2051"):
    build("fashion_mnist_lt/small", tmp_path / "data")


@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST_REAL_DIR, "train-images-idx3-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_real_train_counts(tmp_path):
  # The default profile with tiny val/test splits: ~8.8k 28x28 images, a few seconds.
  config = fashion_mnist_lt.FashionMnistLtConfig(name="counts_check", val_per_class=1,
                                                 test_per_class=1)
  builder = build("fashion_mnist_lt", tmp_path, config=config)
  source = builder.as_data_source(split="train",
                                  decoders={"image": tfds.decode.SkipDecoding()})
  train = source.__getitems__(list(range(len(source))))
  counts = np.bincount([e["label"] for e in train], minlength=10)
  np.testing.assert_array_equal(counts, expected_profile(6000))
  assert len(train) == 8806
  images, labels = fashion_mnist_lt.load_split(FMNIST_REAL_DIR, "train")
  decode = builder.info.features["image"].decode_example_np
  for e in train[:50]:
    i = int(e["id"].decode().split("_")[1])
    np.testing.assert_array_equal(decode(e["image"])[..., 0], images[i])
    assert e["label"] == labels[i]


# ---------------------------------------------------------------------------- mimic_cxr_lt.

@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
  root = tmp_path_factory.mktemp("mimic")
  rows = fx.make_mimic_dir(root / "manual")
  builders = {c: build("mimic_cxr_lt", root / "data", root / "manual",
                       config=dataclasses.replace(mimic_cxr_lt.MimicCxrLt.builder_configs[c],
                                                  name=f"{c}_r16", resolution=16))
              for c in ("cxr_lt_2022", "cxr_lt_2023")}
  return root, rows, builders


def test_mimic_2022_splits_labels_images(mimic):
  _, rows, builders = mimic
  builder = builders["cxr_lt_2022"]
  names = builder.info.features["label"].names
  assert len(names) == 19 and builder.info.features["image"].shape == (16, 16, 1)
  assert set(builder.info.splits) == {"train", "balanced_val", "balanced_test", "test"}
  for split, want in rows["cxr_lt_2022"].items():
    got = by_id(read_split(builder, split))
    assert set(got) == {r.key for r in want}
    for r in want:
      e = got[r.key]
      assert names[e["label"]] == r.classes[0]
      assert [names[i] for i in np.flatnonzero(e["labels"])] == r.classes
      assert e["class_name"].decode() == r.classes[0]
    check_images_follow_labels(got.values(), want, fx.MIMIC_2022_FILE_COLUMNS, names)
  train_counts = builder.info.metadata["train_class_counts"]
  assert train_counts["No Finding"] == 5 and train_counts["Cardiomegaly"] == 2
  assert builder.info.metadata["splits"]["train"]["class_counts"] == list(train_counts.values())


def test_mimic_prompts_impression_or_template(mimic):
  _, rows, builders = mimic
  builder = builders["cxr_lt_2022"]
  train = rows["cxr_lt_2022"]["train"]
  got = by_id(read_split(builder, "train"))
  assert got[train[0].key]["prompt"].decode() == fx.REPORT_IMPRESSION_TEXT
  # A report without IMPRESSION and no report at all both fall back to the label template.
  assert got[train[1].key]["prompt"].decode() == "chest x-ray showing cardiomegaly"
  nf = next(r for r in train if r.classes == ["No Finding"])
  assert got[nf.key]["prompt"].decode() == "normal chest x-ray"
  pe = [e for e in got.values() if e["class_name"] == b"Enlarged Cardiomediastinum"]
  assert pe[0]["prompt"].decode() == "chest x-ray showing enlarged cardiomediastinum"
  sources = builder.info.metadata["splits"]["train"]["prompt_sources"]
  assert sources == {"impression": 1, "template_no_impression": 1, "template": len(train) - 2}


def test_mimic_2023_multi_label_primary_is_rarest(mimic):
  _, rows, builders = mimic
  builder = builders["cxr_lt_2023"]
  names = builder.info.features["label"].names
  assert len(names) == 26 and builder.info.metadata["multi_label"]
  train_counts = {}
  for r in rows["cxr_lt_2023"]["train"]:
    for c in r.classes:
      train_counts[c] = train_counts.get(c, 0) + 1
  for split, want in rows["cxr_lt_2023"].items():
    got = by_id(read_split(builder, split))
    assert set(got) == {r.key for r in want}
    for r in want:
      e = got[r.key]
      assert {names[i] for i in np.flatnonzero(e["labels"])} == set(r.classes)
      # Rarest positive by train count; ties -> lower class index (independent loop).
      best = min(r.classes, key=lambda c: (train_counts.get(c, 0), names.index(c)))
      assert names[e["label"]] == best
      positives = [c for c in names if c in r.classes and c != "No Finding"]
      if positives:
        assert e["prompt"].decode().startswith("chest x-ray showing ")
        for c in positives:
          assert c.lower() in e["prompt"].decode()
    check_images_follow_labels(got.values(), want, fx.CXR_LT_2023_COLUMNS, names)
  dev = by_id(read_split(builder, "development"))
  edema_cardio = dev[rows["cxr_lt_2023"]["development"][0].key]
  assert edema_cardio["prompt"].decode() == "chest x-ray showing cardiomegaly and edema"
  assert edema_cardio["class_name"].decode() == "Cardiomegaly|Edema"


def test_impression_parser():
  assert mimic_cxr_lt.impression(fx.REPORT_WITH_IMPRESSION) == fx.REPORT_IMPRESSION_TEXT
  assert mimic_cxr_lt.impression(fx.REPORT_WITHOUT_IMPRESSION) is None
  assert mimic_cxr_lt.impression("IMPRESSION:  \n\nRECOMMENDATION(S): none") is None
  assert mimic_cxr_lt.impression(" IMPRESSIONS: No acute process.") == "No acute process."


def test_prompt_templates():
  assert prompts.findings_prompt(["No Finding"]) == "normal chest x-ray"
  assert prompts.findings_prompt(["No Finding", "Support Devices"]) == (
      "chest x-ray showing support devices")
  assert prompts.findings_prompt(["Cardiomegaly", "Pleural Effusion", "Pleural_Thickening"]) == (
      "chest x-ray showing cardiomegaly, pleural effusion and pleural thickening")
  assert prompts.photo_prompt("Trouser") == "a photo of a trouser"
  assert prompts.photo_prompt("Ankle boot") == "a photo of an ankle boot"


def _mimic_copy(mimic, tmp_path):
  root, _, _ = mimic
  shutil.copytree(root / "manual", tmp_path / "manual")
  return tmp_path / "manual"


def _rewrite_csv(path, edit):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  edit(rows)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)


def _build_2022(manual, tmp_path, **overrides):
  config = dataclasses.replace(mimic_cxr_lt.MimicCxrLt.builder_configs["cxr_lt_2022"],
                               **{"name": "r16", "resolution": 16, **overrides})
  return build("mimic_cxr_lt", tmp_path / "data", manual, config=config)


def test_mimic_missing_label_file_names_it(mimic, tmp_path):
  manual = _mimic_copy(mimic, tmp_path)
  os.remove(manual / "labels" / "mimic-cxr-lt_single-label_balanced-test.csv")
  with pytest.raises(FileNotFoundError, match=r"mimic-cxr-lt_single-label_balanced-test\.csv"):
    _build_2022(manual, tmp_path)


def test_mimic_missing_image_folder(mimic, tmp_path):
  manual = _mimic_copy(mimic, tmp_path)
  shutil.rmtree(manual / "files")
  with pytest.raises(FileNotFoundError, match="MIMIC-CXR-JPG images not found"):
    _build_2022(manual, tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda rows: rows[3].pop(), r"balanced-val\.csv:4: expected 23 fields"),
    (lambda rows: rows[0].__setitem__(5, "Cardiomegaly2"),
     r"class 'Cardiomegaly' \(did you mean 'Cardiomegaly2'\?\) is not a column"),
    (lambda rows: [r.append("0") for r in rows[1:]] and rows[0].append("Kyphosis"),
     r"unknown columns 'Kyphosis': not one of the 19 classes"),
    (lambda rows: rows[2].__setitem__(5, "1"), r"balanced-val\.csv:3: row has 2 positive"),
    (lambda rows: rows[2].__setitem__(6, "maybe"), r"balanced-val\.csv:3: column 'Consolidation'"),
    (lambda rows: rows[1].__setitem__(3, "files/p99/x.jpg"), r"balanced-val\.csv:2: path"),
])
def test_mimic_bad_label_rows(mimic, tmp_path, edit, message):
  manual = _mimic_copy(mimic, tmp_path)
  _rewrite_csv(manual / "labels" / "mimic-cxr-lt_single-label_balanced-val.csv", edit)
  with pytest.raises(ValueError, match=message):
    _build_2022(manual, tmp_path)


def test_mimic_bad_image_error_or_skip(mimic, tmp_path):
  _, rows, _ = mimic
  manual = _mimic_copy(mimic, tmp_path)
  key = rows["cxr_lt_2022"]["test"][1].key
  (bad,) = list(manual.glob(f"files/*/*/*/{key}.jpg"))
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(specs.BadImageError, match=f"{key}.jpg"):
    _build_2022(manual, tmp_path)
  builder = _build_2022(manual, tmp_path / "skip", name="skip", skip_bad_images=True)
  assert builder.info.splits["test"].num_examples == 2
  stats = builder.info.metadata["splits"]["test"]
  assert stats["skipped_images"] == 1 and stats["skipped_ids"] == [key]


# ---------------------------------------------------------------------------- nih_cxr_lt.

@pytest.mark.parametrize("official_layout", [True, False])
def test_nih(tmp_path, official_layout):
  rows = fx.make_nih_dir(tmp_path / "manual", official_layout=official_layout)
  builder = build("nih_cxr_lt", tmp_path / "data", tmp_path / "manual",
                  config=nih_cxr_lt.NihCxrLtConfig(name="r16", resolution=16))
  names = builder.info.features["label"].names
  assert len(names) == 20
  for split, want in rows.items():
    got = by_id(read_split(builder, split))
    assert set(got) == {r.key for r in want}
    for r in want:
      assert names[got[r.key]["label"]] == r.classes[0]
    check_images_follow_labels(got.values(), want, fx.NIH_FILE_COLUMNS, names)
  train = by_id(read_split(builder, "train"))
  prompts = {e["class_name"].decode(): e["prompt"].decode() for e in train.values()}
  assert prompts["Pleural_Thickening"] == "chest x-ray showing pleural thickening"
  assert prompts["No Finding"] == "normal chest x-ray"
  assert builder.info.metadata["train_class_counts"]["Effusion"] == 2


def test_nih_missing_image(tmp_path):
  rows = fx.make_nih_dir(tmp_path / "manual")
  name = rows["test"][0].key
  (path,) = list((tmp_path / "manual").glob(f"images_*/images/{name}"))
  os.remove(path)
  with pytest.raises(specs.BadImageError, match=f"image {name} not found"):
    build("nih_cxr_lt", tmp_path / "data", tmp_path / "manual",
          config=nih_cxr_lt.NihCxrLtConfig(name="r16", resolution=16))


def test_builder_options_name_type_and_errors():
  nih, mimic = nih_cxr_lt.NihCxrLt, mimic_cxr_lt.MimicCxrLt
  assert base.with_options(nih, None, {}) is nih.builder_configs["default"]
  assert base.with_options(mimic, "cxr_lt_2022", {"resolution": 256}) is (
      mimic.builder_configs["cxr_lt_2022"])
  config = base.with_options(mimic, "cxr_lt_2023", {"resolution": "16", "skip_bad_images": "yes"})
  assert (config.name, config.resolution, config.skip_bad_images) == (
      "cxr_lt_2023_r16_skip_bad_images", 16, True)
  assert config.classes == mimic.builder_configs["cxr_lt_2023"].classes
  assert base.with_options(nih, None, {"drop_overlapping_images": True}).name == (
      "drop_overlapping_images")
  for options, message in [
      ({"multi_label": True}, r"has no builder options \['multi_label'\]; options are "
                              r"\['resolution', 'skip_bad_images', 'drop_overlapping_images'\]"),
      ({"skip_bad_images": "maybe"}, "skip_bad_images takes true/false, 1/0 or yes/no"),
      ({"resolution": "0"}, "resolution must be a positive integer, got 0"),
      ({"resolution": True}, "resolution must be a positive integer, got True"),
      ({"skip_bad_images": 1}, "skip_bad_images must be True or False, got 1")]:
    with pytest.raises(ValueError, match=message):
      base.with_options(mimic, "cxr_lt_2022", options)
  with pytest.raises(ValueError, match=r"no config 'cxr_lt_2024'"):
    base.with_options(mimic, "cxr_lt_2024", {"resolution": 16})
  assert pipeline.parse_options("skip_bad_images=true,resolution=16") == {
      "skip_bad_images": "true", "resolution": "16"}
  assert pipeline.parse_options("") == {}
  for text in ("skip_bad_images", "a=1,a=2", "=1", "a=1, b=2", "a=1,", "a=1=2"):
    with pytest.raises(ValueError, match="expected distinct key=value items"):
      pipeline.parse_options(text)


def test_skip_bad_images_from_load_builder_and_config(tmp_path):
  from grasp_jax.task import experiment  # pylint: disable=g-import-not-at-top  (imports jax)
  rows = fx.make_nih_dir(tmp_path / "manual")
  name = rows["test"][0].key
  os.remove(next((tmp_path / "manual").glob(f"images_*/images/{name}")))
  data, manual = os.fspath(tmp_path / "data"), os.fspath(tmp_path / "manual")
  with pytest.raises(specs.BadImageError, match="builder_options=skip_bad_images=true"):
    pipeline.load_builder("nih_cxr_lt", data, build=True, manual_dir=manual,
                          options={"resolution": 16})
  config = ml_collections.ConfigDict({"data": {
      "name": "nih_cxr_lt", "config": "", "data_dir": data, "manual_dir": manual,
      "builder_options": "resolution=16,skip_bad_images=true", "image_size": 16}})
  builder = experiment.prepare_data(config)
  assert builder.builder_config.name == "r16_skip_bad_images"
  assert builder.info.splits["test"].num_examples == len(rows["test"]) - 1
  assert builder.info.metadata["splits"]["test"]["skipped_ids"] == [name]
  # The strict dataset is another one: not built, and not mixed up with this one.
  with pytest.raises(FileNotFoundError, match="nih_cxr_lt/r16 is not built"):
    pipeline.load_builder("nih_cxr_lt", data, options={"resolution": 16})


# ---------------------------------------------------------------------------- imagenet_lt_t2i.

@pytest.mark.parametrize("with_names", [True, False])
def test_imagenet_lt(tmp_path, with_names):
  rows = fx.make_imagenet_dir(tmp_path / "manual", with_names=with_names)
  config = imagenet_lt.ImagenetLtConfig(name="tiny", resolution=16, num_classes=4)
  builder = build("imagenet_lt_t2i", tmp_path / "data", tmp_path / "manual", config=config)
  names = builder.info.metadata["class_names"]
  if with_names:
    assert names == ["tench", "crane (n02012849)", "crane (n03126707)", "goldfish"]
  else:
    assert names == ["class_0", "class_1", "class_2", "class_3"]
  assert builder.info.metadata["wnids"] == fx.IMAGENET_WNIDS
  assert builder.info.metadata["train_class_counts"] == dict(zip(names, [3, 2, 1, 1]))
  for split, want in rows.items():
    got = by_id(read_split(builder, split))
    assert set(got) == {r.key for r in want}
    for r in want:
      e = got[r.key]
      k = r.classes[0]
      assert e["label"] == k and e["image"].shape == (16, 16, 3)
      assert e["prompt"].decode() == prompts.photo_prompt(names[k])
      assert abs(float(e["image"][..., 0].mean()) - fx.class_intensity(k)) < 4
  if with_names:
    assert prompts.photo_prompt(names[0]) == "a photo of a tench"


@pytest.mark.parametrize("line,message", [
    ("train/n01440764/x.JPEG", r"ImageNet_LT_val\.txt:5: expected '<image path> <label>'"),
    ("train/n01440764/x.JPEG 7", r"ImageNet_LT_val\.txt:5: label 7 outside 0\.\.3"),
    ("train/n01443537/x.JPEG 0", r"ImageNet_LT_val\.txt:5: label 0 is in folder n01443537"),
])
def test_imagenet_bad_split_file(tmp_path, line, message):
  fx.make_imagenet_dir(tmp_path / "manual")
  with open(tmp_path / "manual" / "ImageNet_LT" / "ImageNet_LT_val.txt", "a") as f:
    f.write(line + "\n")
  config = imagenet_lt.ImagenetLtConfig(name="tiny", resolution=16, num_classes=4)
  with pytest.raises(ValueError, match=message):
    build("imagenet_lt_t2i", tmp_path / "data", tmp_path / "manual", config=config)
