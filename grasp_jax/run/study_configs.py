"""The configs of the study's runs and sweeps, and the hash a finished run or sweep counts under
(shared by the driver, grasp_jax/run/study.py, and its report, grasp_jax/run/report.py)."""
import hashlib
import json
import os


def family(config):
  """The learning-rate family of a run: its method."""
  return config.method.name


def sweep_config(study, backbone, fam, base, lr):
  """The config of one sweep run: the family's plain run on the headline target, `lr`,
  `sweep_steps` steps, its loss measured on the validation split."""
  config = representative(study, backbone, fam).copy_and_resolve_references()
  with config.unlocked():
    config.model.pretrained = base
    config.data.config = study.targets[0]
    config.partition.healthy = study.healthy[study.targets[0]]
    config.data.eval_split = "val"
    config.optim.learning_rate = float(lr)
    config.train.steps = int(study.sweep_steps)
    config.train.checkpoint_every = config.train.steps
    config.eval.every = config.train.sample_every = config.train.diagnostics_every = 0
  return config


def sweep_sha(study, backbone, fam):
  """The config hash a family's sweep is valid under (its sweep config, the rate aside)."""
  return config_sha(sweep_config(study, backbone, fam, "", 0.0))


def representative(study, backbone, fam):
  """The plain run of a method family (the sweep trains it)."""
  runs = study.runs[backbone]
  return runs[fam] if fam in runs else next(c for c in runs.values() if family(c) == fam)


def config_sha(config):
  """sha256 of a run's config (a ConfigDict or its JSON as a dict) without the two fields that
  name places in the study's workdir (the base's folder, the evaluation cache), so that a moved
  workdir keeps its runs."""
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  tree = {**tree, "model": {**tree["model"], "pretrained": ""},
          "eval": {**tree["eval"], "cache_dir": ""}}
  return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def run_config(study, workdir, backbone, target, run, seed, base, lr):
  """The config of one run of the study: its entry in the study config, placed."""
  config = study.runs[backbone][run].copy_and_resolve_references()
  with config.unlocked():
    config.seed = seed
    config.data.config = target
    config.partition.healthy = study.healthy[target]
    config.model.pretrained = base
    config.optim.learning_rate = lr
    config.eval.cache_dir = os.path.join(workdir, "cache")
  return config
