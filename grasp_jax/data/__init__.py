"""Data: TFDS builders (grasp_jax.data.builders) and the grain input pipeline (pipeline)."""
