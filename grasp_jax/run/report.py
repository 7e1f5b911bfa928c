"""The study's report: per-run records -> results/study.json and docs/RESULTS.md.

Per run (backbone, run; the first target is the headline, every target is kept): per group the
final evaluation's metrics as {mean, lo, hi}. One seed: the value and its bootstrap interval over
images. Several seeds: the mean over seeds, with mean +- 1.96 * sqrt(var_seeds / n + mean
(se_within^2) / n), se_within from each seed's 95% interval (a normal approximation that counts
both the seed-to-seed and the image-level noise). Floors: the real-vs-real value of every metric
(the evaluation's held-out real twin against the same reference, at the samples' N). Verdicts:
`compare_to` against every other run, per group and metric, from the paired bootstrap over
images (grasp_jax.evaluation.compare) at matched seeds, combined over seeds as above; `better` /
`worse` only when the interval excludes 0.
"""
import collections
import math
import os
import subprocess

import numpy as np
import PIL.Image

from grasp_jax import files
from grasp_jax.evaluation import compare
from grasp_jax.evaluation import intervals
from grasp_jax.evaluation import plots
from grasp_jax.inference import generate

# (block, metric, higher is better) reported per group.
METRICS = (("domain", "fd", False), ("domain", "kid", False), ("domain", "precision", True),
           ("domain", "recall", True), ("domain", "coverage", True), ("retrieval", "irs", True),
           ("retrieval", "memorization", False), ("accuracy", "conditional_accuracy", True))
GROUPS = ("frequency/head", "frequency/medium", "frequency/tail", "all")
GRID_RUNS = ("base", "full", "grasp", "shared")


def _final(record):
  return record["results"][str(max(int(s) for s in record["results"]))]


def _entry(results, block, group):
  b = results.get(block)
  if b is None:
    return None
  return b["all"] if group == "all" else b["groups"].get(group)


def run_metrics(results):
  """{group: {metric: {value, lo, hi}}} and {group: {metric: floor}} of one evaluation."""
  values, floors = collections.defaultdict(dict), collections.defaultdict(dict)
  for group in GROUPS:
    for block, metric, _ in METRICS:
      e = _entry(results, block, group)
      if e and e.get(metric):
        values[group][metric] = {k: e[metric].get(k) for k in ("value", "lo", "hi")}
        floor = (e.get("floor") or {}).get(metric)
        floors[group][metric] = floor.get("value") if floor else None
  return values, floors


def combine(estimates):
  """[{value, lo, hi}] over seeds -> {mean, lo, hi, n} (module docstring)."""
  est = [e for e in estimates if e and e.get("value") is not None]
  if not est:
    return {"mean": None, "lo": None, "hi": None, "n": 0}
  v = np.array([e["value"] for e in est], np.float64)
  if len(est) == 1:
    return {"mean": float(v[0]), "lo": est[0].get("lo"), "hi": est[0].get("hi"), "n": 1}
  se = np.array([(e["hi"] - e["lo"]) / 3.92 if e.get("lo") is not None else 0.0 for e in est])
  half = 1.96 * math.sqrt(np.var(v, ddof=1) / len(v) + np.mean(se**2) / len(v))
  return {"mean": float(v.mean()), "lo": float(v.mean() - half), "hi": float(v.mean() + half),
          "n": len(est)}


def _by(records, *keys):
  out = collections.defaultdict(list)
  for r in records:
    out[tuple(r[k] for k in keys)].append(r)
  return out


def aggregate(records, study):
  """The `runs` and `floors` of study.json (module docstring)."""
  runs, floors = {}, {}
  target = study.targets[0]
  for (backbone, run), rs in _by([r for r in records if r["target"] == target],
                                 "backbone", "run").items():
    per_seed = [run_metrics(_final(r)) for r in sorted(rs, key=lambda r: r["seed"])]
    groups = {g: {m: combine([p[0].get(g, {}).get(m) for p in per_seed])
                  for _, m, _ in METRICS} for g in GROUPS}
    runs.setdefault(backbone, {})[run] = {
        "seeds": sorted(r["seed"] for r in rs), "lr": rs[0]["lr"],
        "trainable_params": rs[0]["trainable_params"], "groups": groups}
    if run == study.compare_to:
      floors = {g: dict(per_seed[0][1].get(g, {})) for g in GROUPS}
  return runs, floors


def verdicts(records, study, workdir):
  """Paired verdicts `compare_to` vs every other run (module docstring)."""
  out = []
  target = study.targets[0]
  by_run = _by([r for r in records if r["target"] == target], "backbone", "run")
  directions = dict(compare.DIRECTION)
  for (backbone, run), rs in sorted(by_run.items()):
    ref = {r["seed"]: r for r in by_run.get((backbone, study.compare_to), [])}
    pairs = [(ref[r["seed"]], r) for r in rs if r["seed"] in ref]
    if run == study.compare_to or not pairs:
      continue
    for group in GROUPS:
      for metric in study.verdict_metrics:
        diffs = [compare.paired(_dir(workdir, a), _dir(workdir, b), metric, group)
                 for a, b in pairs]
        c = combine([{"value": d["diff"], "lo": d["lo"], "hi": d["hi"]} for d in diffs])
        out.append({"backbone": backbone, "a": study.compare_to, "b": run, "group": group,
                    "metric": metric, "diff": c["mean"], "lo": c["lo"], "hi": c["hi"],
                    "seeds": len(pairs),
                    "verdict": intervals.verdict(c["lo"], c["hi"], directions[metric])})
  return out


