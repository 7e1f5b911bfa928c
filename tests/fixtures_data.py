"""Fabricators of miniature manual dirs with the official file layouts, for the builder tests.

Every image is a flat grey (or colour) JPEG whose intensity encodes its row's first class
(`class_intensity`), so a test can check that each built image sits next to its own labels.
Each fabricator returns the rows it wrote, as {split: [Row]}.
"""
import csv
import dataclasses
import gzip
import os

import numpy as np
import PIL.Image


def class_intensity(k: int) -> int:
  return 20 + 11 * k  # distinct after JPEG + resize for k < 20


@dataclasses.dataclass
class Row:
  key: str
  classes: list  # positive class names
  prompt: str | None = None  # expected prompt, when the fabricator fixes it


def write_jpeg(path, k: int, size=(40, 36), mode="L"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  v = class_intensity(k)
  color = v if mode == "L" else (v, 255 - v, v // 2)
  PIL.Image.new(mode, size, color).save(path, format="jpeg", quality=95)


def write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


# ------------------------------------------------------------------------------ Fashion-MNIST.

def write_idx(path, array: np.ndarray):
  magic = 2051 if array.ndim == 3 else 2049
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_fmnist_dir(root, train_per_class, test_per_class: int, seed=0):
  """Random 28x28 images; train_per_class: a count per class (list of 10)."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  out = {}
  for split, prefix, per_class in (("train", "train", train_per_class),
                                   ("test", "t10k", [test_per_class] * 10)):
    labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    out[split] = (images, labels)
  return out


# ------------------------------------------------------------------------------ MIMIC-CXR-LT.

# Column order of the released LongTailCXR CSVs (differs from the class order of the builder).
MIMIC_2022_FILE_COLUMNS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices", "Pneumoperitoneum", "Pneumomediastinum",
    "Subcutaneous Emphysema", "Tortuous Aorta", "Calcification of the Aorta"]
CXR_LT_2023_COLUMNS = [
    "Atelectasis", "Calcification of the Aorta", "Cardiomegaly", "Consolidation", "Edema",
    "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fracture", "Hernia", "Infiltration",
    "Lung Lesion", "Lung Opacity", "Mass", "No Finding", "Nodule", "Pleural Effusion",
    "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum",
    "Pneumothorax", "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta"]

REPORT_WITH_IMPRESSION = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 FINDINGS:
 The heart is enlarged.  Small left pleural effusion.

 IMPRESSION:
 Cardiomegaly with small left
 pleural effusion.

 NOTIFICATION:  Discussed with Dr. ___.
"""
REPORT_IMPRESSION_TEXT = "Cardiomegaly with small left pleural effusion."
REPORT_WITHOUT_IMPRESSION = """\
                                 FINAL REPORT
 FINDINGS:  Lungs are clear.
"""


def _mimic_ids(i):
  subject = f"1{i % 3:01d}{i:06d}"
  study = f"5{i:07d}"
  dicom = f"{i:08x}-aaaa1111-bbbb2222-cccc3333-dddd4444"
  return subject, study, dicom


def make_mimic_dir(root, *, with_reports=True):
  """CXR-LT 2022 files (labels/), CXR-LT 2023 files (cxr-lt-2023/), images and two reports.

  2022 single-label rows: train has class i of MIMIC_2022_FILE_COLUMNS repeated (i % 4) + 1
  times for the first 6 columns and No Finding 5 times; the other splits one row per class for
  a few classes. 2023 multi-label rows combine classes. Returns {config: {split: [Row]}}.
  """
  counter = iter(range(1, 10_000))
  out = {"cxr_lt_2022": {}, "cxr_lt_2023": {}}

  def add_image(classes, columns):
    i = next(counter)
    subject, study, dicom = _mimic_ids(i)
    rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
    write_jpeg(os.path.join(root, rel), columns.index(classes[0]))
    return subject, study, dicom, rel

  plan_2022 = {
      "train": [c for j, c in enumerate(MIMIC_2022_FILE_COLUMNS[:6]) for _ in range(j % 4 + 1)]
               + ["No Finding"] * 5,
      "balanced-val": ["Atelectasis", "No Finding", "Pleural Effusion"],
      "balanced-test": ["Cardiomegaly", "No Finding"],
      "test": ["No Finding", "Edema", "Fracture"],
  }
  for split, classes in plan_2022.items():
    rows, written = [], []
    for c in classes:
      subject, study, dicom, rel = add_image([c], MIMIC_2022_FILE_COLUMNS)
      rows.append([subject, study, dicom, rel] + [int(c == k) for k in MIMIC_2022_FILE_COLUMNS])
      written.append(Row(dicom, [c]))
    write_csv(os.path.join(root, "labels", f"mimic-cxr-lt_single-label_{split}.csv"),
              ["subject_id", "study_id", "dicom_id", "path"] + MIMIC_2022_FILE_COLUMNS, rows)
    out["cxr_lt_2022"][split.replace("-", "_")] = written

  plan_2023 = {
      "train": [["No Finding"], ["No Finding"], ["No Finding", "Support Devices"],
                ["Cardiomegaly", "Pleural Effusion"], ["Cardiomegaly"], ["Cardiomegaly", "Edema"],
                ["Hernia", "Cardiomegaly"], ["Pleural Effusion"], ["Pleural Effusion", "Edema"]],
      "development": [["Edema", "Cardiomegaly"], ["No Finding"]],
      "test": [["Hernia"], ["Pleural Effusion", "Cardiomegaly"]],
  }
  for split, label_sets in plan_2023.items():
    rows, written = [], []
    for classes in label_sets:
      subject, study, dicom, rel = add_image(classes, CXR_LT_2023_COLUMNS)
      rows.append([dicom, subject, study, "PA", rel[len("files/"):]]
                  + [int(k in classes) for k in CXR_LT_2023_COLUMNS])
      written.append(Row(dicom, classes))
    write_csv(os.path.join(root, "cxr-lt-2023", f"{split}.csv"),
              ["dicom_id", "subject_id", "study_id", "ViewPosition", "fpath"]
              + CXR_LT_2023_COLUMNS, rows)
    out["cxr_lt_2023"][split] = written

  if with_reports:
    # The first 2022 train study gets an IMPRESSION, the second a report without one.
    for row, text in zip(out["cxr_lt_2022"]["train"][:2],
                         (REPORT_WITH_IMPRESSION, REPORT_WITHOUT_IMPRESSION)):
      subject, study, _ = _mimic_ids(int(row.key[:8], 16))
      path = os.path.join(root, "mimic-cxr-reports", "files", f"p{subject[:2]}",
                          f"p{subject}", f"s{study}.txt")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write(text)
  return out


# ------------------------------------------------------------------------------ NIH-CXR-LT.

NIH_FILE_COLUMNS = [
    "No Finding", "Infiltration", "Atelectasis", "Effusion", "Nodule", "Mass", "Pneumothorax",
    "Consolidation", "Pleural_Thickening", "Cardiomegaly", "Fibrosis", "Edema", "Tortuous Aorta",
    "Emphysema", "Pneumonia", "Calcification of the Aorta", "Pneumoperitoneum", "Hernia",
    "Subcutaneous Emphysema", "Pneumomediastinum"]


def make_nih_dir(root, *, official_layout=True):
  """NIH-CXR-LT CSVs in manual_dir and PNG images in images_00N/images/ (or images/)."""
  plan = {
      "train": ["No Finding"] * 4 + ["Effusion"] * 2 + ["Pleural_Thickening", "Hernia"],
      "balanced-val": ["No Finding", "Hernia"],
      "balanced-test": ["Effusion", "Pneumomediastinum"],
      "test": ["No Finding", "Pleural_Thickening"],
  }
  out, i = {}, 0
  for split, classes in plan.items():
    rows, written = [], []
    for c in classes:
      i += 1
      name = f"{i:08d}_000.png"
      folder = f"images_{1 + i % 2:03d}/images" if official_layout else "images"
      path = os.path.join(root, folder, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      k = NIH_FILE_COLUMNS.index(c)
      PIL.Image.new("L", (40, 40), class_intensity(k)).save(path, format="png")
      rows.append([name] + [int(c == n) for n in NIH_FILE_COLUMNS])
      written.append(Row(name, [c]))
    write_csv(os.path.join(root, f"nih-lt_single-label_{split}.csv"), ["id"] + NIH_FILE_COLUMNS,
              rows)
    out[split.replace("-", "_")] = written
  return out


# ------------------------------------------------------------------------------ ImageNet-LT.

IMAGENET_WNIDS = ["n01440764", "n02012849", "n03126707", "n01443537"]
# n02012849 and n03126707 are both "crane" in ImageNet.
IMAGENET_NAMES = ["tench, Tinca tinca", "crane", "crane", "goldfish, Carassius auratus"]


def make_imagenet_dir(root, *, with_names=True):
  """4 classes; ImageNet_LT_*.txt in manual_dir/ImageNet_LT/, images under train/ and val/."""
  plan = {"train": [0, 0, 0, 1, 1, 2, 3], "val": [0, 1, 2, 3], "test": [0, 1, 2, 3, 3]}
  out = {}
  for split, labels in plan.items():
    lines, written = [], []
    for j, k in enumerate(labels):
      wnid = IMAGENET_WNIDS[k]
      folder = "val" if split == "test" else "train"
      rel = f"{folder}/{wnid}/{wnid}_{split}_{j}.JPEG"
      write_jpeg(os.path.join(root, rel), k, size=(48, 30), mode="RGB")
      lines.append(f"{rel} {k}")
      written.append(Row(rel, [k]))
    os.makedirs(os.path.join(root, "ImageNet_LT"), exist_ok=True)
    with open(os.path.join(root, "ImageNet_LT", f"ImageNet_LT_{split}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
    out[split] = written
  if with_names:
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
      f.write("".join(f"{w} {n}\n" for w, n in zip(IMAGENET_WNIDS, IMAGENET_NAMES)))
  return out
