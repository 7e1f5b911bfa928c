"""Prompt -> class labels -> cluster, from a partition table (the JSON of partition.json).

Standard library only: `python -m grasp_jax.sample` routes with it, and the diffusers export ships
this very file next to its pipeline code, so a prompt goes to the same cluster in both.

A class is found in a prompt when one of its phrases occurs as whole words, case-insensitively,
with an optional plural 's'/'es'. A phrase found only inside a longer found phrase does not count
('shirt' in 't-shirt/top', 'emphysema' in 'subcutaneous emphysema'). The phrases of each class
are the table's `prompt_phrases` (grasp_jax writes its name in words and, where the dataset's
template prompt does not contain the name, that prompt: 'normal chest x-ray' for 'No Finding').
Several classes found: the rarest (lowest training count, then lowest class index) decides the
cluster, the partition's rule for multi-label samples.
"""
import re


class UnknownPromptError(ValueError):
  """No class of the partition is named in the prompt (and no fallback cluster was given)."""


def _normalise(text):
  return " ".join(text.lower().replace("_", " ").split())


class Router:
  """Routes prompts by a partition table: {'class_to_cluster', 'class_counts', 'clusters',
  'prompt_phrases'} as in partition.json."""

  def __init__(self, table):
    if "prompt_phrases" not in table:
      raise ValueError("the partition table has no 'prompt_phrases' (written by grasp_jax's "
                       "export and sampling command)")
    self.class_names = list(table["class_to_cluster"])
    self.class_to_cluster = [int(table["class_to_cluster"][n]) for n in self.class_names]
    self.counts = [int(table["class_counts"][n]) for n in self.class_names]
    self.cluster_names = [c["name"] for c in table["clusters"]]
    self._patterns = [
        (i, re.compile(r"(?<![a-z0-9])" + re.escape(_normalise(p)) + r"(?:e?s)?(?![a-z0-9])"))
        for i, name in enumerate(self.class_names) for p in table["prompt_phrases"][name]]

  def labels(self, prompt):
    """Names of the classes the prompt names, in class order."""
    text = _normalise(prompt)
    spans = [(i, m.span()) for i, pattern in self._patterns for m in pattern.finditer(text)]
    inside = lambda a, b: b[0] <= a[0] and a[1] <= b[1] and a != b
    found = {i for i, span in spans if not any(inside(span, other) for _, other in spans)}
    return [self.class_names[i] for i in sorted(found)]

  def cluster_id(self, cluster):
    """A cluster id from an id or a cluster name."""
    if isinstance(cluster, str) and not cluster.lstrip("-").isdigit():
      if cluster not in self.cluster_names:
        raise ValueError(f"unknown cluster {cluster!r}; clusters are {self.cluster_names}")
      return self.cluster_names.index(cluster)
    if not 0 <= int(cluster) < len(self.cluster_names):
      raise ValueError(f"cluster id {cluster} outside 0..{len(self.cluster_names) - 1}")
    return int(cluster)

  def cluster_of(self, labels):
    """The cluster of a label set: its rarest class's."""
    index = [self.class_names.index(n) for n in labels]
    return self.class_to_cluster[min(index, key=lambda i: (self.counts[i], i))]

  def route(self, prompt, unknown=None):
    """(labels, cluster id) of a prompt. `unknown`: the cluster (id or name) of a prompt that
    names no class; without it such a prompt raises UnknownPromptError."""
    labels = self.labels(prompt)
    if labels:
      return labels, self.cluster_of(labels)
    if unknown is None:
      raise UnknownPromptError(
          f"no class of the partition is named in the prompt {prompt!r}; name one of "
          f"{self.class_names}, give the labels or the cluster explicitly, or pick a cluster "
          f"for such prompts (one of {self.cluster_names})")
    return [], self.cluster_id(unknown)
