"""`python -m grasp_jax.study --workdir=DIR`: the study's command (grasp_jax/run/study.py)."""
from absl import app

from grasp_jax.run import study

if __name__ == "__main__":
  app.run(study.main)
