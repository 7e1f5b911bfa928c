"""The image classification networks in Flax: the DenseNet-121 family and a small VGG-style CNN.

The DenseNet is GRASP's downstream network and the encoder phi of the feature-level method
(grasp_jax/feature_ddpm); the CNN is the frozen evaluator (grasp_jax.evaluation.evaluator). Both
map images [B, H, W, C] in [-1, 1] (`to_model_input`) to logits and, on request, the pooled
penultimate features. Module and parameter names are those of the cached and shipped weights
(grasp_jax/evaluation/domain_classifier/): renaming them breaks loading.

  model = networks.densenet(num_classes=10, **networks.TINY)   # CPU-sized member
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# DenseNet-121 (Huang et al. 2017; torchvision's layout): the paper's downstream network.
DENSENET121 = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
# A member that trains in minutes on 2 CPU cores at 28-32 px (stride-2 3x3 stem): 46-d features.
TINY = dict(growth_rate=12, block_config=(2, 2, 2), num_init_features=16, bn_size=2,
            small_input=True, stem_stride=2)

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(features, kernel, strides=1, name=None):
  return nn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.kaiming_normal(), _CONV_AXES), name=name)


def _norm(train, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      name=name)


class DenseLayer(nn.Module):
  """BN-ReLU-Conv1x1 (bottleneck) - BN-ReLU-Conv3x3; the output is concatenated to the input."""
  growth_rate: int
  bn_size: int

  @nn.compact
  def __call__(self, x, train):
    h = _conv(self.bn_size * self.growth_rate, 1, name="conv1")(nn.relu(_norm(train, "norm1")(x)))
    h = _conv(self.growth_rate, 3, name="conv2")(nn.relu(_norm(train, "norm2")(h)))
    return jnp.concatenate([x, h], axis=-1)


class DenseNet(nn.Module):
  """DenseNet with configurable growth rate, block configuration and stem.

  small_input: a 3x3 stem with stride `stem_stride` and no pooling (28-32 px images) instead of
    the ImageNet stem (7x7/2 conv and 3x3/2 max-pool).
  `__call__(x, train)` -> logits [B, num_classes]; with `return_features` also the pooled
  penultimate features [B, F].
  """
  num_classes: int
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  small_input: bool = False
  stem_stride: int = 1

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    if self.small_input:
      x = _conv(self.num_init_features, 3, strides=self.stem_stride, name="conv0")(x)
    else:
      x = _conv(self.num_init_features, 7, strides=2, name="conv0")(x)
      x = nn.relu(_norm(train, "norm0")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for b, num_layers in enumerate(self.block_config):
      for i in range(num_layers):
        x = DenseLayer(self.growth_rate, self.bn_size, name=f"block{b}_layer{i}")(x, train)
      if b < len(self.block_config) - 1:  # Transition: halve channels and resolution.
        x = nn.relu(_norm(train, f"transition{b}_norm")(x))
        x = _conv(int(x.shape[-1] * self.compression), 1, name=f"transition{b}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(_norm(train, "norm_final")(x))
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="head",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               (None, None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(
                          features)
    return (logits, features) if return_features else logits


class CNN(nn.Module):
  """VGG-style: per stage `convs` 3x3 conv-BN-ReLU layers of `width` channels, a 2x2 max-pool
  between stages. The penultimate features: with `hidden` = 0 the global mean of the last stage;
  else a ReLU dense layer of `hidden` units on the flattened last stage, which keeps where in the
  image a feature fires (a sleeve's or a collar's place), what global pooling discards. Same call
  convention as DenseNet."""
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  convs: int = 2
  hidden: int = 0

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    for s, width in enumerate(self.widths):
      if s:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i in range(self.convs):
        x = nn.relu(_norm(train, f"stage{s}_norm{i}")(_conv(width, 3, name=f"stage{s}_conv{i}")(x)))
    if self.hidden:
      features = nn.relu(nn.Dense(self.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
    else:
      features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="head")(features)
    return (logits, features) if return_features else logits


def densenet(num_classes, **kwargs) -> DenseNet:
  """A DenseNet; `densenet(c, **DENSENET121)` is DenseNet-121, `densenet(c, **TINY)` the CPU one."""
  return DenseNet(num_classes=num_classes, **kwargs)


def to_model_input(images) -> np.ndarray:
  """[N, H, W, C] uint8 (0..255) or float in [-1, 1] -> float32 in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  images = images.astype(np.float32)
  if images.size and (images.min() < -1.001 or images.max() > 1.001):
    raise ValueError(f"float images must lie in [-1, 1], got range "
                     f"[{images.min():.3f}, {images.max():.3f}]")
  return images
