"""The study's report: the ledger's runs (grasp_jax/run/study.py) -> results/study.json and
docs/RESULTS.md.

Per run (backbone, run; the first target is the headline, later targets replicate the headline
runs and are reported under `replication`): per group the final evaluation's metrics as {mean,
lo, hi}. One seed: the value and its bootstrap interval over images. Several seeds: the mean
over seeds, with mean +- 1.96 * sqrt(var_seeds / n + mean (se_within^2) / n), se_within from
each seed's 95% interval (a normal approximation that counts both the seed-to-seed and the
image-level noise). Floors: the real-vs-real value of every metric (the evaluation's held-out
real twin against the same reference, at the samples' N). Verdicts: `compare_to` against every
other run and the config's `extra_pairs` (`pairs`), per group and metric, from the paired bootstrap over images
(grasp_jax.evaluation.compare) at matched seeds, combined over seeds as above; `better` /
`worse` only when the interval excludes 0.
"""
import collections
import math
import os
import shutil
import subprocess

import numpy as np
import PIL.Image

from grasp_jax import files
from grasp_jax.evaluation import compare
from grasp_jax.evaluation import gradient_conflict
from grasp_jax.evaluation import intervals
from grasp_jax.evaluation import plots
from grasp_jax.inference import generate
from grasp_jax.run import study_configs

# (block, metric, higher is better) reported per group.
METRICS = (("domain", "fd", False), ("domain", "kid", False), ("domain", "precision", True),
           ("domain", "recall", True), ("domain", "coverage", True), ("retrieval", "irs", True),
           ("retrieval", "memorization", False), ("accuracy", "conditional_accuracy", True))
GROUPS = ("frequency/head", "frequency/medium", "frequency/tail", "frequency/healthy", "all")
# The early-vs-final table (tail overfitting shows as a drop between the two evaluations).
TRAJECTORY = (("accuracy", "conditional_accuracy"), ("domain", "coverage"), ("domain", "fd"))
GRID_RUNS = ("base", "full", "grasp", "shared")
GRID_PER_CLASS = 4  # Samples per tail class and run in the grid (the ledger keeps as many).
REPLICATION_METRICS = ("coverage", "kid", "conditional_accuracy", "irs")


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


def early(records):
  """{step, groups {group: {metric: {mean, lo, hi, n}}}} of the first in-training evaluation of
  a run's seeds (TRAJECTORY metrics), or None when only one evaluation exists."""
  steps = sorted({int(s) for r in records for s in r["results"]})
  if len(steps) < 2:
    return None
  first = [r["results"].get(str(steps[0])) for r in records]
  return {"step": steps[0], "groups": {
      g: {m: combine([(_entry(f, b, g) or {}).get(m) for f in first if f])
          for b, m in TRAJECTORY} for g in GROUPS}}


def diagnostics(records, ledger):
  """Mean over seeds of the final gradient-conflict diagnostics (LEDGER/.../diagnostics/
  step_<final>.json): the head-vs-tail class cosine of the FFN-kernel gradients on held-out
  batches, over the data's frequency/head and frequency/tail classes (the record's evaluation
  groups; recomputed from the stored class-cosine matrix, so runs recorded when the head and
  tail came from the run's partition are compared on the same classes too), and the within- and
  between-cluster cosine of the run's partition; None when the runs have none."""
  found = []
  for r in records:
    path = os.path.join(_dir(ledger, r), "diagnostics", f"step_{r['steps']}.json")
    if not os.path.exists(path):
      continue
    d = files.read_json(path)
    groups = _final(r)["meta"]["groups"]
    head, tail = ([d["class_names"].index(c) for c in groups[f"frequency/{g}"]]
                  for g in ("head", "tail"))
    cos = np.array(d["class_cos"][gradient_conflict.ALL], float)  # JSON null (NaN) -> nan.
    found.append({**d, "head_tail_cosine": gradient_conflict.head_tail_cosine(cos, (head, tail)),
                  "head_classes": groups["frequency/head"],
                  "tail_classes": groups["frequency/tail"]})
  if not found:
    return None
  def mean(key):  # None where no seed defines it (K = 1 has no between-cluster pairs).
    values = [d[key] for d in found if d.get(key) is not None]
    return float(np.mean(values)) if values else None
  return {"seeds": len(found), "head_tail_cosine": mean("head_tail_cosine"),
          "intra_pooled": mean("intra_pooled"), "inter": mean("inter"),
          "head_classes": found[0]["head_classes"], "tail_classes": found[0]["tail_classes"]}


