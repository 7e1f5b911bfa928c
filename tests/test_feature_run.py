"""Smoke run of the feature-level pipeline (configs/feature_ddpm.py:smoke), `small` dataset."""
import json
import os

import pytest

from configs import feature_ddpm
from grasp_jax.feature_ddpm import run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  config = feature_ddpm.get_config("smoke")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("workdir"))
  run.run(config, workdir)
  return workdir, config


def test_writes_results_with_expected_keys(results):
  workdir, config = results
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  assert {"dataset", "encoder", "ddpm", "synthetic", "heads"} <= set(r)
  expected = {k + s for k in config.head.losses for s in ("", "+synth")}
  assert set(r["heads"]) == expected
  for m in [r["encoder"]] + list(r["heads"].values()):
    assert {"accuracy", "macro_f1", "balanced_accuracy", "per_class_f1",
            "nonzero_f1_classes", "groups"} <= set(m)
    assert set(m["groups"]) == {"head", "medium", "tail"}
    assert 0.0 <= m["macro_f1"] <= 1.0
  assert r["heads"]["ce"]["num_seeds"] == config.head.seeds
  tail = r["dataset"]["groups"]["tail"]
  assert r["dataset"]["synthetic_classes"] == tail
  for name in tail:
    q = r["synthetic"]["per_class"][name]
    assert {"mean_pairwise_distance", "spread", "kl_real_to_synthetic", "mmd2_own_class",
            "mmd2_nearest_other_class", "mean_confidence"} <= set(q)
    assert q["num_synthetic"] == config.synth.per_class


def test_writes_plot_and_summaries(results):
  workdir, _ = results
  files = os.listdir(workdir)
  assert "tsne.png" in files
  assert any(f.startswith("events.out.tfevents") for f in files)
