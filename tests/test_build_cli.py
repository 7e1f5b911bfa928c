"""`python -m grasp_jax.data.build`: the data-preparation command, on fabricated manual dirs."""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data as fx
from grasp_jax.data import build
from grasp_jax.data.builders import specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def class_table(text, splits):
  """{split: {class: count}} from the summary's class x split table."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["class"])
  table = {s: {} for s in splits}
  for line in lines[start + 1:]:
    if line.startswith("train on it with"):
      break
    fields = line.split()
    name = " ".join(fields[:-len(splits)])
    for s, v in zip(splits, fields[-len(splits):]):
      table[s][name] = int(v)
  return table


def expected_counts(rows):
  return {split: collections.Counter(c for r in rs for c in r.classes)
          for split, rs in rows.items()}


def record_counts(builder, split):
  """Per-record loop over the built split: {class name: positives}."""
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  counts = collections.Counter()
  for i in range(len(source)):
    counts.update(source[i]["class_name"].decode().split(specs.CLASS_NAME_SEPARATOR))
  return counts


@pytest.fixture(scope="module")
def mimic_64(tmp_path_factory):
  """The command run on a fabricated MIMIC-CXR-JPG + CXR-LT 2022 folder at 64 px."""
  root = tmp_path_factory.mktemp("build")
  rows = fx.make_mimic_dir(root / "mimic")["cxr_lt_2022"]
  out = subprocess.run(
      [sys.executable, "-m", "grasp_jax.data.build", "mimic_cxr_lt/cxr_lt_2022",
       f"--manual_dir={root / 'mimic'}", f"--data_dir={root / 'data'}", "--image_size=64"],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return os.fspath(root / "data"), rows, out.stdout


def test_command_builds_mimic_at_64px_and_summarises(mimic_64):
  data_dir, rows, stdout = mimic_64
  splits = ["train", "balanced_val", "balanced_test", "test"]
  assert ("--config.data.name=mimic_cxr_lt --config.data.config=cxr_lt_2022_r64 "
          f"--config.data.data_dir={data_dir} --config.data.image_size=64") in stdout
  # Training reads it back under the printed name: 64 px images, every label row present.
  builder = tfds.builder("mimic_cxr_lt", config="cxr_lt_2022_r64", data_dir=data_dir)
  assert builder.info.metadata["resolution"] == 64
  for split in splits:
    source = builder.as_data_source(split=split)
    assert len(source) == len(rows[split])
    assert source[0]["image"].shape == (64, 64, 1)
  table = class_table(stdout, splits)
  want = expected_counts(rows)
  for split in splits:
    assert {k: v for k, v in table[split].items() if v} == dict(want[split]), split
    assert len(table[split]) == 19
  for split in splits:
    line = next(l for l in stdout.splitlines() if l.split()[:1] == [split])
    assert line.split()[1:3] == [str(len(rows[split])), "0"]
  assert "prompts: impression 1, template 16, template_no_impression 1" in stdout


def test_resolution_mismatch_is_an_error_naming_both(mimic_64, tmp_path):
  data_dir, _, _ = mimic_64
  built = tfds.builder("mimic_cxr_lt", config="cxr_lt_2022_r64", data_dir=data_dir)
  build.check_resolution(built, 64)
  with pytest.raises(ValueError, match=r"stores 64 x 64 images, but config.data.image_size is "
                                       r"512.*--image_size=512.*image_size=64"):
    build.check_resolution(built, 512)
  # Before any build: the registered config's 256 px, and the name to build and train at 512.
  unbuilt = tfds.builder("mimic_cxr_lt", config="cxr_lt_2022", data_dir=os.fspath(tmp_path))
  with pytest.raises(ValueError, match=r"256 x 256 .* 512: .*grasp_jax.data.build "
                                       r"mimic_cxr_lt/cxr_lt_2022 --image_size=512.*"
                                       r"config.data.config=cxr_lt_2022_r512"):
    build.check_resolution(unbuilt, 512)
  # Fashion-MNIST's 28 px are native, not a build parameter: resized on loading as before.
  build.check_resolution(tfds.builder("fashion_mnist_lt", data_dir=os.fspath(tmp_path)), 32)


def test_config_names_and_errors():
  dataset, config = build.builder_config("nih_cxr_lt", 512)
  assert (dataset, config.name, config.resolution) == ("nih_cxr_lt", "r512", 512)
  _, config = build.builder_config("mimic_cxr_lt/cxr_lt_2023", 128, skip_bad_images=True)
  assert (config.name, config.resolution, config.skip_bad_images) == (
      "cxr_lt_2023_r128_skip_bad_images", 128, True)
  assert len(config.classes) == 26  # The 2023 release's fields, not the default config's.
  _, same = build.builder_config("imagenet_lt_t2i", 256)  # The config's own size: unchanged.
  assert same is tfds.builder_cls("imagenet_lt_t2i").builder_configs["default"]
  with pytest.raises(ValueError, match="fixed image size"):
    build.builder_config("fashion_mnist_lt/small", 64)
  with pytest.raises(ValueError, match=r"no config 'cxr_lt_2024'.*'cxr_lt_2022', 'cxr_lt_2023'"):
    build.builder_config("mimic_cxr_lt/cxr_lt_2024")


def test_unreadable_images_stop_the_build_or_are_skipped_and_counted(tmp_path):
  rows = fx.make_mimic_dir(tmp_path / "mimic", with_reports=False)["cxr_lt_2022"]
  gone = rows["train"][-1]  # A No Finding row.
  image = next(p for p in (tmp_path / "mimic" / "files").rglob(f"{gone.key}.jpg"))
  image.write_bytes(b"not a jpeg")
  kwargs = dict(data_dir=os.fspath(tmp_path / "data"), manual_dir=os.fspath(tmp_path / "mimic"),
                image_size=16)
  with pytest.raises(specs.BadImageError, match=f"{gone.key}.*skip_bad_images"):
    build.build("mimic_cxr_lt/cxr_lt_2022", **kwargs)
  builder = build.build("mimic_cxr_lt/cxr_lt_2022", skip_bad_images=True, **kwargs)
  text = build.summary(builder)
  train = next(l for l in text.splitlines() if l.startswith("train "))
  assert train.split()[1:3] == [str(len(rows["train"]) - 1), "1"]
  assert f"skipped ids: {gone.key}" in train
  want = expected_counts(rows)["train"]
  want["No Finding"] -= 1
  assert {k: v for k, v in class_table(text, list(builder.info.splits))["train"].items() if v} \
      == dict(want)


@pytest.mark.parametrize("name", ["nih_cxr_lt", "imagenet_lt_t2i"])
def test_other_manual_builders_at_another_size(name, tmp_path):
  if name == "nih_cxr_lt":
    fx.make_nih_dir(tmp_path / "raw")
  else:  # Without a names file: the 1000 classes are class_<i> (4 of them present).
    fx.make_imagenet_dir(tmp_path / "raw", with_names=False)
  builder = build.build(name, data_dir=os.fspath(tmp_path / "data"),
                        manual_dir=os.fspath(tmp_path / "raw"), image_size=24)
  assert builder.builder_config.name == "r24"
  text = build.summary(builder)
  splits = list(builder.info.splits)
  table = class_table(text, splits)
  for split in splits:
    assert builder.as_data_source(split=split)[0]["image"].shape[:2] == (24, 24)
    assert {k: v for k, v in table[split].items() if v} == dict(record_counts(builder, split))
  assert "--config.data.image_size=24" in text


def test_fashion_mnist_builds_without_manual_dir(tmp_path, monkeypatch):
  # Just enough images for config `small`: its train counts + 10 val per class; 50 test.
  fx.make_fmnist_dir(tmp_path / "idx", [610, 104, 51, 49, 36, 31, 31, 23, 21, 20], 50)
  monkeypatch.setenv("FMNIST_DIR", os.fspath(tmp_path / "idx"))
  builder = build.build("fashion_mnist_lt/small", data_dir=os.fspath(tmp_path / "data"))
  text = build.summary(builder)
  table = class_table(text, ["train", "val", "test"])
  for split in ("train", "val", "test"):
    assert table[split] == {k: record_counts(builder, split).get(k, 0) for k in table[split]}
    assert sum(table[split].values()) == builder.info.splits[split].num_examples
  assert np.sum(list(table["test"].values())) == 500
  assert "--config.data.config=small" in text and "image_size" not in text
