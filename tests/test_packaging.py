"""pyproject.toml's metadata against the code and the lock (no install: that is too slow here).

Every third-party import in grasp_jax must come from a declared dependency (or a weight-only
package of requirements-assets.txt), and the pinned lock, requirements.txt, must satisfy every
declared range, so that `pip install .` resolves to a set that works.
"""
import ast
import importlib.metadata
import os
import re
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Remote code for diffusers' own pipelines: it runs inside the user's diffusers, not grasp_jax.
NOT_IMPORTED_BY_GRASP_JAX = (os.path.join("grasp_jax", "inference", "remote"),)
# Declared but never imported by name: what they are needed for.
RUNTIME_ONLY = {
    "jaxlib": "jax's compiled backend",
    "tensorflow-cpu": "clu.metric_writers / periodic_actions import TensorFlow",
    "tensorboard": "clu's summary writer imports tensorboard's hparams plugin",
    "array-record": "TFDS' array_record file format",
}


def project():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def declared():
  requirements = map(Requirement, project()["project"]["dependencies"])
  return {canonicalize_name(r.name): r for r in requirements}


def pins(file):
  """{name: version} of the `name==version` lines of a requirements file."""
  out = {}
  with open(os.path.join(ROOT, file)) as f:
    for line in f:
      m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
      if m:
        out[canonicalize_name(m.group(1))] = m.group(2)
  return out


def third_party_imports():
  """{top-level module: [files]} of every absolute import in grasp_jax (lazy ones too)."""
  found = {}
  for folder, _, names in os.walk(os.path.join(ROOT, "grasp_jax")):
    rel = os.path.relpath(folder, ROOT)
    if rel.startswith(NOT_IMPORTED_BY_GRASP_JAX):
      continue
    for name in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(folder, name)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
          modules = [node.module]
        else:
          continue
        for m in modules:
          top = m.split(".")[0]
          if top != "grasp_jax" and top not in sys.stdlib_module_names:
            found.setdefault(top, []).append(os.path.join(rel, name))
  return found


def test_every_import_comes_from_a_declared_dependency():
  deps = set(declared())
  assets = set(pins("requirements-assets.txt"))
  dists = importlib.metadata.packages_distributions()
  imports = third_party_imports()
  assert {"jax", "flax", "tensorflow_datasets", "PIL", "etils"} <= set(imports)  # The scan works.
  # `configs` is not installed (config files are handed in by path), so the library must not
  # import it.
  assert "configs" not in imports, imports.get("configs")
  missing = {}
  for module, files in sorted(imports.items()):
    names = {canonicalize_name(d) for d in dists.get(module, [])}
    if not names & (deps | assets):
      missing[module] = (sorted(names) or "no installed distribution", files[:3])
  assert not missing, f"imported, not declared in pyproject.toml: {missing}"
  imported = {canonicalize_name(d) for m in imports for d in dists.get(m, [])}
  unused = deps - imported - set(RUNTIME_ONLY)
  assert not unused, f"declared, never imported, not in RUNTIME_ONLY: {sorted(unused)}"


def test_the_lock_pins_every_dependency_within_its_range():
  lock = pins("requirements.txt")
  for name, req in declared().items():
    assert name in lock, f"{name} is declared in pyproject.toml but not pinned in requirements.txt"
    assert req.specifier.contains(lock[name]), f"requirements.txt {name}=={lock[name]} is " \
                                               f"outside pyproject.toml's {req}"
    assert str(req.specifier), f"{name}: no version range"
  # Accelerator extras take the locked jax.
  for extra, reqs in project()["project"]["optional-dependencies"].items():
    for req in map(Requirement, reqs):
      assert req.specifier.contains(lock[canonicalize_name(req.name)]), (extra, str(req))

