"""The template prompt of a class in a builder config's domain: what that config's examples
carry, so what sampling, CBDM's class conditions and prompt routing use. A fine-tuned model is
sampled with the target's prompts ("an x-ray scan of a coat"), never the source's."""
from grasp_jax.data import prompts
from grasp_jax.data.builders import fashion_mnist_lt


def class_prompt(dataset: str, config: str, class_name: str) -> str:
  """dataset, config: the TFDS name and builder config (config.data.name / .config; '' is the
  builder's default)."""
  if dataset == "fashion_mnist_lt":
    configs = fashion_mnist_lt.FashionMnistLt.BUILDER_CONFIGS
    cfg = next((c for c in configs if c.name == config), None) if config else configs[0]
    if cfg is None:
      raise ValueError(f"fashion_mnist_lt has no config {config!r}; known: "
                       f"{[c.name for c in configs]}")
    return prompts.TEMPLATES[cfg.appearance](class_name)
  if "cxr" in dataset:
    return prompts.findings_prompt([class_name])
  return prompts.photo_prompt(class_name)
