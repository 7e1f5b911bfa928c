"""Group priors for the `groups` strategies: a built-in anatomical grouping of chest X-ray
findings, or a user mapping ({group: [classes]} or {class: group}, inline or a JSON file)."""
import json
import os
from typing import Mapping

# Default anatomical prior: the site of each finding on a chest radiograph. This is our own
# clinical reading (the GRASP paper's mapping was not retrievable); override it with
# --groups=FILE.json. Both NIH spellings (Effusion, Pleural_Thickening) and CheXpert-style ones
# are listed. Hernia in ChestX-ray14 is mostly hiatal, hence mediastinal. Group order here is
# the cluster order.
ANATOMICAL_GROUPS = {
    "No Finding": "healthy",
    **dict.fromkeys(("Lung Opacity", "Atelectasis", "Consolidation", "Pneumonia", "Edema",
                     "Infiltration", "Lung Lesion", "Nodule", "Mass", "Fibrosis", "Emphysema"),
                    "parenchymal"),
    **dict.fromkeys(("Pleural Effusion", "Effusion", "Pneumothorax", "Pleural Other",
                     "Pleural Thickening", "Pleural_Thickening"), "pleural"),
    **dict.fromkeys(("Cardiomegaly", "Enlarged Cardiomediastinum"), "cardiac"),
    **dict.fromkeys(("Tortuous Aorta", "Calcification of the Aorta", "Pneumomediastinum",
                     "Hernia"), "mediastinal"),
    **dict.fromkeys(("Fracture", "Subcutaneous Emphysema", "Pneumoperitoneum"),
                    "chest_wall_abdomen"),
    "Support Devices": "devices",
}
BUILTIN_GROUPS = {"anatomical": ANATOMICAL_GROUPS}


def load_groups(spec: str) -> Mapping | str:
  """A built-in groups name, or a JSON file holding {group: [classes]} or {class: group}."""
  if spec in BUILTIN_GROUPS:
    return spec
  if not os.path.exists(spec):
    raise ValueError(f"groups {spec!r} is neither a built-in ({sorted(BUILTIN_GROUPS)}) nor an "
                     "existing JSON file")
  with open(spec) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{spec}: not valid JSON: {e}") from None


def normalise(groups) -> dict[str, str]:
  """{class: group} from a built-in name, {class: group} or {group: [classes]}."""
  if isinstance(groups, str):
    if groups not in BUILTIN_GROUPS:
      raise ValueError(f"unknown built-in groups {groups!r}; built-ins are "
                       f"{sorted(BUILTIN_GROUPS)} (or pass a mapping / a JSON file)")
    return dict(BUILTIN_GROUPS[groups])
  if not isinstance(groups, Mapping) or not groups:
    raise ValueError(f"groups must be a non-empty mapping, got {groups!r}")
  values = list(groups.values())
  if all(isinstance(v, str) for v in values):
    return dict(groups)
  if not all(isinstance(v, (list, tuple)) for v in values):
    raise ValueError("groups must map class -> group name or group name -> list of classes")
  out = {}
  for g, members in groups.items():
    if not members:
      raise ValueError(f"group {g!r} lists no classes")
    for c in members:
      if c in out:
        raise ValueError(f"class {c!r} is in both group {out[c]!r} and group {g!r}")
      out[c] = g
  return out


def assign(idx, class_names, groups, builtin):
  mapping = normalise(groups)
  present = {class_names[i] for i in idx}
  unknown = [c for c in mapping if c not in class_names]
  if unknown and not builtin:
    raise ValueError(f"groups name classes that are not in the data: {unknown}; classes are "
                     f"{list(class_names)}")
  missing = [class_names[i] for i in idx if class_names[i] not in mapping]
  if missing:
    raise ValueError(f"classes not covered by the groups mapping: {missing}"
                     + (" (pass a JSON mapping that covers them)" if builtin else ""))
  # Group order: first appearance in the mapping. Groups without a class here (built-in groups
  # absent from the data, or a group of just the healthy class under healthy+groups) are left out.
  names = list(dict.fromkeys(g for c, g in mapping.items() if c in present))
  out = [[i for i in idx if mapping[class_names[i]] == g] for g in names]
  return out, names