def aggregate(records, study, ledger, target=None):
  """The `runs` and `floors` of study.json (module docstring) on `target` (default: the
  headline target)."""
  runs, floors = {}, {}
  target = target or study.targets[0]
  for (backbone, run), rs in _by([r for r in records if r["target"] == target],
                                 "backbone", "run").items():
    per_seed = [run_metrics(_final(r)) for r in sorted(rs, key=lambda r: r["seed"])]
    groups = {g: {m: combine([p[0].get(g, {}).get(m) for p in per_seed])
                  for _, m, _ in METRICS} for g in GROUPS}
    runs.setdefault(backbone, {})[run] = {
        "seeds": sorted(r["seed"] for r in rs), "lr": rs[0]["lr"],
        # A zero-step run trains nothing (its adapters are still their zero initialisation).
        "trainable_params": rs[0]["trainable_params"] if rs[0]["steps"] else 0, "groups": groups,
        "early": early(rs), "diagnostics": diagnostics(rs, ledger)}
    if run == study.compare_to:
      floors = {g: dict(per_seed[0][1].get(g, {})) for g in GROUPS}
  return runs, floors


def pairs(study):
  """The (a, b) run pairs given verdicts: `compare_to` against every other run, then the
  config's `extra_pairs`."""
  return ([(study.compare_to, r) for r in study.run_order if r != study.compare_to]
          + [tuple(p) for p in study.extra_pairs])


def verdicts(records, study, ledger, target=None):
  """Paired verdicts a vs b of every `pairs` pair trained at matched seeds (module docstring)
  on `target` (default: the headline target)."""
  out = []
  target = target or study.targets[0]
  by_run = _by([r for r in records if r["target"] == target], "backbone", "run")
  directions = dict(compare.DIRECTION)
  for backbone in sorted({b for b, _ in by_run}):
    for a_run, b_run in pairs(study):
      ref = {r["seed"]: r for r in by_run.get((backbone, a_run), [])}
      matched = [(ref[r["seed"]], r) for r in by_run.get((backbone, b_run), []) if r["seed"] in ref]
      for group in GROUPS if matched else ():
        for metric in study.verdict_metrics:
          if metric in UNPAIRED:
            c = combine([_unpaired(a, b, metric, group) for a, b in matched])
            decided = c["n"] >= 2  # One seed: its interval ignores the seed-to-seed spread.
          else:
            diffs = [compare.paired(_dir(ledger, a), _dir(ledger, b), metric, group,
                                    n_boot=study.verdict_boot) for a, b in matched]
            c = combine([{"value": d["diff"], "lo": d["lo"], "hi": d["hi"]} for d in diffs])
            decided = True
          direction = UNPAIRED.get(metric, directions.get(metric))
          out.append({"backbone": backbone, "a": a_run, "b": b_run, "group": group,
                      "metric": metric, "diff": c["mean"], "lo": c["lo"], "hi": c["hi"],
                      "seeds": len(matched), "paired": metric not in UNPAIRED,
                      "verdict": intervals.verdict(c["lo"], c["hi"], direction)
                      if decided and c["mean"] is not None else "inconclusive"})
  return out


# Metrics without a paired bootstrap (compare.py: resampling invents IRS's collisions), with
# whether higher is better: a seed's difference a - b gets the interval of two independent
# estimates, and a verdict needs >= 2 matched seeds.
UNPAIRED = {"irs": True}


