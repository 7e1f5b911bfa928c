"""The study's aggregation: per-run records -> results/study.json and docs/RESULTS.md.

A record (grasp_jax.study.run_one) holds one run's evaluation (`results`, as results.json) and,
for some runs, its gradient-conflict diagnostics. `aggregate` gives
run -> backbone -> group -> metric -> {mean, std, n} over seeds (std: sample std, 0 when n = 1);
`write` adds the report with its tables, a per-group FID plot and sample grids.
"""
import collections
import json
import math
import os
import shutil

import numpy as np

from grasp_jax.evaluation import plots

GROUPS = ("healthy", "head", "medium", "tail")  # The frequency groups of the evaluation.
# (column, metric key, better) of the report's main table; the values are the tail group's.
TABLE = (("FID Inc.", "inception_fid", "lower"), ("KID Inc.", "inception_kid", "lower"),
         ("cov. Inc.", "inception_coverage", "higher"), ("FID dom.", "domain_fid", "lower"),
         ("cov. dom.", "domain_coverage", "higher"), ("Vendi", "inception_vendi", "higher"),
         ("MS-SSIM", "ms_ssim", "lower"), ("dom. acc.", "domain_accuracy", "higher"))


def run_metrics(results):
  """One run's evaluation -> {group: {metric: value}} (groups: GROUPS and 'all')."""
  out = collections.defaultdict(dict)

  def group_key(g):
    return "all" if g == "all" else f"frequency/{g}"

  for g in (*GROUPS, "all"):
    for space in ("inception", "domain"):
      if space not in results:
        continue
      block = results[space]["all"] if g == "all" else results[space]["groups"].get(group_key(g))
      for m in ("fid", "kid", "precision", "recall", "density", "coverage", "vendi"):
        if block and block.get(m) is not None:
          out[g][f"{space}_{m}"] = block[m]
    accuracy = results["domain_accuracy"]
    accuracy = accuracy["all"] if g == "all" else accuracy["groups"][group_key(g)]
    out[g]["domain_accuracy"] = accuracy["accuracy"]
    out[g]["domain_accuracy_real"] = accuracy.get("accuracy_real")
    if g != "all":
      out[g]["ms_ssim"] = results["ms_ssim"]["groups"][group_key(g)]["ms_ssim"]
    for variant in ("real", "real+synthetic", "synthetic"):
      block = results.get("downstream", {}).get(variant)
      if not block:
        continue
      block = block if g == "all" else block["groups"].get(group_key(g), {})
      for m in ("macro_f1", "balanced_accuracy", "nonzero_f1_classes"):
        if m in block:
          out[g][f"downstream_{variant}_{m}"] = block[m]
  return {g: {k: float(v) for k, v in ms.items() if v is not None} for g, ms in out.items()}


