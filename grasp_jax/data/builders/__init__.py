"""TFDS builders; importing this package registers them with TFDS.

  fashion_mnist_lt   Fashion-MNIST with the NIH ChestX-ray14 long-tail profile (embedded default)
  mimic_cxr_lt       MIMIC-CXR-LT (CXR-LT 2022, 19 classes) and CXR-LT 2023 (26, multi-label)
  nih_cxr_lt         NIH-CXR-LT (20 classes)
  imagenet_lt_t2i    ImageNet-LT with class-name prompts (TFDS ships its own `imagenet_lt`)

`tfds.builder("fashion_mnist_lt", data_dir=...)` then works from any script.
"""
import importlib.resources
import sys

# TFDS looks up `importlib_resources.abc.Traversable` for builders that live in a package; the
# backport is not a declared dependency and the stdlib module has the same API (etils uses it
# under this name too).
sys.modules.setdefault("importlib_resources", importlib.resources)

# pylint: disable=g-import-not-at-top,unused-import
from grasp_jax.data.builders.fashion_mnist_lt import FashionMnistLt
from grasp_jax.data.builders.imagenet_lt import ImagenetLtT2i
from grasp_jax.data.builders.mimic_cxr_lt import MimicCxrLt
from grasp_jax.data.builders.nih_cxr_lt import NihCxrLt