def _dir(workdir, r):
  return os.path.join(workdir, r["backbone"], r["target"], r["run"], f"seed{r['seed']}")


def provenance(records, study, workdir):
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  any_run = next((r for r in records if r["run"] == study.compare_to), records[0])
  final = _final(any_run)
  sweeps = {b: files.read_json(p) for b in study.backbones
            if os.path.exists(p := os.path.join(workdir, b, "sweep.json"))}
  return {"commit": commit, "target": {"builder": "fashion_mnist_lt", "configs":
                                       list(study.targets), "headline": study.targets[0]},
          "evaluator_accuracy": final["evaluator"]["accuracy"],
          "evaluator_ok": final["evaluator"]["ok"],
          "n_per_group": {g: (_entry(final, "domain", g) or {}).get("n_fake") for g in GROUPS},
          "steps": any_run["steps"], "batch": any_run["batch_size"], "lr_sweep": sweeps}


def _fmt(stat):
  if not stat or stat.get("mean") is None:
    return "–"
  if stat.get("lo") is None:
    return f"{stat['mean']:.3g}"
  return f"{stat['mean']:.3g} [{stat['lo']:.3g}, {stat['hi']:.3g}]"


def _grid(workdir, records, backbone, tail_classes, per_class=4):
  """Tail-class samples of GRID_RUNS (seed 0, headline target) as one image, rows = runs."""
  rows, names = [], []
  for run in GRID_RUNS:
    r = next((r for r in records if (r["backbone"], r["run"], r["seed"]) == (backbone, run, 0)
              and r["target"] == records[0]["target"]), None)
    if r is None:
      continue
    tiles = []
    for cls in tail_classes:
      folder = os.path.join(_dir(workdir, r), "samples", generate.folder_name(cls))
      pngs = sorted(os.listdir(folder))[:per_class] if os.path.isdir(folder) else []
      tiles += [np.asarray(PIL.Image.open(os.path.join(folder, p)).convert("L")) for p in pngs]
    if tiles:
      rows.append(np.concatenate(tiles, axis=1))
      names.append(run)
  return (np.concatenate(rows, axis=0), names) if rows else (None, names)


def write(records, study, workdir, out_path, doc_path):
  """results/study.json and docs/RESULTS.md from the finished records; returns the json."""
  if not records:
    raise ValueError(f"no finished runs in {workdir}")
  runs, floors = aggregate(records, study)
  data = {"provenance": provenance(records, study, workdir), "runs": runs, "floors": floors,
          "verdicts": verdicts(records, study, workdir)}
  files.write_json(out_path, data)
  lines = [
      "# Study results", "",
      "Generated by `python -m grasp_jax.study --workdir=...` (grasp_jax/run/study.py, "
      "configs/study.py); numbers in `results/study.json`. Do not edit by hand.", "",
      f"Provenance: commit `{data['provenance']['commit']}`, target "
      f"`{study.targets[0]}`, evaluator accuracy on real target test images "
      f"{data['provenance']['evaluator_accuracy']:.3f}"
      + ("" if data["provenance"]["evaluator_ok"] else " (**below the floor: flagged**)")
      + f", {data['provenance']['steps']} steps at batch {data['provenance']['batch']}.", ""]
  for backbone, table in runs.items():
    for group in GROUPS:
      lines += [f"## {backbone}: {group}", "",
                "| run | seeds | params | " + " | ".join(m for _, m, _ in METRICS) + " |",
                "|---" * (len(METRICS) + 3) + "|"]
      lines.append("| real-vs-real floor | | | " + " | ".join(
          _fmt({"mean": floors.get(group, {}).get(m)}) for _, m, _ in METRICS) + " |")
      for run, entry in table.items():
        lines.append(f"| {run} | {len(entry['seeds'])} | {entry['trainable_params']} | "
                     + " | ".join(_fmt(entry["groups"][group][m]) for _, m, _ in METRICS) + " |")
      lines.append("")
  counts = collections.Counter((v["b"], v["verdict"]) for v in data["verdicts"]
                               if v["group"] == "frequency/tail")
  lines += ["## Paired verdicts on the tail group", "",
            f"`{study.compare_to}` against each run: better / worse / inconclusive over "
            f"{', '.join(study.verdict_metrics)} (paired bootstrap, matched seeds).", "",
            "| run | better | worse | inconclusive |", "|---|---|---|---|"]
  for run in sorted({v["b"] for v in data["verdicts"]}):
    lines.append(f"| {run} | {counts[(run, 'better')]} | {counts[(run, 'worse')]} | "
                 f"{counts[(run, 'inconclusive')]} |")
  doc_dir = os.path.dirname(os.path.abspath(doc_path))
  for backbone in runs:
    tail = _entry(_final(records[0]), "domain", "frequency/tail") or {}
    grid, names = _grid(workdir, records, backbone, tail.get("classes", []))
    if grid is not None:
      rel = os.path.join("study", f"tail_{backbone}.png")
      plots.save_png(os.path.join(doc_dir, rel), grid)
      lines += ["", f"Tail-class samples ({backbone}; rows: {', '.join(names)}):", "",
                f"![tail samples]({rel})"]
  os.makedirs(doc_dir, exist_ok=True)
  with open(doc_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return data
