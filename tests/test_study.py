"""The study: its plan, the aggregation against a per-record Python loop, and a smoke run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import study as study_config
from grasp_jax import report
from grasp_jax import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_orders_backbones_and_adds_seeds_to_unet_only():
  out = study.plan(["unet", "dit"], ["grasp", "full", "lora"], ["0"], ["grasp", "full"],
                   ["1", "2"])
  assert out[:3] == [("unet", "grasp", 0), ("unet", "full", 0), ("unet", "lora", 0)]
  assert out[3:7] == [("unet", "grasp", 1), ("unet", "grasp", 2), ("unet", "full", 1),
                      ("unet", "full", 2)]
  assert out[7:] == [("dit", "grasp", 0), ("dit", "full", 0), ("dit", "lora", 0)]
  with pytest.raises(ValueError, match="unknown.*'gras'"):
    study.plan(["unet"], ["gras"], ["0"], [], [])


def test_every_run_builds_on_both_backbones():
  for backbone in ("unet", "dit"):
    for run, (method, moe_mode, cbdm, coral) in study_config.RUNS.items():
      c = study_config.get_config(f"backbone={backbone},run={run},base=/b")
      assert (c.method.name, c.method.moe_mode) == (method, moe_mode)
      assert (c.diffusion.cbdm_weight > 0, c.diffusion.coral_weight > 0) == (cbdm, coral)
      assert c.model.pretrained == "/b"
      assert c.diffusion.objective == ("flow" if backbone == "dit" else "eps")
  with pytest.raises(ValueError, match="unknown study run 'nope'"):
    study_config.get_config("run=nope")


def _results(rng):
  """A results.json step entry with the fields run_metrics reads, random values."""
  def feature_block():
    entry = lambda: {m: float(rng.uniform(0, 100)) for m in (
        "fid", "kid", "precision", "recall", "density", "coverage", "vendi")}
    return {"groups": {f"frequency/{g}": entry() for g in report.GROUPS}, "all": entry()}

  def downstream():
    entry = lambda: {"macro_f1": float(rng.uniform()), "balanced_accuracy": float(rng.uniform()),
                     "nonzero_f1_classes": int(rng.integers(0, 10))}
    return {**entry(), "groups": {f"frequency/{g}": entry() for g in report.GROUPS}}

  return {"meta": {"dataset": "d", "resolution": 32, "n_fake": 8, "n_real": 8, "sampler": "ddim",
                   "sample_steps": 2, "guidance_scale": 3.0},
          "inception": feature_block(), "domain": feature_block(),
          "ms_ssim": {"groups": {f"frequency/{g}": {"ms_ssim": float(rng.uniform())}
                                 for g in report.GROUPS}},
          "domain_accuracy": {"groups": {f"frequency/{g}": {"accuracy": float(rng.uniform()),
                                                            "accuracy_real": 0.5 + 0.1 * i}
                                         for i, g in enumerate(report.GROUPS)},
                              "all": {"accuracy": 0.25, "accuracy_real": 0.75}},
          "downstream": {"real": downstream(), "real+synthetic": downstream()}}


def test_aggregate_matches_a_per_record_loop(tmp_path):
  rng = np.random.default_rng(0)
  records = [{"backbone": b, "run": r, "seed": s, "trainable_params": 10 + s, "seconds": 1.0,
              "steps": 2, "batch_size": 4, "results": _results(rng)}
             for b in ("unet", "dit") for r in ("grasp", "full") for s in (0, 1, 2)
             if b == "unet" or s == 0]
  records[0]["diagnostics"] = {"head_tail": {"all": 0.25}, "intra_pooled": 0.5, "inter": 0.1}
  agg = report.write(records, str(tmp_path), str(tmp_path / "study.json"),
                     str(tmp_path / "RESULTS.md"))
  for run in ("grasp", "full"):
    picked = [r for r in records if r["run"] == run and r["backbone"] == "unet"]
    tail_fid = [r["results"]["inception"]["groups"]["frequency/tail"]["fid"] for r in picked]
    got = agg[run]["unet"]["tail"]["inception_fid"]
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(sum(tail_fid) / 3)
    mean = sum(tail_fid) / 3
    assert got["std"] == pytest.approx((sum((v - mean) ** 2 for v in tail_fid) / 2) ** 0.5)
    f1 = [r["results"]["downstream"]["real+synthetic"]["macro_f1"] for r in picked]
    assert agg[run]["unet"]["all"]["downstream_real+synthetic_macro_f1"]["mean"] == \
        pytest.approx(sum(f1) / 3)
    dit = agg[run]["dit"]["head"]["domain_accuracy"]
    assert dit == {"mean": pytest.approx(next(
        r for r in records if r["run"] == run and r["backbone"] == "dit")["results"][
            "domain_accuracy"]["groups"]["frequency/head"]["accuracy"]), "std": 0.0, "n": 1}
  assert agg["grasp"]["unet"]["run"]["grad_cos_head_tail"]["mean"] == 0.25
  assert "grad_cos_head_tail" not in agg["full"]["unet"]["run"]
  with open(tmp_path / "study.json") as f:
    assert json.load(f)["full"]["dit"]["seeds"] == [0]
  doc = (tmp_path / "RESULTS.md").read_text()
  assert "## unet" in doc and "## dit" in doc and "grasp vs full" in doc
  assert "| *real test images* | 0.5 | 0.6 | 0.7 | 0.8 | 0.75 |" in doc
  assert (tmp_path / "study" / "fid_unet.png").exists()


def test_findings_call_ties_within_seed_spread():
  def stat(mean, std):
    return {"mean": mean, "std": std, "n": 3}
  agg = {"grasp": {"unet": {"tail": {"inception_fid": stat(10.0, 1.0),
                                     "inception_coverage": stat(0.5, 0.01),
                                     "domain_fid": stat(5.0, 0.1)}}},
         "full": {"unet": {"tail": {"inception_fid": stat(10.5, 0.2),
                                    "inception_coverage": stat(0.4, 0.01),
                                    "domain_fid": stat(4.0, 0.1)}}}}
  line, = report.findings(agg, "unet")
  assert line == ("- grasp vs full: better on cov. Inc.; worse on FID dom.; within seed spread "
                  "on FID Inc..")
  for run in agg.values():
    for stat in run["unet"]["tail"].values():
      stat.update(n=1, std=0.0)
  line, = report.findings(agg, "unet")
  assert line.startswith("- grasp vs full (one seed each: no spread measured")
  assert line.endswith(": better on FID Inc., cov. Inc.; worse on FID dom.; within seed spread on "
                       "nothing.")


def test_study_smoke_end_to_end(tmp_path):
  """Two runs on the smoke config through the CLI: records, study.json, the report."""
  out, doc = tmp_path / "study.json", tmp_path / "docs" / "RESULTS.md"
  cmd = [sys.executable, "-m", "grasp_jax.study", f"--workdir={tmp_path / 'w'}", f"--out={out}",
         f"--doc={doc}", "--backbones=unet", "--runs=grasp,full", "--seeds=0",
         "--more_seeds=", "--diagnose=full", "--smoke"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  agg = json.loads(out.read_text())
  grasp, full = agg["grasp"]["unet"], agg["full"]["unet"]
  # GRASP trains K adapters only; full fine-tuning every base parameter.
  assert 0 < grasp["run"]["trainable_params"]["mean"] < full["run"]["trainable_params"]["mean"]
  assert "grad_cos_head_tail" in full["run"]
  assert full["tail"]["domain_fid"]["n"] == 1
  assert "| grasp |" in doc.read_text()
  # Both runs share one base and one cached domain classifier.
  assert os.listdir(tmp_path / "w" / "unet" / "base") and \
      len(os.listdir(tmp_path / "w" / "cache" / "domain_classifier")) == 2  # .msgpack + .json
