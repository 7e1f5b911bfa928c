"""The README's main job, end to end through the CLI (`configs/demo.py:smoke`), and bad input."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file
import tensorflow_datasets as tfds

from grasp_jax.evaluation import evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=1500):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", "grasp_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  workdir, data_dir = str(root / "work"), str(root / "tfds")
  args = ["--config=configs/demo.py:smoke", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}"]
  proc = run_main(*args)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, args, proc


def test_demo_writes_partition_base_checkpoint_and_export(demo_run):
  workdir, _, proc = demo_run
  with open(os.path.join(workdir, "partition.json")) as f:
    part = json.load(f)
  assert len(part["clusters"]) == 4
  assert sorted(part["class_to_cluster"]) == sorted(
      ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
       "Ankle boot"])
  # The partition table with target_small's counts: Coat is its most frequent class (healthy).
  assert "Coat (100)" in proc.stderr and "Trouser (5)" in proc.stderr
  assert part["clusters"][0]["name"] == "healthy" and part["clusters"][0]["classes"] == ["Coat"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["method"]["name"] == "grasp"
  base = load_file(os.path.join(workdir, "base", "diffusion_pytorch_model.safetensors"))
  assert "context_embedder.weight" in base and not any("adapter" in k for k in base)  # MMDiT
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  adapters = load_file(os.path.join(workdir, "export", "adapters", "adapters.safetensors"))
  assert adapters and all("/adapter/" in k for k in adapters)
  clusters = sorted(os.listdir(os.path.join(workdir, "export", "diffusers")))
  assert clusters == ["cluster_0_healthy", "cluster_1_head", "cluster_2_medium",
                      "cluster_3_tail"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_demo_samples_every_class_and_writes_results(demo_run):
  workdir, _, _ = demo_run
  with open(os.path.join(workdir, "samples", "classes.json")) as f:
    folders = json.load(f)
  assert len(folders) == 10
  for folder in folders:
    pngs = [n for n in os.listdir(os.path.join(workdir, "samples", folder)) if n.endswith(".png")]
    assert len(pngs) == 2  # config.sample.per_class of the smoke variant.
  # Conditioned on the target's prompts, which the run trained on, not the source's.
  synthetic = tfds.builder_from_directory(os.path.join(workdir, "samples", "tfds",
                                                       "grasp_synthetic", "1.0.0"))
  texts = {e["prompt"].decode() for e in synthetic.as_data_source("train")}
  assert "an x-ray scan of a trouser" in texts and len(texts) == 10
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  entry = results["4"]
  text = json.dumps(entry)
  for group in ("cluster/tail", "frequency/head"):
    assert group in text
  assert {"fd", "coverage", "floor"} <= set(entry["domain"]["groups"]["frequency/tail"])
  assert {"irs", "memorization"} <= set(entry["retrieval"]["all"])
  robust = entry["evaluator"]["robustness"]
  assert set(robust) == {"none", *evaluator.PERTURBATIONS}
  assert all(0 <= v <= 1 for v in robust.values())
  summary = entry["summary"]  # The end-of-run summary (run/summary.py).
  assert 0 <= summary["sample_accuracy"] <= 1 and 0 <= summary["evaluator_accuracy_real"] <= 1
  assert os.path.exists(summary["before_after_grid"]) and summary["seconds"] > 0


def test_diagnose_mode_restores_the_checkpoint(demo_run):
  workdir, args, _ = demo_run
  proc = run_main(*args, "--mode=diagnose", "--config.train.diagnostics_batches=1")
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "diagnostics", "step_4.json")) as f:
    result = json.load(f)
  assert result  # Scalars by name; their values are checked in test_diagnostics.py.


@pytest.mark.parametrize("args, message", [
    (["--config=configs/demo.py:smoke", "--config.train.stepz=3"], "stepz"),
    (["--config=configs/demo.py:methd=lora"], "methd"),
    (["--config=configs/demo.py:smoke", "--config.method.name=grasp2"], "method.name"),
])
def test_bad_config_fails_before_anything_runs(tmp_path, args, message):
  proc = run_main(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