def _unpaired(a, b, metric, group):
  """{value, lo, hi} of a - b for one seed pair from the two runs' own intervals."""
  block = next(blk for blk, m, _ in METRICS if m == metric)
  ea, eb = ((_entry(_final(r), block, group) or {}).get(metric) for r in (a, b))
  if not ea or not eb or ea.get("value") is None or eb.get("value") is None:
    return None
  se2 = sum(((e["hi"] - e["lo"]) / 3.92) ** 2 for e in (ea, eb) if e.get("lo") is not None)
  diff = ea["value"] - eb["value"]
  return {"value": diff, "lo": diff - 1.96 * math.sqrt(se2), "hi": diff + 1.96 * math.sqrt(se2)}


def _dir(ledger, r):
  return os.path.join(ledger, r["backbone"], r["target"], r["run"], f"seed{r['seed']}")


def provenance(records, study, ledger):
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  any_run = next((r for r in records if r["run"] == study.compare_to), records[0])
  final = _final(any_run)
  # Sweeps made under another config are stale (redone when their family comes up).
  sweeps = {b: {fam: e for fam, e in files.read_json(p).items() if fam in study.lr_grid
                and e.get("config_sha") == study_configs.sweep_sha(study, b, fam)}
            for b in study.backbones
            if os.path.exists(p := os.path.join(ledger, b, "sweep.json"))}
  return {"commit": commit, "target": {"builder": "fashion_mnist_lt", "configs":
                                       list(study.targets), "headline": study.targets[0]},
          "evaluator_accuracy": final["evaluator"]["accuracy"],
          "evaluator_ok": final["evaluator"]["ok"],
          # One evaluator serves every run; runs evaluated before it was measured lack it.
          "evaluator_robustness": next((_final(r)["evaluator"]["robustness"] for r in records
                                        if "robustness" in _final(r)["evaluator"]), None),
          "n_per_group": {g: (_entry(final, "domain", g) or {}).get("n_fake") for g in GROUPS},
          "steps": max(r["steps"] for r in records), "batch": any_run["batch_size"],
          "lr_sweep": sweeps}


def _fmt(stat):
  if not stat or stat.get("mean") is None:
    return "–"
  if stat.get("lo") is None:
    return f"{stat['mean']:.3g}"
  return f"{stat['mean']:.3g} [{stat['lo']:.3g}, {stat['hi']:.3g}]"


def _grid(ledger, records, backbone, tail_classes, per_class=GRID_PER_CLASS):
  """Tail-class samples of GRID_RUNS (seed 0, headline target) as one image, rows = runs."""
  rows, names = [], []
  for run in GRID_RUNS:
    r = next((r for r in records if (r["backbone"], r["run"], r["seed"]) == (backbone, run, 0)
              and r["target"] == records[0]["target"]), None)
    if r is None:
      continue
    tiles = []
    for cls in tail_classes:
      folder = os.path.join(_dir(ledger, r), "samples", generate.folder_name(cls))
      pngs = sorted(os.listdir(folder))[:per_class] if os.path.isdir(folder) else []
      tiles += [np.asarray(PIL.Image.open(os.path.join(folder, p)).convert("L")) for p in pngs]
    if tiles:
      rows.append(np.concatenate(tiles, axis=1))
      names.append(run)
  return (np.concatenate(rows, axis=0), names) if rows else (None, names)


def alignment(study, ledger):
  """{backbone: LEDGER/<backbone>/<headline target>/alignment.json} of those that exist."""
  paths = {b: os.path.join(ledger, b, study.targets[0], "alignment.json") for b in study.backbones}
  return {b: files.read_json(p) for b, p in paths.items() if os.path.exists(p)}


def summary(data, study):
  """The report's generated summary: per backbone and `pairs` pair, on the tail group, from
  the verdicts (which metrics a wins, loses, cannot tell against b)."""
  lines = []
  for backbone in data["runs"]:
    for a, b in pairs(study):
      vs = [v for v in data["verdicts"] if (v["backbone"], v["a"], v["b"], v["group"]) ==
            (backbone, a, b, "frequency/tail")]
      if not vs:
        continue
      by = collections.defaultdict(list)
      for v in vs:
        by[v["verdict"]].append(v["metric"])
      seeds = max(v["seeds"] for v in vs)
      lines.append(f"- {backbone}, tail group, `{a}` vs `{b}` ({seeds} matched "
                   f"seed{'s' if seeds > 1 else ''}): better on {_names(by['better'])}; worse on "
                   f"{_names(by['worse'])}; cannot tell on {_names(by['inconclusive'])}.")
  return lines


