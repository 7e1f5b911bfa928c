"""The study: its plan, every run's config, the seed combination against a formula, and a smoke
study through the CLI (the one slow end-to-end check of the study)."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import study as study_config
from grasp_jax.run import report
from grasp_jax.run import setup
from grasp_jax.run import study
from grasp_jax.run import study_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_puts_the_headline_runs_at_every_seed_first():
  s = study_config.get_config("seeds=2")
  out = study.plan(s, ["lora", "grasp", "base", "grasp_gradient"])
  t0, t1 = s.targets
  assert out == [("dit", t0, "base", 0), ("dit", t0, "grasp", 0), ("dit", t0, "grasp", 1),
                 ("dit", t0, "grasp_gradient", 0), ("dit", t0, "lora", 0),
                 ("dit", t1, "base", 0), ("dit", t1, "grasp", 0), ("dit", t1, "grasp", 1)]
  with pytest.raises(ValueError, match="unknown.*'gras'"):
    study.plan(s, ["gras"])


def test_every_run_is_a_valid_config_with_its_controls():
  s = study_config.get_config()
  for backbone in ("dit", "unet"):
    for run, c in s.runs[backbone].items():
      setup.validate_config(c)
      assert c.data.balance == ("cluster" if run.endswith("_balanced") else "")
  runs = s.runs["dit"]
  assert runs["base"].train.steps == 0
  assert (runs["shared"].method.num_clusters, runs["shared"].partition.strategy) == (1, "single")
  assert runs["shared_matched"].method.rank == study_config.K * runs["grasp"].method.rank
  assert runs["grasp_kc"].method.num_clusters == study_config.NUM_CLASSES
  assert runs["grasp_random"].partition.strategy == "healthy+random"
  assert runs["cbdm"].method.name == "full" and runs["cbdm"].diffusion.cbdm_weight > 0
  assert runs["grasp_minority"].sample.minority_guidance > 0


def test_matched_runs_train_about_grasps_parameter_count():
  """Counted on the abstract model (no weights): 'matched' runs are within 15% of GRASP's
  trainable parameters, the rank-32 LoRA far above, the shared adapter a K-th."""
  from grasp_jax.run import dry_run  # pylint: disable=g-import-not-at-top
  s = study_config.get_config()
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
  def count(run):
    c = s.runs["dit"][run]
    exp = dry_run.abstract_experiment(c)
    return dry_run.count(dry_run.abstract_state(exp, c, mesh)[0].params)
  grasp = count("grasp")
  for run in ("shared_matched", "lora_matched", "moe"):
    assert abs(count(run) / grasp - 1) < 0.15, run
  assert count("lora") > 5 * grasp and count("shared") * study_config.K == grasp


def test_a_run_dir_ever_run_under_another_config_is_stale(tmp_path):
  c = study_config.run_config("dit", "grasp", smoke=True)
  setup.write_config(c, str(tmp_path))
  sha = study_configs.config_sha(c)
  moved = c.copy_and_resolve_references()
  moved.model.pretrained, moved.eval.cache_dir = "/elsewhere/base", "/elsewhere/cache"
  assert study_configs.config_sha(moved) == sha and not study._other_config(str(tmp_path), sha)
  c.sample.steps += 1  # Rewritten (config.1.json keeps the old one), e.g. by a failed attempt.
  setup.write_config(c, str(tmp_path))
  assert study._other_config(str(tmp_path), study_configs.config_sha(c))


def test_combine_over_seeds_matches_the_formula():
  est = [{"value": 1.0, "lo": 0.8, "hi": 1.2}, {"value": 2.0, "lo": 1.6, "hi": 2.4}]
  out = report.combine(est)
  se = np.array([0.4, 0.8]) / 3.92
  half = 1.96 * math.sqrt(np.var([1.0, 2.0], ddof=1) / 2 + np.mean(se**2) / 2)
  assert out["mean"] == pytest.approx(1.5)
  assert (out["lo"], out["hi"]) == pytest.approx((1.5 - half, 1.5 + half))
  assert report.combine(est[:1]) == {"mean": 1.0, "lo": 0.8, "hi": 1.2, "n": 1}
  assert report.combine([None])["n"] == 0


def test_irs_verdict_is_unpaired_and_needs_two_seeds():
  def record(seed, value, half):
    irs = {"value": value, "lo": value - half, "hi": value + half}
    return {"results": {"10": {"retrieval": {"all": {"irs": irs}, "groups": {}}}}, "seed": seed}
  a, b = record(0, 0.5, 0.1), record(0, 0.2, 0.05)
  d = report._unpaired(a, b, "irs", "all")
  half = 1.96 * math.sqrt((0.2 / 3.92) ** 2 + (0.1 / 3.92) ** 2)
  assert (d["value"], d["lo"], d["hi"]) == pytest.approx((0.3, 0.3 - half, 0.3 + half))
  assert report._unpaired(a, {"results": {"10": {}}}, "irs", "all") is None


def test_report_head_tail_cosine_is_over_the_datas_frequency_groups(tmp_path):
  """The report's head-vs-tail cosine is the mean over the record's frequency/head x
  frequency/tail block of the stored class-cosine matrix, whatever head and tail the run's
  diagnostics took (a K = 1 run's used to include the healthy class); NaN pairs are skipped."""
  names = ["a", "b", "c", "d", "e"]
  cos = np.array([[1, .8, .1, -.2, .3], [.8, 1, 0, -.4, np.nan], [.1, 0, 1, .6, .5],
                  [-.2, -.4, .6, 1, .7], [.3, np.nan, .5, .7, 1]])
  groups = {"frequency/healthy": ["a"], "frequency/head": ["b", "c"],
            "frequency/tail": ["d", "e"]}
  records = []
  for seed, sign in ((0, 1), (1, -1)):
    r = {"backbone": "dit", "target": "t", "run": "shared", "seed": seed, "steps": 9,
         "results": {"9": {"meta": {"groups": groups}}}}
    path = tmp_path / "dit" / "t" / "shared" / f"seed{seed}" / "diagnostics" / "step_9.json"
    path.parent.mkdir(parents=True)
    m = sign * cos
    path.write_text(json.dumps(
        {"class_names": names, "head_classes": ["a", "b"], "tail_classes": ["e"],
         "head_tail": {"all": 9.0}, "intra_pooled": 0.5, "inter": None,
         "class_cos": {"all": np.where(np.isnan(m), None, m).tolist()}}))
    records.append(r)
  out = report.diagnostics(records[:1], str(tmp_path))
  assert out["head_tail_cosine"] == pytest.approx(np.mean([-.4, .6, .5]))
  assert (out["head_classes"], out["tail_classes"]) == (["b", "c"], ["d", "e"])
  both = report.diagnostics(records, str(tmp_path))
  assert both["seeds"] == 2 and both["head_tail_cosine"] == pytest.approx(0)
  assert both["inter"] is None and both["intra_pooled"] == 0.5


def test_study_smoke_end_to_end(tmp_path, monkeypatch):
  """Three runs on the smoke study through the CLI: sweep, ledger, study.json, the report; a
  fresh workdir continues from the ledger; a replicating target; runs made stale by a changed
  config."""
  out, doc = tmp_path / "study.json", tmp_path / "docs" / "RESULTS.md"
  w, ledger = tmp_path / "w", tmp_path / "ledger"
  cmd = [sys.executable, "-m", "grasp_jax.study", f"--workdir={w}", f"--ledger={ledger}",
         f"--out={out}", f"--doc={doc}", "--runs=base,grasp,shared",
         "--config=configs/study.py:smoke,seeds=1"]
  # One CPU device, as the study runs here: with the suite's 8 fake devices on 2 loaded cores
  # the held-out alignment's gradient accumulation (run/gradient_partition.accumulate: jitted
  # sums with an all-reduce, added eagerly) intermittently deadlocked in XLA:CPU's in-process
  # all-reduce (aborted by its 40 s rendezvous timeout; with the timeout raised, stuck for good).
  # Sharded gradient sums are tested in-process (test_gradient_conflict, test_sharding).
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400, env=env)
  (tmp_path / "study.stderr").write_text(proc.stderr)
  # An abort's cause (a C++ CHECK or LOG(FATAL) line) comes just before the Python stacks, and
  # those before a long list of extension modules: show both.
  fatal = proc.stderr.find("Fatal Python error")
  assert proc.returncode == 0, proc.stderr[max(0, fatal - 3000):fatal + 4000] if fatal >= 0 \
      else proc.stderr[-3000:]
  data = json.loads(out.read_text())
  runs = data["runs"]["dit"]
  assert set(runs) == {"base", "grasp", "shared"}
  assert data["provenance"]["lr_sweep"]["dit"]["grasp"]["lr"] > 0
  assert set(data["provenance"]["evaluator_robustness"]) == {"none", "brightness+40",
                                                            "noise_sd20", "blocks4x4"}
  # GRASP trains K adapters, the shared adapter one at the same rank.
  assert 0 < runs["shared"]["trainable_params"] < runs["grasp"]["trainable_params"]
  assert runs["base"]["trainable_params"] == 0 and data["provenance"]["steps"] > 0
  tail = runs["grasp"]["groups"]["frequency/tail"]
  assert tail["coverage"]["n"] == 1 and tail["coverage"]["lo"] <= tail["coverage"]["mean"]
  assert "coverage" in data["floors"]["frequency/tail"]
  assert {(v["b"], v["metric"]) for v in data["verdicts"]} >= {("shared", "coverage"),
                                                               ("base", "kid")}
  assert all(v["verdict"] in ("better", "worse", "inconclusive") for v in data["verdicts"])
  irs = [v for v in data["verdicts"] if v["metric"] == "irs"]
  assert irs and all(not v["paired"] and v["verdict"] == "inconclusive" for v in irs)  # 1 seed.
  # Gradient conflict at the last step of every fine-tuned run; held-out partition alignment.
  assert runs["grasp"]["diagnostics"]["seeds"] == 1 and runs["base"]["diagnostics"] is None
  assert -1 <= runs["grasp"]["diagnostics"]["head_tail_cosine"] <= 1
  assert data["alignment"]["dit"]["partitions"] == ["grasp"]
  assert "| grasp |" in doc.read_text() and data["replication"] == {}
  # The ledger alone makes the report: the same from a copy of it, with no workdir.
  shutil.copytree(ledger, tmp_path / "clone")
  # With an extra pair (two runs neither of which is `compare_to`): the same verdicts, then its.
  s = study_config.get_config("smoke,seeds=1")
  s.extra_pairs = (("shared", "base"),)
  report.write(study.collect(s, str(tmp_path / "clone")), s, str(tmp_path / "clone"),
               str(tmp_path / "again.json"), str(tmp_path / "again.md"))
  again = json.loads((tmp_path / "again.json").read_text())
  extra = [v for v in again["verdicts"] if v["a"] == "shared"]
  assert again["runs"] == data["runs"] and again["verdicts"][:len(data["verdicts"])] == \
      data["verdicts"] and len(extra) == len(again["verdicts"]) - len(data["verdicts"])
  assert {v["b"] for v in extra} == {"base"} and {v["metric"] for v in extra} >= {"coverage"}
  base_kid = lambda a: next(v for v in again["verdicts"] if (v["a"], v["b"], v["metric"],
                            v["group"]) == (a, "base", "kid", "frequency/tail"))
  # Paired over the same images, the differences chain: (grasp - base) - (shared - base).
  assert base_kid("grasp")["diff"] - base_kid("shared")["diff"] == pytest.approx(
      next(v["diff"] for v in data["verdicts"] if (v["b"], v["metric"], v["group"]) ==
           ("shared", "kid", "frequency/tail")), rel=1e-5, abs=1e-6)
  assert "`shared` vs `base`" in (tmp_path / "again.md").read_text()
  kept = {p.relative_to(ledger / "dit" / "target_small" / "grasp" / "seed0").parts[0]
          for p in (ledger / "dit" / "target_small" / "grasp" / "seed0").rglob("*")}
  assert kept == {"study_run.json", "eval", "diagnostics", "partition.json", "samples"}
  # A second target replicates the headline runs: the same runs relabelled must report the same.
  shutil.copytree(ledger / "dit" / "target_small", ledger / "dit" / "target_copy")
  s.targets = ("target_small", "target_copy")
  s.healthy = {**s.healthy, "target_copy": s.healthy["target_small"]}
  for path in (ledger / "dit" / "target_copy").glob("*/seed*/study_run.json"):
    r = {**json.loads(path.read_text()), "target": "target_copy"}
    config = study_configs.run_config(s, str(w), "dit", "target_copy", r["run"], r["seed"], "",
                                      r["lr"])
    path.write_text(json.dumps({**r, "config_sha": study_configs.config_sha(config)}))
  report.write(study.collect(s, str(ledger)), s, str(ledger), str(out), str(doc))
  copy = json.loads(out.read_text())["replication"]["target_copy"]
  assert copy["runs"] == data["runs"] and copy["verdicts"] == again["verdicts"]
  assert "Replication on `target_copy`" in doc.read_text()
  # A changed config (here GRASP's sampler) makes GRASP's finished runs stale: they leave the
  # report, and the next study run removes them from the ledger, moves their run dir to
  # superseded/ and redoes them.
  s.runs.dit.grasp.sample.steps += 1
  assert {r["run"] for r in study.collect(s, str(ledger))} == {"base", "shared"}
  from grasp_jax.run import stages  # pylint: disable=g-import-not-at-top

  def redo(config, run_dir):
    raise RuntimeError(f"redo {config.sample.steps} in {run_dir}")
  monkeypatch.setattr(stages, "train_and_evaluate", redo)
  lrs = {"grasp": {"lr": data["runs"]["dit"]["grasp"]["lr"]}}
  seed0 = w / "dit" / "target_small" / "grasp" / "seed0"
  with pytest.raises(RuntimeError, match=f"redo {s.runs.dit.grasp.sample.steps} in {seed0}"):
    study.run_one(s, str(w), str(ledger), "dit", "target_small", "grasp", 0, "", lrs)
  # So are groups recorded under another grouping rule (a code change config_sha cannot see;
  # the rule that took the shared adapter's one cluster for its frequency groups).
  for root in (ledger, w):
    path = root / "dit" / "target_small" / "shared" / "seed0" / "study_run.json"
    r = json.loads(path.read_text())
    meta = r["results"][str(r["steps_evaluated"][-1])]["meta"]
    meta["groups"]["frequency/head"] = meta["class_names"]
    path.write_text(json.dumps(r))
  kept = {(r["target"], r["run"]) for r in study.collect(s, str(ledger))}
  assert ("target_small", "shared") not in kept and ("target_copy", "shared") in kept
  with pytest.raises(RuntimeError, match="redo"):
    study.run_one(s, str(w), str(ledger), "dit", "target_small", "shared", 0, "", lrs)
  assert not (ledger / "dit" / "target_small" / "shared" / "seed0").exists()
  moved = w / "superseded" / "dit" / "target_small" / "grasp" / "seed0.1"
  assert (moved / "study_run.json").exists() and not (seed0 / "study_run.json").exists()
  assert not (ledger / "dit" / "target_small" / "grasp" / "seed0").exists()
  # A finished run is taken from the ledger, even in a workdir that never saw it (another
  # machine, a fresh clone): `redo` would raise.
  assert study.run_one(s, str(tmp_path / "fresh"), str(ledger), "dit", "target_small", "base", 0,
                       "", lrs)["run"] == "base"
  # A sweep measured at other steps is redone at the study's; its old runs are superseded.
  before = json.loads((ledger / "dit" / "sweep.json").read_text())["grasp"]
  assert before["steps"] == s.sweep_steps
  s.sweep_steps += 2
  assert "grasp" not in report.provenance(study.collect(s, str(ledger)), s,
                                          str(ledger))["lr_sweep"]["dit"]
  after = study.sweep(s, str(w), str(ledger), "dit", str(w / "dit" / "base"), {"grasp"})["grasp"]
  assert after["steps"] == s.sweep_steps and after["losses"] != before["losses"]
  assert (w / "superseded" / "dit" / "sweep").is_dir()
  # So is a sweep whose run changed (here GRASP's rank): it leaves the report's provenance.
  assert after["config_sha"] == study_configs.sweep_sha(s, "dit", "grasp")
  s.runs.dit.grasp.method.rank += 1
  assert "grasp" not in report.provenance(study.collect(s, str(ledger)), s,
                                          str(ledger))["lr_sweep"]["dit"]
