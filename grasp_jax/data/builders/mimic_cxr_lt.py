"""mimic_cxr_lt: MIMIC-CXR-LT (CXR-LT 2022, single-label) and CXR-LT 2023 (multi-label).

Built from the user's MIMIC-CXR-JPG copy and the CXR-LT label files (credentialed PhysioNet
access; nothing is downloaded). Images are resized to `resolution` x `resolution` (squashed, as
in the LongTailCXR benchmark) and stored greyscale as PNG.

Prompts: the IMPRESSION section of the study's free-text report when
`mimic-cxr-reports/files/pXX/pXXXXXXXX/sXXXXXXXX.txt` exists and has one, else a template of
the positive labels ("chest x-ray showing cardiomegaly and pleural effusion"; only No Finding:
"normal chest x-ray"). The metadata counts both kinds per split (`splits.<split>.prompt_sources`).
"""
import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from grasp_jax.data import classes as class_lists
from grasp_jax.data import labels as label_tables
from grasp_jax.data.builders import base
from grasp_jax.data.builders import specs
from grasp_jax.data.builders import manual_dir
from grasp_jax.data import prompts

# Columns of the CXR-LT files that are not classes (the 2023 files carry some of the
# MIMIC-CXR-JPG metadata columns; `path` is called `fpath` in some releases).
_METADATA_COLUMNS = (
    "subject_id", "study_id", "dicom_id", "path", "fpath", "split", "ViewPosition",
    "ViewCodeSequence_CodeMeaning", "PerformedProcedureStepDescription", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning")
_ID_COLUMNS = ("subject_id", "study_id", "dicom_id")
_HEADING = re.compile(r"^[ \t]*[A-Z][A-Z &/()-]*:", re.MULTILINE)
_IMPRESSION = re.compile(r"^[ \t]*IMPRESSIONS?[ \t]*:", re.MULTILINE)


def impression(report: str) -> str | None:
  """The text under the report's IMPRESSION: heading up to the next heading, one line."""
  m = _IMPRESSION.search(report)
  if m is None:
    return None
  rest = report[m.end():]
  nxt = _HEADING.search(rest)
  text = " ".join((rest[:nxt.start()] if nxt else rest).split())
  return text or None


def study_dir(subject_id: str, study_id: str) -> str:
  """MIMIC-CXR's layout: pXX/pXXXXXXXX/sXXXXXXXX (XX = first two digits of the subject)."""
  return f"p{subject_id[:2]}/p{subject_id}/s{study_id}"


@dataclasses.dataclass(eq=False)
class MimicCxrLtConfig(base.ManualConfig):
  """A label release: its classes and, per split, candidate label files under manual_dir."""
  classes: tuple[str, ...] = ()
  split_files: tuple[tuple[str, tuple[str, ...]], ...] = ()
  multi_label: bool = False


def _files(names, folders):
  return tuple((split, tuple(f"{d}{n}" for d in folders)) for split, n in names)


class MimicCxrLt(base.Builder):
  """MIMIC-CXR-JPG with the CXR-LT 2022 / 2023 long-tailed labels."""

  name = "mimic_cxr_lt"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      MimicCxrLtConfig(
          name="cxr_lt_2022",
          description="MIMIC-CXR-LT (Holste et al. 2022): 19 classes, single-label.",
          classes=class_lists.MIMIC_CXR_LT_CLASSES,
          split_files=_files(
              [(s, f"mimic-cxr-lt_single-label_{f}.csv") for s, f in
               (("train", "train"), ("balanced_val", "balanced-val"),
                ("balanced_test", "balanced-test"), ("test", "test"))],
              ("", "labels/"))),
      MimicCxrLtConfig(
          name="cxr_lt_2023",
          description="CXR-LT 2023 challenge: 26 classes, multi-label.",
          classes=class_lists.CXR_LT_2023_CLASSES,
          split_files=_files([(s, f"{s}.csv") for s in ("train", "development", "test")],
                             ("cxr-lt-2023/", "")),
          multi_label=True),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put (or symlink) into manual_dir:
    files/                 the `files/` tree of MIMIC-CXR-JPG 2.0.0/2.1.0 (PhysioNet):
                           files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
    config cxr_lt_2022 (LongTailCXR labels, from the authors), in manual_dir or manual_dir/labels/:
      mimic-cxr-lt_single-label_train.csv, mimic-cxr-lt_single-label_balanced-val.csv,
      mimic-cxr-lt_single-label_balanced-test.csv, mimic-cxr-lt_single-label_test.csv
      (splits train, balanced_val, balanced_test, test)
    config cxr_lt_2023 (PhysioNet cxr-lt-iccv-workshop-cvamd, folder cxr-lt-2023/), in
      manual_dir/cxr-lt-2023/ or manual_dir: train.csv, development.csv, test.csv
      (labelled versions; splits train, development, test)
    optional: mimic-cxr-reports/files/pXX/pXXXXXXXX/sXXXXXXXX.txt (MIMIC-CXR reports) for
      IMPRESSION prompts.
  The label files need the columns subject_id, study_id, dicom_id and one 0/1 column per class;
  `path`/`fpath`, if present, must point at the same image.
  Options (resolution, skip_bad_images, drop_overlapping_images; see base.ManualConfig):
  pipeline.load_builder("mimic_cxr_lt/cxr_lt_2022", ..., options={"resolution": 512}).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    r = cfg.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{__doc__}\nConfig {cfg.name}: {cfg.description} Resolution {r}.",
        features=specs.example_features(cfg.classes, (r, r, 1)),
        homepage="https://github.com/VITA-Group/LongTailCXR",
        metadata=tfds.core.MetadataDict(class_names=list(cfg.classes),
                                        multi_label=cfg.multi_label, resolution=r, splits={}),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    root = dl_manager.manual_dir
    if not (root / "files").is_dir():
      raise FileNotFoundError(f"MIMIC-CXR-JPG images not found: expected the folder "
                              f"{root / 'files'} (files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg)")
    # Read and check every label file before the long image pass.
    tables = {}
    for split, candidates in cfg.split_files:
      path = manual_dir.find_file(root, candidates, f"label file for split {split!r}")
      tables[split] = manual_dir.read_labels(
          path, cfg.classes, required_columns=_ID_COLUMNS, metadata_columns=_METADATA_COLUMNS,
          single_label=not cfg.multi_label)
    keep = manual_dir.disjoint_splits(
        {split: (t.path, t.columns["dicom_id"], t.lines) for split, t in tables.items()},
        drop_overlapping=cfg.drop_overlapping_images, stats=self.info.metadata["splits"])
    tables = {split: t.take(keep[split]) for split, t in tables.items()}
    train_counts = tables["train"].class_counts
    reports = root / "mimic-cxr-reports" / "files"
    self.info.metadata["reports_dir"] = os.fspath(reports) if reports.is_dir() else None
    self.info.metadata["train_class_counts"] = dict(zip(cfg.classes, train_counts.tolist()))
    return {split: self._generate_examples(split, self._items(root, t, train_counts))
            for split, t in tables.items()}

  def _items(self, root: epath.Path, table: label_tables.LabelTable, train_counts):
    cols = table.columns
    given = cols.get("path", cols.get("fpath"))
    labels = manual_dir.primary_labels(table.labels, train_counts)
    reports = root / "mimic-cxr-reports" / "files"
    items = []
    for r, (subject, study, dicom) in enumerate(zip(*(cols[c] for c in _ID_COLUMNS))):
      rel = f"{study_dir(subject, study)}/{dicom}.jpg"
      if given is not None and not given[r].endswith(rel):
        raise ValueError(f"{table.path}:{table.lines[r]}: path {given[r]!r} does not match "
                         f"subject_id/study_id/dicom_id ({rel})")
      report = reports / f"{study_dir(subject, study)}.txt"
      items.append(manual_dir.Item(key=dicom, image_path=os.fspath(root / "files" / rel),
                                   labels=table.labels[r], label=int(labels[r]),
                                   origin=f"{table.path}:{table.lines[r]}", extra=report))
    return items

  def _make(self, item: manual_dir.Item) -> dict:
    cfg = self.builder_config
    image = specs.load_image(item.image_path, size=cfg.resolution, mode="L",
                                center_crop=False)
    prompt, source = None, "template"
    if self.info.metadata["reports_dir"] is not None and item.extra.exists():
      prompt = impression(item.extra.read_text())
      source = "impression" if prompt else "template_no_impression"
    if prompt is None:
      prompt = prompts.findings_prompt([cfg.classes[i] for i in np.flatnonzero(item.labels)])
    example = specs.make_example(specs.encode_png(image), item.labels, item.label,
                                    cfg.classes, prompt, item.key)
    example["prompt_source"] = source
    return example

  def _generate_examples(self, split, items):
    stats = self.info.metadata["splits"].setdefault(split, {})
    yield from manual_dir.generate_examples(
        items, self._make, skip_bad_images=self.builder_config.skip_bad_images,
        split_stats=stats)
