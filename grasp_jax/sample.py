"""`python -m grasp_jax.sample`: images from a trained run for prompts; no dataset needed.

  python -m grasp_jax.sample --workdir=workdir/demo --prompt="a photo of a bag" \
      --num_per_prompt=4 --out=out/bags

Writes OUT/<i>.png and OUT/manifest.jsonl (see grasp_jax/inference/sampling.py).
"""
from absl import app
from absl import flags
from absl import logging

from grasp_jax.inference import generate
from grasp_jax.inference import sampling
from grasp_jax.run.setup import QuietLibraries

flags.DEFINE_string("workdir", None, "A run's workdir (its latest checkpoint) or an adapter export "
                    "folder (WORKDIR/export/adapters).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A file of prompts, one a line.")
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("seed", None, "Noise seed (default: the run's config.seed).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the run's).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's).")
flags.DEFINE_enum("sampler", None, sorted(generate.SAMPLERS), "Sampler (default: the run's).")
flags.DEFINE_float("minority_guidance", None, "Self-guided minority guidance weight (0: off).")
flags.DEFINE_list("labels", None, "Class names for every prompt (instead of finding them in it).")
flags.DEFINE_string("cluster", None, "Cluster id or name for every prompt.")
flags.DEFINE_string("unknown", None, "Cluster (id or name, e.g. healthy) of a prompt that names "
                    "no class; default: such a prompt is an error.")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/generated).")
flags.DEFINE_integer("batch_size", None, "Images per device call (default: config.sample).")
flags.DEFINE_string("base", None, "The frozen base's diffusers folder (default: the run's).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA of the trained leaves when kept.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(QuietLibraries())
  f = FLAGS
  texts = sampling.read_prompts(f.prompt, f.prompts_file)
  sampling.command(f.workdir, texts, f.out, base=f.base, use_ema=f.use_ema, guidance=f.guidance,
                   steps=f.steps, sampler=f.sampler, minority_guidance=f.minority_guidance,
                   num_per_prompt=f.num_per_prompt, seed=f.seed, labels=f.labels,
                   cluster=f.cluster, unknown=f.unknown, batch_size=f.batch_size)


if __name__ == "__main__":
  app.run(main)
