"""The sampling command's work: prompts -> routed, batched samples -> PNG files + manifest.jsonl.

  records = sampling.command("workdir/demo", ["a photo of a bag"], "out", num_per_prompt=4)

Each prompt is routed to its cluster (Generator.route: the classes it names, or the labels /
cluster given), and all prompts are sampled together in batches of config.sample.batch_size over
the devices of config.mesh (one CPU, one GPU, or a sharded batch on many). Sample j of prompt p has
the index i = p * num_per_prompt + j and starts from the noise normal(fold_in(key(seed), i)), as in
the in-training sampler, so a class's template prompt gives the images of
`generate.sample_classes` for the same seed. Files: OUT/<i:05d>.png, and OUT/manifest.jsonl with
one JSON line per file: file, prompt, labels, cluster, cluster_id, index, seed, guidance, steps,
sampler, minority_guidance, source.
"""
import io
import json
import os

from absl import logging
import jax
import ml_collections
import PIL.Image

from grasp_jax import files
from grasp_jax.inference import generate
from grasp_jax.inference import generator
from grasp_jax.parallel import sharding


def read_prompts(prompts=(), prompts_file=None):
  """The prompts of --prompt (repeatable) and --prompts_file (one a line; blank lines skipped)."""
  out = list(prompts or ())
  if prompts_file:
    with open(prompts_file) as f:
      out += [line.strip() for line in f if line.strip()]
  if not out:
    raise ValueError("no prompts: give --prompt (repeatable) or --prompts_file")
  return out


def with_options(config, *, guidance=None, steps=None, sampler=None, minority_guidance=None):
  """A copy of the run config with the sampling options that were given."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field, value in (("guidance_scale", guidance), ("steps", steps), ("sampler", sampler),
                       ("minority_guidance", minority_guidance)):
    if value is not None:
      config.sample[field] = value
  if config.sample.sampler not in generate.SAMPLERS:
    raise ValueError(f"sampler {config.sample.sampler!r}; expected one of "
                     f"{sorted(generate.SAMPLERS)}")
  return config


def _png(image):
  buf = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def sample_to_folder(gen, texts, out_dir, *, num_per_prompt=1, seed=None, labels=None,
                     cluster=None, unknown=None, batch_size=None, mesh=None, params=None,
                     extra=None):
  """Routes and samples `num_per_prompt` images of each prompt into `out_dir`; returns the
  manifest records. params/extra: as placed on `mesh` (default the generator's, on host)."""
  if num_per_prompt < 1:
    raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
  c = gen.config
  seed = c.seed if seed is None else int(seed)
  routes = gen.route(texts, labels=labels, cluster=cluster, unknown=unknown)
  flat = [(p, j) for p in range(len(texts)) for j in range(num_per_prompt)]
  logging.info("%d prompt(s) x %d -> clusters %s", len(texts), num_per_prompt,
               [gen.partition.cluster_names[k] for _, k in routes])
  images = generate.to_uint8(generate.sample_prompts(
      gen, gen.params if params is None else params, gen.extra if extra is None else extra,
      [texts[p] for p, _ in flat], [routes[p][1] for p, _ in flat], jax.random.key(seed),
      batch_size=batch_size, mesh=mesh,
      progress=lambda done, n: logging.info("sampled %d/%d images", done, n)))
  records = []
  for i, (p, _) in enumerate(flat):
    found, k = routes[p]
    records.append({
        "file": f"{i:05d}.png", "prompt": texts[p], "labels": found,
        "cluster": gen.partition.cluster_names[k], "cluster_id": k, "index": i, "seed": seed,
        "guidance": float(c.sample.guidance_scale), "steps": int(c.sample.steps),
        "sampler": c.sample.sampler,
        "minority_guidance": float(c.sample.get("minority_guidance", 0.0)),
        "source": gen.source})
  if jax.process_index() == 0:
    for record, image in zip(records, images):
      files.write_bytes(os.path.join(out_dir, record["file"]), _png(image))
    files.write_bytes(os.path.join(out_dir, "manifest.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in records).encode())
  return records


def command(path, texts, out_dir=None, *, base=None, use_ema=True, guidance=None, steps=None,
            sampler=None, minority_guidance=None, **kwargs):
  """`python -m grasp_jax.sample`: a Generator from the workdir or export `path`, the sampling
  options applied, placed on the config's mesh; `sample_to_folder` into `out_dir` (default
  PATH/generated). Returns the manifest records."""
  gen = generator.load(path, base=base, use_ema=use_ema)
  gen.config = with_options(gen.config, guidance=guidance, steps=steps, sampler=sampler,
                            minority_guidance=minority_guidance)
  mesh = sharding.make_mesh(gen.config.mesh)
  params, extra = gen.place(mesh)
  with jax.set_mesh(mesh):
    return sample_to_folder(gen, texts, out_dir or os.path.join(path, "generated"),
                            mesh=mesh, params=params, extra=extra, **kwargs)
