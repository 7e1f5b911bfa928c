"""CLU metrics of the train step: overall and per-cluster loss (segment sums, no Python loops)."""
import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics


@flax.struct.dataclass
class ClusterAverage(metrics.Metric):
  """Mean loss per cluster, accumulated as [K] sums and counts."""
  total: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_model_output(cls, cluster_loss_sum, cluster_count, **_):
    return cls(total=cluster_loss_sum, count=cluster_count)

  def merge(self, other):
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self):
    return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  cluster_loss: ClusterAverage


def scalars(computed, cluster_names):
  """Flattens the per-cluster vector into named scalars for the CLU writer."""
  out = {k: v for k, v in computed.items() if k != "cluster_loss"}
  for name, value in zip(cluster_names, computed["cluster_loss"]):
    if np.isfinite(value):
      out[f"cluster_loss/{name}"] = value
  return out
