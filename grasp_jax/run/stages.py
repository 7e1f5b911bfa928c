"""The stages of one run, as `python -m grasp_jax.main --mode=...` runs them.

  train     (pretrain the demo's base,) fine-tune with the in-training hooks, export, sample,
            evaluate
  sample / evaluate / export / diagnose   one stage on the latest checkpoint of WORKDIR (sample
            needs no dataset: inference/generator.py)
"""
import os
import time

from absl import logging
from clu import metric_writers
import jax
import numpy as np

from grasp_jax.inference import export
from grasp_jax.inference import generate
from grasp_jax.inference import model as inference_model
from grasp_jax.inference import pipeline_export
from grasp_jax.inference import generator
from grasp_jax.models import trainable as trainable_lib
from grasp_jax.parallel import sharding
from grasp_jax.run import evaluate as evaluate_lib
from grasp_jax.run import hooks
from grasp_jax.run import gradient_partition
from grasp_jax.run import pretrain
from grasp_jax.run import summary
from grasp_jax.task import experiment
from grasp_jax.trainer import loop

MODES = ("train", "sample", "evaluate", "diagnose", "export")


def _to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def export_run(exp, trainer, workdir, *, use_ema=None, clusters=None):
  """Writes WORKDIR/export/adapters/ and WORKDIR/export/diffusers/ (end of training, --mode=export).

  exp: task.experiment.Experiment (uses .config, .module, .partition).
  trainer: trainer.loop.Trainer (uses .state.params, .state.ema, .state.extra, .frozen).
  use_ema: export the EMA of the trainables (default: when config.train.ema_decay > 0).
  Every process must call it (multi-host gathering); process 0 writes. A model without an exact
  merged form (MoE; GRASP with an unabsorbable activation) gets only the adapter export, with a
  warning. Returns {'adapters': dir, 'diffusers': [folders]} (None on other processes).
  """
  config = exp.config
  ema = config.train.ema_decay > 0 if use_ema is None else use_ema
  if ema and not trainer.state.ema:
    raise ValueError("run_export(use_ema=True): the train state holds no EMA "
                     "(config.train.ema_decay is 0)")
  trainable = trainer.state.ema if ema else trainer.state.params
  params = _to_host(trainable_lib.merge(trainable, trainer.frozen))
  # The frozen base may be stored in bfloat16 (model.frozen_dtype): export one dtype, float32.
  params = jax.tree.map(lambda x: x.astype(np.float32) if np.issubdtype(x.dtype, np.floating)
                        else x, params)
  selora = _to_host(trainer.state.extra.get("selora")) if trainer.state.extra else None
  if jax.process_index() != 0:
    return None
  out = os.path.join(workdir, "export")
  adapters_dir = os.path.join(out, "adapters")
  export.export_adapters(params, config, exp.partition, adapters_dir, selora=selora)
  try:
    folders = export.export_diffusers(params, exp.module, config, exp.partition,
                               inference_model.base_folder(config, workdir),
                               os.path.join(out, "diffusers"), clusters, selora=selora)
  except export.NotMergeableError as e:
    logging.warning("no merged diffusers export: %s", e)
    folders = []
  pipeline = None
  if pipeline_export.base_pipeline(config):  # Runs on a diffusers pipeline; not the demo.
    pipeline = pipeline_export.export_pipeline(params, exp.module, config, exp.partition,
                                               exp.schedule, out, selora=selora)
  logging.info("exported adapters to %s and %d diffusers folder(s)", adapters_dir, len(folders))
  return {"adapters": adapters_dir, "diffusers": folders, "pipeline": pipeline}


def diagnose(exp, trainer, workdir):
  """Gradient-conflict diagnostics of the trained model -> WORKDIR/diagnostics/step_<n>.json."""
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  with jax.set_mesh(trainer.mesh):
    result = hooks.diagnose(exp, trainer, writer, int(trainer.state.step),
                            exp.heldout_batches(trainer.mesh))
  writer.flush()
  return result


def train_and_evaluate(config, workdir, mode="train"):
  """main's entry. train: (pretrain the base,) fine-tune, export, sample, evaluate; the other
  modes run one stage on the latest checkpoint of WORKDIR. Returns the Trainer (sample: the
  generate.SampleOutput)."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r}; expected one of {MODES}")
  if mode == "sample":
    return sample(config, workdir)
  start = time.perf_counter()
  if mode in ("train", "evaluate"):
    evaluate_lib.check_assets(config)
  if mode == "train":
    if not config.model.pretrained:
      pretrain.pretrain_base(config, workdir)
    gradient_partition.ensure(config, workdir)  # Measured partitions only; once per workdir.
    exp = experiment.build(config, workdir)
    trainer = loop.fit(exp, config, workdir, periodic=hooks.InTraining(exp))
  else:
    exp = experiment.build(config, workdir)
    trainer = loop.restore_latest(exp, config, workdir)
  if mode in ("train", "export"):
    export_run(exp, trainer, workdir)
  if mode == "diagnose":
    diagnose(exp, trainer, workdir)
  if mode in ("train", "evaluate"):
    params, extra = hooks.sampling_params(trainer)
    with jax.set_mesh(trainer.mesh):
      out = generate.run_sample(exp, params, extra, workdir, mesh=trainer.mesh)
      writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
      step = int(trainer.state.step)
      evaluate_lib.evaluate(exp, params, extra, workdir, writer, step,
                            rng=jax.random.key(config.seed), mesh=trainer.mesh,
                            samples=(out.images, out.labels))
      writer.flush()
      if mode == "train":
        grid = summary.before_after_grid(exp, (params, extra), workdir, mesh=trainer.mesh)
        for line in summary.summarize(workdir, step, time.perf_counter() - start, grid):
          logging.info("%s", line)
          if jax.process_index() == 0:
            print(line, flush=True)
  return trainer


def sample(config, workdir):
  """--mode=sample: config.sample.per_class images of each class from the latest checkpoint
  into WORKDIR/samples (generate.run_sample), through a Generator: neither the dataset nor the
  train step is built."""
  gen = generator.load(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  params, extra = gen.place(mesh)
  with jax.set_mesh(mesh):
    return generate.run_sample(gen, params, extra, workdir, mesh=mesh)