def _names(metrics):
  return ", ".join(metrics) if metrics else "none"


def write(records, study, ledger, out_path, doc_path):
  """results/study.json and docs/RESULTS.md from the finished records; returns the json."""
  if not records:
    raise ValueError(f"no finished runs in {ledger}")
  runs, floors = aggregate(records, study, ledger)
  # Later targets replicate the headline comparison under another class -> count permutation.
  replication = {t: {"runs": aggregate(records, study, ledger, t)[0],
                     "verdicts": verdicts(records, study, ledger, t)}
                 for t in study.targets[1:] if any(r["target"] == t for r in records)}
  data = {"provenance": provenance(records, study, ledger), "runs": runs, "floors": floors,
          "verdicts": verdicts(records, study, ledger),
          "alignment": alignment(study, ledger), "replication": replication}
  files.write_json(out_path, data)
  prov = data["provenance"]
  planned = {r for r in study.runs[study.backbones[0]]}
  lines = [
      "# Study results", "",
      "Generated by `python -m grasp_jax.study` (grasp_jax/run/study.py, configs/study.py) from "
      "the study's ledger (`results/study/`); numbers in `results/study.json`. Do not edit by hand.", "",
      f"Provenance: commit `{prov['commit']}`, target `{study.targets[0]}`, evaluator accuracy "
      f"on real target test images {prov['evaluator_accuracy']:.3f}"
      + ("" if prov["evaluator_ok"] else " (**below the floor: flagged**)")
      + f", {prov['steps']} steps at batch {prov['batch']}; samples per group: "
      + ", ".join(f"{g} {n}" for g, n in prov["n_per_group"].items()) + ".", ""]
  if prov["evaluator_robustness"]:
    lines += ["The evaluator's accuracy on the real reference images as they are and under "
              "low-level changes that samples often carry (class identity unchanged): "
              + ", ".join(f"{k} {v:.3f}" for k, v in prov["evaluator_robustness"].items())
              + ". A large drop means that conditional accuracy also scores how well samples "
              "match the target's brightness and texture, not only their class.", ""]
  for backbone, table in runs.items():
    missing = sorted(planned - set(table))
    lines += [f"Finished runs ({backbone}): {len(table)} of {len(planned)}"
              + (f"; not yet run: {', '.join(missing)}." if missing else "."), ""]
  lines += ["## Summary (generated from the paired verdicts)", "", *summary(data, study), ""]
  tail = "frequency/tail"
  for target, rep in replication.items():
    lines += [f"## Replication on `{target}` (another class -> count permutation), tail group",
              "", "| run | seeds | " + " | ".join(REPLICATION_METRICS) + " |",
              "|---" * (len(REPLICATION_METRICS) + 2) + "|"]
    for backbone, table in rep["runs"].items():
      for run, entry in table.items():
        lines.append(f"| {backbone} {run} | {len(entry['seeds'])} | " + " | ".join(
            _fmt(entry["groups"][tail][m]) for m in REPLICATION_METRICS) + " |")
    lines += ["", *summary(rep, study), ""]
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
    lines += [f"## {backbone}: early vs final evaluation, tail group", "",
              "| run | " + " | ".join(f"{m} early | {m} final" for _, m in TRAJECTORY) + " |",
              "|---" * (2 * len(TRAJECTORY) + 1) + "|"]
    for run, entry in table.items():
      if entry["early"]:
        tail = "frequency/tail"
        lines.append(f"| {run} (step {entry['early']['step']}) | " + " | ".join(
            f"{_fmt(entry['early']['groups'][tail][m])} | {_fmt(entry['groups'][tail][m])}"
            for _, m in TRAJECTORY) + " |")
    lines += ["", f"## {backbone}: gradient conflict after fine-tuning", "",
              "Cosine of the class-mean loss gradients w.r.t. the FFN kernels on held-out "
              "class-balanced batches (mean over seeds): head classes vs tail classes, and "
              "within vs between the run's clusters.", "",
              "| run | seeds | head-vs-tail | within clusters | between clusters |",
              "|---|---|---|---|---|"]
    for run, entry in table.items():
      d = entry["diagnostics"]
      if d:
        lines.append(f"| {run} | {d['seeds']} | " + " | ".join(
            "–" if d[k] is None else f"{d[k]:.3f}"
            for k in ("head_tail_cosine", "intra_pooled", "inter")) + " |")
    lines.append("")
  for backbone, a in data["alignment"].items():
    rel = a["reliability"]
    lines += [f"## {backbone}: partitions' gradient alignment on held-out batches", "",
              f"Frozen base, `{a['split']}` split (split-half r = {rel['split_half']:.3f}): "
              "mean class-gradient cosine within and between each partition's clusters.", "",
              "| partition (run) | within | between | gap |", "|---|---|---|---|"]
    for name in a["partitions"]:  # K = C has no within-cluster pairs: "–".
      lines.append(f"| {name} | " + " | ".join(
          "–" if a[name][k] is None else f"{a[name][k]:{f}}"
          for k, f in (("intra_pooled", ".3f"), ("inter", ".3f"), ("gap", "+.3f"))) + " |")
    lines.append("")
  counts = collections.Counter((v["a"], v["b"], v["verdict"]) for v in data["verdicts"]
                               if v["group"] == "frequency/tail")
  lines += ["## Paired verdicts on the tail group", "",
            "a against b: better / worse / inconclusive over "
            f"{', '.join(study.verdict_metrics)} (paired bootstrap over images at matched seeds; "
            "IRS unpaired, decided only with >= 2 seeds).", "",
            "| a | b | better | worse | inconclusive |", "|---|---|---|---|---|"]
  for a, b in dict.fromkeys((v["a"], v["b"]) for v in data["verdicts"]):
    lines.append(f"| {a} | {b} | {counts[(a, b, 'better')]} | {counts[(a, b, 'worse')]} | "
                 f"{counts[(a, b, 'inconclusive')]} |")
  if prov["lr_sweep"]:
    lines += ["", "## Learning-rate sweep", "",
              "Validation loss on the target's class-balanced validation split after the sweep's "
              "steps (fixed noise and timesteps); the lowest is used.", "",
              "| backbone | family | chosen | losses by rate |", "|---|---|---|---|"]
    for backbone, sweep in prov["lr_sweep"].items():
      for fam, e in sorted(sweep.items()):
        rates = sorted(e["losses"], key=float)
        losses = ", ".join(f"{lr}: {e['losses'][lr]:.5f}" for lr in rates)
        edge = " (grid edge)" if str(e.get("lr")) in (rates[0], rates[-1]) else ""
        chosen = f"{e['lr']}{edge}" if "lr" in e else "(in progress)"
        lines.append(f"| {backbone} | {fam} | {chosen} | {losses} |")
  doc_dir = os.path.dirname(os.path.abspath(doc_path))
  for backbone in runs:
    tail = _entry(_final(records[0]), "domain", "frequency/tail") or {}
    grid, names = _grid(ledger, records, backbone, tail.get("classes", []))
    if grid is not None:
      rel = os.path.join("study", f"tail_{backbone}.png")
      plots.save_png(os.path.join(doc_dir, rel), grid)
      lines += ["", f"Tail-class samples ({backbone}; rows: {', '.join(names)}):", "",
                f"![tail samples]({rel})"]
    heatmap = os.path.join(ledger, backbone, study.targets[0], "grasp_gradient", "seed0",
                           "partition_alignment.png")
    if os.path.exists(heatmap):
      rel = os.path.join("study", f"partition_alignment_{backbone}.png")
      os.makedirs(os.path.join(doc_dir, "study"), exist_ok=True)
      shutil.copyfile(heatmap, os.path.join(doc_dir, rel))
      lines += ["", f"The measured (gradient) partition's class cosine matrix on the target's "
                f"training split, ordered by cluster ({backbone}):", "",
                f"![gradient partition]({rel})"]
  os.makedirs(doc_dir, exist_ok=True)
  with open(doc_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return data
