"""How a fine-tuning method extends the one train step, without branches in the trainer.

A method may keep its own state in `TrainState.method_state` and act at three points of
`loop.train_step`: the variables the forward pass sees, the gradients (and its state) after the
backward pass, and the parameters after the optimizer update. Most methods need none of it
(`Method`); SeLoRA uses all three. Each acts once per step: with config.train.grad_accum_steps
> 1 the forward variables serve every micro-batch and `grads` gets the mean gradient of the
whole batch (SeLoRA's Fisher sums add the square of that mean, as without accumulation).
"""
import jax
import jax.numpy as jnp

from grasp_jax.models import adapters


class Method:
  """No extension: the step trains the trainables with the optimizer, nothing else."""

  def init(self, trainable):
    """The method's state for `trainable` (a pytree; {} for none)."""
    del trainable
    return {}

  def forward_extra(self, extra):
    """The non-trainable variables the loss's forward pass sees."""
    return extra

  def grads(self, grads, extra, method_state):
    """(gradients, method_state) after the backward pass."""
    del extra
    return grads, method_state

  def after_update(self, step, params, extra, method_state):
    """(params, extra, method_state) after the optimizer update of `step`."""
    del step
    return params, extra, method_state


class SeLoRA(Method):
  """SeLoRA: probe each layer's next rank in the same backward pass (its B row is zero, so the
  loss is unchanged) to accumulate the Fisher information that rank would add, and every `every`
  steps grow the ranks whose Fisher ratio exceeds `threshold`."""

  def __init__(self, threshold, every):
    self.threshold, self.every = threshold, every

  def init(self, trainable):
    return adapters.selora_fisher_init(trainable)

  def forward_extra(self, extra):
    return {**extra, "selora": adapters.selora_probe(extra["selora"])}

  def grads(self, grads, extra, method_state):
    fisher = adapters.selora_fisher_update(method_state, grads)
    return adapters.selora_mask_grads(grads, extra["selora"]), fisher  # The probe must not train.

  def after_update(self, step, params, extra, method_state):
    grown_params, grown_vars, _ = adapters.selora_grow(params, extra["selora"], method_state,
                                                      self.threshold)
    due = (step + 1) % self.every == 0
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(due, x, y), a, b)
    reset = jax.tree.map(jnp.zeros_like, method_state)
    return (pick(grown_params, params), {**extra, "selora": pick(grown_vars, extra["selora"])},
            pick(reset, method_state))


def for_config(method_config):
  """The hook of `config.method`."""
  if method_config.adapter == "selora":
    return SeLoRA(method_config.selora_threshold, method_config.selora_every)
  return Method()