def _stats(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(records):
  """records -> run -> backbone -> group -> metric -> {mean, std, n}; plus run facts."""
  by_run = collections.defaultdict(list)
  for r in records:
    by_run[(r["run"], r["backbone"])].append(r)
  out = collections.defaultdict(dict)
  for (run, backbone), rs in by_run.items():
    per_seed = [run_metrics(r["results"]) for r in rs]
    groups = {}
    for g in per_seed[0]:
      metrics = sorted({m for p in per_seed for m in p.get(g, {})})
      groups[g] = {m: _stats([p.get(g, {}).get(m) for p in per_seed]) for m in metrics}
    diag = [r["diagnostics"] for r in rs if "diagnostics" in r]
    groups["run"] = {
        "trainable_params": _stats([r["trainable_params"] for r in rs]),
        "train_eval_seconds": _stats([r["seconds"] for r in rs]),
        **({"grad_cos_head_tail": _stats([d["head_tail"]["all"] for d in diag]),
            "grad_cos_intra_cluster": _stats([d["intra_pooled"] for d in diag]),
            "grad_cos_inter_cluster": _stats([d["inter"] for d in diag])} if diag else {})}
    out[run][backbone] = groups
    out[run][backbone]["seeds"] = sorted(r["seed"] for r in rs)
  return dict(out)


# ---------------------------------------------------------------------------------------------
# The report.

def _fmt(stat, digits=3):
  if not stat or stat.get("mean") is None:
    return "n/a"
  text = f"{stat['mean']:.{digits}g}"
  return text + (f" ± {stat['std']:.2g}" if stat["n"] > 1 else "")


def _table(agg, backbone, runs):
  head = ["run", "seeds", "trainable"] + [c for c, _, _ in TABLE] + [
      "F1 real", "F1 real+syn", "nonzero F1 (real / +syn)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for run in runs:
    a = agg.get(run, {}).get(backbone)
    if not a:
      continue
    tail, overall = a.get("tail", {}), a.get("all", {})
    row = [run, str(len(a["seeds"])), f"{a['run']['trainable_params']['mean']:,.0f}"]
    row += [_fmt(tail.get(key)) for _, key, _ in TABLE]
    row += [_fmt(overall.get("downstream_real_macro_f1")),
            _fmt(overall.get("downstream_real+synthetic_macro_f1")),
            f"{_fmt(overall.get('downstream_real_nonzero_f1_classes'), 2)} / "
            f"{_fmt(overall.get('downstream_real+synthetic_nonzero_f1_classes'), 2)}"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _groups_table(agg, backbone, runs, key, reference=None):
  """Rows: runs; columns: groups. `reference`: (label, metric key) of a last row read from the
  first run (e.g. the same metric on real images)."""
  lines = ["| run | " + " | ".join(GROUPS) + " | all |", "|---|" + "---|" * (len(GROUPS) + 1)]
  rows = [(run, agg.get(run, {}).get(backbone), key) for run in runs]
  if reference:
    rows.append((reference[0], next((a for _, a, _ in rows if a), None), reference[1]))
  for label, a, k in rows:
    if a:
      lines.append(f"| {label} | " + " | ".join(_fmt(a.get(g, {}).get(k))
                                                 for g in (*GROUPS, "all")) + " |")
  return "\n".join(lines)


def findings(agg, backbone, reference="grasp"):
  """Sentences comparing `reference` with every other run on the tail group (means; a
  difference within the larger of the two seed stds is called a tie)."""
  ref = agg.get(reference, {}).get(backbone)
  if not ref:
    return []
  out = []
  for run, by_backbone in agg.items():
    other = by_backbone.get(backbone)
    if run == reference or not other:
      continue
    wins, losses, ties = [], [], []
    for column, key, better in TABLE:
      a, b = ref.get("tail", {}).get(key), other.get("tail", {}).get(key)
      if not a or not b or a["mean"] is None or b["mean"] is None:
        continue
      margin = max(a["std"], b["std"])
      diff = a["mean"] - b["mean"]
      if abs(diff) <= margin:
        ties.append(column)
      elif (diff < 0) == (better == "lower"):
        wins.append(column)
      else:
        losses.append(column)
    single = "" if ref["tail"].get("inception_fid", {}).get("n", 1) > 1 or other["tail"].get(
        "inception_fid", {}).get("n", 1) > 1 else (
            " (one seed each: no spread measured, so small differences may be noise)")
    out.append(f"- {reference} vs {run}{single}: better on {', '.join(wins) or 'nothing'}; worse on "
               f"{', '.join(losses) or 'nothing'}; within seed spread on "
               f"{', '.join(ties) or 'nothing'}.")
  return out


def _plot_fid(agg, backbone, runs, path):
  present = [r for r in runs if backbone in agg.get(r, {})]
  if not present:
    return None
  values = {g: [agg[r][backbone].get(g, {}).get("inception_fid", {}).get("mean") or np.nan
                for r in present] for g in GROUPS}
  image = plots.per_class_bars(values, present, f"Inception FID by group ({backbone})", "FID")
  plots.save_png(path, image)
  return path


def write(records, workdir, out_path, doc_path, runs=None):
  """results/study.json and the report (+ docs/study/*.png); returns the aggregate."""
  agg = aggregate(records)
  runs = runs or list(dict.fromkeys(r["run"] for r in records))
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(agg, f, indent=1, sort_keys=True)
  image_dir = os.path.join(os.path.dirname(doc_path) or ".", "study")
  os.makedirs(image_dir, exist_ok=True)
  backbones = list(dict.fromkeys(r["backbone"] for r in records))
  meta = records[0]["results"]["meta"]
  lines = [
      "# Reproduction study: every method on both backbones",
      "",
      "Generated by `python -m grasp_jax.study --workdir=workdir/study` (grasp_jax/study.py, "
      "configs/study.py); numbers in `results/study.json`. Do not edit by hand. The report "
      "holds every run finished in the workdir (the `seeds` column); the default invocation "
      "trains all runs of configs/study.py on both backbones plus seeds 1 and 2 of `grasp` and "
      "`full` on the UNet, and an invocation with `--runs` / `--seeds` a subset.",
      "",
      f"Data `{meta['dataset']}` (long-tailed Fashion-MNIST, NIH class profile), "
      f"{meta['resolution']}px; every run fine-tunes the same pretrained small base "
      f"with the same steps ({records[0]['steps']}) and batch ({records[0]['batch_size']}), "
      f"samples {meta['n_fake']} images ({meta['sampler']}, {meta['sample_steps']} steps, "
      f"CFG {meta['guidance_scale']}) and evaluates them against {meta['n_real']} real test "
      "images. Groups are frequency terciles (head / medium / tail; `healthy` is the dominant "
      "class). Mean ± sample std over seeds where a run has several.",
      "",
      "Columns (tail group unless marked): FID/KID/coverage on Inception pool3 features and on the "
      "domain classifier's features, Vendi (Inception), intra-class MS-SSIM (lower = more "
      "diverse), domain-classifier accuracy on the samples, and the downstream classifier's "
      "macro-F1 and classes with nonzero F1 over all classes, trained on real vs real + synthetic.",
      "",
      "**Budget.** Everything ran on 2 CPU cores. The base is the demo's small UNet / MMDiT "
      "pretrained from scratch for twice the demo's steps (configs/study.py), a couple of epochs "
      "of the ~8.8k long-tailed training images: far from converged, so the samples are poor in "
      "absolute terms (compare the domain classifier's accuracy on samples with its accuracy on "
      "real test images below, and the sample grids). The tables compare methods under one "
      "equal, small budget; they do not test the paper's numbers at its scale. FID at these N "
      "(tens of images per group) is strongly biased: compare within a column only.",
  ]
  for backbone in backbones:
    lines += ["", f"## {backbone}", "", _table(agg, backbone, runs), "",
              "Inception FID by group:", "", _groups_table(agg, backbone, runs, "inception_fid"),
              "", "Domain-classifier accuracy on samples by group:", "",
              _groups_table(agg, backbone, runs, "domain_accuracy",
                            ("*real test images*", "domain_accuracy_real"))]
    plot = _plot_fid(agg, backbone, runs, os.path.join(image_dir, f"fid_{backbone}.png"))
    if plot:
      lines += ["", f"![Inception FID by group, {backbone}](study/{os.path.basename(plot)})"]
    for run in ("full", "grasp"):
      grid = _grid(workdir, backbone, run)
      if grid:
        name = f"samples_{backbone}_{run}.png"
        shutil.copy(grid, os.path.join(image_dir, name))
        lines += ["", f"Samples, {run} ({backbone}, seed 0):", "", f"![{run}](study/{name})"]
    lines += ["", f"### Findings ({backbone}, tail group, computed from the table)", ""]
    lines += findings(agg, backbone) or ["- (no GRASP run)"]
  lines += ["", "## Gradient conflict (full fine-tuning vs GRASP)", "",
            "Cosine similarity of per-class loss gradients w.r.t. the shared FFN kernels on "
            "held-out batches, measured on each trained model (`--mode=diagnose`): head-vs-tail "
            "mean, and the mean within / across GRASP clusters.", "",
            "| run | backbone | head-tail cos | intra-cluster cos | inter-cluster cos |",
            "|---|---|---|---|---|"]
  for run in runs:
    for backbone in backbones:
      a = agg.get(run, {}).get(backbone, {}).get("run", {})
      if "grad_cos_head_tail" in a:
        lines.append(f"| {run} | {backbone} | {_fmt(a['grad_cos_head_tail'])} | "
                     f"{_fmt(a['grad_cos_intra_cluster'])} | "
                     f"{_fmt(a['grad_cos_inter_cluster'])} |")
  with open(doc_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return agg


def _grid(workdir, backbone, run):
  folder = os.path.join(workdir, backbone, run, "seed0", "plots")
  if not os.path.isdir(folder):
    return None
  steps = sorted(os.listdir(folder))
  path = os.path.join(folder, steps[-1], "samples.png") if steps else ""
  return path if os.path.exists(path) else None
