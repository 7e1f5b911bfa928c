"""Prompt templates: what a class is called in the text condition, for training and sampling."""
from typing import Sequence


def human_name(class_name: str) -> str:
  """'Pleural_Thickening' -> 'pleural thickening'; 'T-shirt/top' -> 't-shirt/top'."""
  return class_name.replace("_", " ").lower()


def photo_prompt(class_name: str) -> str:
  name = human_name(class_name)
  article = "an" if name[:1] in "aeiou" else "a"
  return f"a photo of {article} {name}"


def xray_prompt(class_name: str) -> str:
  name = human_name(class_name)
  article = "an" if name[:1] in "aeiou" else "a"
  return f"an x-ray scan of {article} {name}"


# A builder config's appearance -> its class prompt (fashion_mnist_lt's source and target).
TEMPLATES = {"photo": photo_prompt, "radiograph": xray_prompt}


def findings_prompt(positive_names: Sequence[str], no_finding: str = "No Finding") -> str:
  """Template prompt for chest X-rays: 'chest x-ray showing cardiomegaly and edema'."""
  findings = [human_name(n) for n in positive_names if n != no_finding]
  if not findings:
    return "normal chest x-ray"
  listed = findings[0] if len(findings) == 1 else (
      ", ".join(findings[:-1]) + " and " + findings[-1])
  return f"chest x-ray showing {listed}"
