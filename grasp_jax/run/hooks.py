"""In-training hooks of a fine-tuning run: gradient diagnostics, per-cluster grids, evaluation."""
import os

import jax

from grasp_jax import files
from grasp_jax.evaluation import gradient_conflict
from grasp_jax.inference import generate
from grasp_jax.models import trainable as trainable_lib
from grasp_jax.run import evaluate as evaluate_lib
from grasp_jax.task import experiment


def sampling_params(trainer, use_ema=True):
  """(full params, extra) of a Trainer: the EMA of the trainables when kept (else the
  trainables), merged with the frozen base."""
  state = trainer.state
  trainable = state.ema if use_ema and jax.tree.leaves(state.ema) else state.params
  return trainable_lib.merge(trainable, trainer.frozen), state.extra


def diagnose(exp, trainer, writer, step, batches):
  """Gradient-conflict diagnostics of the trainer's current parameters on held-out `batches`
  -> TensorBoard and WORKDIR/diagnostics/step_<n>.json; returns the result."""
  groups = experiment.eval_groups(exp)
  result = gradient_conflict.run_diagnostics(
      exp, trainable_lib.merge(trainer.state.params, trainer.frozen), trainer.state.extra,
      batches, jax.random.key(exp.config.seed + 1), writer, step,
      (groups["frequency/head"], groups["frequency/tail"]))
  if jax.process_index() == 0:
    files.write_json(os.path.join(exp.workdir, "diagnostics", f"step_{step}.json"), result,
                     indent=2)
  return result


class InTraining:
  """`periodic(trainer, step, writer)` for `loop.fit`, as `config.train` schedules them."""

  def __init__(self, exp):
    self.exp = exp
    self._heldout = None  # Diagnostics batches, made on first use.

  def __call__(self, trainer, step, writer):
    exp, c = self.exp, self.exp.config
    every = c.train.diagnostics_every
    if every and step % every == 0:
      if self._heldout is None:
        self._heldout = exp.heldout_batches(trainer.mesh)
      diagnose(exp, trainer, writer, step, self._heldout)
    if c.train.sample_every and step % c.train.sample_every == 0:
      params, extra = sampling_params(trainer)
      grids = generate.cluster_grids(exp, params, extra, jax.random.key(c.seed), 8,
                                     mesh=trainer.mesh)
      if jax.process_index() == 0:
        writer.write_images(step, {k: g[None] for k, g in grids.items()})
    # The last step is evaluated after training, at the final evaluation's N.
    if c.eval.every and step % c.eval.every == 0 and step < c.train.steps:
      params, extra = sampling_params(trainer)
      evaluate_lib.evaluate(exp, params, extra, exp.workdir, writer, step,
                            rng=jax.random.key(c.seed), mesh=trainer.mesh,
                            per_class=c.eval.every_per_class,
                            real_per_class=c.eval.every_real_per_class)
