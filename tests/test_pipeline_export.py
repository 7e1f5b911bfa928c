"""Pipeline exports run by diffusers in PyTorch: the images of `DiffusionPipeline.from_pretrained`
(and of `load_lora_weights` on the base pipeline) equal ours for the same initial noise, on tiny
random SD and SD3 pipelines (tests/test_conditioning.py builds them). Our side is
generate.sample_prompts on a Generator holding the base plus random trained leaves.
"""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from configs import common
from grasp_jax import partition as partition_lib
from grasp_jax.inference import conditioning
from grasp_jax.inference import generate
from grasp_jax.inference import generator
from grasp_jax.inference import model
from grasp_jax.inference import pipeline_export
from grasp_jax.models import backbone
from grasp_jax.models import trainable as trainable_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import test_conditioning  # noqa: E402  (the tiny pipelines; needs torch + diffusers)

PARTITION = partition_lib.Partition(
    class_names=("No Finding", "Edema", "Hernia"), class_to_cluster=(0, 1, 2),
    cluster_names=("healthy", "head", "tail"), class_counts=(500, 80, 3))
PROMPTS = ["chest x-ray showing hernia", "normal chest x-ray", "chest x-ray showing edema"]
CLUSTERS = [2, 0, 1]
STEPS, GUIDANCE = 3, 2.0


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipelines")
  for kind in ("sd", "sd3"):
    test_conditioning.save_tiny_pipeline(root / kind, kind)
  return {k: str(root / k) for k in ("sd", "sd3")}


def run_config(folder, kind, method):
  c = common.base_config()
  c.data.name, c.data.image_size, c.data.channels = "mimic_cxr_lt", test_conditioning.IMAGE_SIZE, 3
  c.model.pretrained, c.model.backbone = folder, {"sd": "unet", "sd3": "dit"}[kind]
  c.text.encoder, c.text.cache_dtype = "pipeline", "float32"
  c.method = common.method_config(method, num_clusters=PARTITION.num_clusters, rank=3)
  c.method.moe_mode = "top2" if method == "moe" else "soft"
  if kind == "sd3":
    c.diffusion.objective, c.sample.sampler = "flow", "euler"
  c.sample.steps, c.sample.guidance_scale, c.sample.batch_size = STEPS, GUIDANCE, 4
  return c


def trained_generator(folder, kind, method, seed=1):
  """A Generator on the pipeline's base with random trained leaves (method.trainable)."""
  config = run_config(folder, kind, method)
  sub = model.base_folder(config, "")
  module, base, _ = model.load_backbone(config, sub)
  conditioner = conditioning.load_conditioner(config, None)
  null = conditioner.null_condition()
  codec = model.load_codec(config, module)
  shape = model.latent_shape(config, codec)
  cond = jax.tree.map(lambda v: jnp.asarray(v)[None], null)
  ids = jnp.zeros((1,), jnp.int32)
  args = backbone.call_args(config.model.backbone, jnp.zeros((1,) + shape), ids, cond)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, cluster_ids=ids,
                                                **backbone.call_kwargs(config.model.backbone,
                                                                       cond)))
  abstract = flax.linen.unbox(abstract)
  base = flax.traverse_util.flatten_dict(base)
  trained = flax.traverse_util.flatten_dict(
      trainable_lib.trainable_mask(abstract["params"], config.method.trainable))
  rng = np.random.default_rng(seed)
  params = {}
  for path, leaf in flax.traverse_util.flatten_dict(abstract["params"]).items():
    params[path] = base.get(path, np.zeros(leaf.shape, np.float32))
    if trained[path]:  # Adapters far from 0, weights near base.
      scale = 0.02 if path in base else 0.3
      params[path] = (params[path] + scale * rng.standard_normal(leaf.shape)).astype(np.float32)
  extra = {}
  if "selora" in abstract:  # Ranks 0 and 2 active: rank 1's nonzero lora_b must not count.
    extra["selora"] = jax.tree.map(lambda m: np.array([1, 0, 1], np.float32), abstract["selora"])
  return generator.Generator(
      config=config, partition=PARTITION, conditioner=conditioner, module=module,
      schedule=model.make_schedule(config, sub), null_cond=null,
      params=flax.traverse_util.unflatten_dict(params), extra=extra, codec=codec)


def ours(gen, prompts=PROMPTS, clusters=CLUSTERS, seed=0):
  """(images in [0, 1] NHWC, the initial noise NCHW) of our sampler."""
  rng = jax.random.key(seed)
  images = generate.sample_prompts(gen, gen.params, gen.extra, prompts, clusters, rng)
  noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), gen.latent_shape))
                    for i in range(len(prompts))])
  return np.clip(images / 2 + 0.5, 0, 1), torch.from_numpy(noise.transpose(0, 3, 1, 2))


def theirs(pipe, noise, prompts=PROMPTS, **kwargs):
  with torch.no_grad():
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise,
                output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def exported(pipelines, tmp_path_factory):
  """(kind, method) -> (Generator with random trained leaves, export paths, our images, noise),
  made once per module."""
  cache = {}

  def get(kind, method):
    if (kind, method) not in cache:
      gen = trained_generator(pipelines[kind], kind, method)
      out = pipeline_export.export_pipeline(
          gen.params, gen.module, gen.config, gen.partition, gen.schedule,
          str(tmp_path_factory.mktemp(f"{kind}_{method}") / "export"),
          selora=gen.extra.get("selora"))
      cache[kind, method] = (gen, out, *ours(gen))
    return cache[kind, method]

  return get


def load(folder, stock=True, **kwargs):
  """A pipeline folder in diffusers; stock SD3 pipelines are told they have no T5."""
  diffusers.utils.logging.set_verbosity_error()
  if stock and "text_encoder_3" in diffusers.DiffusionPipeline.load_config(folder):
    kwargs.update(text_encoder_3=None, tokenizer_3=None)
  return diffusers.DiffusionPipeline.from_pretrained(folder, **kwargs)


def close(a, b, tol=2e-4):
  assert a.shape == b.shape, (a.shape, b.shape)
  return np.abs(a - b).max() < tol


@pytest.mark.parametrize("kind,method", [("sd", "grasp"), ("sd3", "grasp"), ("sd", "moe")])
def test_adapter_pipeline_routes_and_matches(pipelines, exported, kind, method):
  gen, out, ref, noise = exported(kind, method)
  pipe = load(out["pipeline"], stock=False, trust_remote_code=True)
  assert type(pipe).__name__.startswith("Grasp")
  assert close(theirs(pipe, noise), ref)
  base = load(pipelines[kind])
  base.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
  assert not close(theirs(base, noise), ref, 1e-2)  # The adapters matter at this tolerance.
  # One backbone: the base weights file itself, plus the adapters.
  sub = os.path.join(out["pipeline"], backbone.SUBFOLDERS[gen.config.model.backbone])
  assert os.path.samefile(os.path.join(sub, "diffusion_pytorch_model.safetensors"),
                          os.path.join(pipelines[kind], os.path.basename(sub),
                                       "diffusion_pytorch_model.safetensors"))
  if method == "grasp":  # Explicit clusters, a name and ids, give the same images.
    assert close(theirs(pipe, noise, cluster_id=["tail", 0, 1]), ref)
    # Another cluster for the first prompt changes its image only.
    other = theirs(pipe, noise, cluster_id=[1, 0, 1])
    assert not close(other[:1], ref[:1], 1e-2) and close(other[1:], ref[1:])


@pytest.mark.parametrize("kind,method", [("sd", "lora"), ("sd", "selora"), ("sd", "full"),
                                         ("sd3", "lora")])
def test_merged_pipeline_and_lora_file_match(pipelines, exported, kind, method):
  _, out, ref, noise = exported(kind, method)
  pipe = load(out["pipeline"])  # Stock classes, no remote code.
  assert type(pipe).__name__ == {"sd": "StableDiffusionPipeline",
                                 "sd3": "StableDiffusion3Pipeline"}[kind]
  assert close(theirs(pipe, noise), ref)
  if method == "full":
    assert out["lora"] is None
    return
  base = load(pipelines[kind])
  base.scheduler = pipe.scheduler
  assert not close(theirs(base, noise), ref, 1e-2)  # The deltas matter at this tolerance.
  base.load_lora_weights(out["lora"], weight_name="pytorch_lora_weights.safetensors")
  assert close(theirs(base, noise), ref)


# The README's "Use the result in diffusers" snippet, run as it stands there (from the folder
# that holds the run's workdir/).
README_SNIPPET = '''
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("workdir/export/pipeline", trust_remote_code=True)
image = pipe("chest x-ray showing hernia").images[0]  # the cluster of Hernia (partition.json)
image.save("hernia.png")
image = pipe("an x-ray of the chest", cluster_id="tail").images[0]  # or name the cluster
'''


def test_readme_snippet(exported, tmp_path, monkeypatch):
  _, out, _, _ = exported("sd", "grasp")
  os.makedirs(tmp_path / "workdir" / "export")
  os.symlink(out["pipeline"], tmp_path / "workdir" / "export" / "pipeline")
  monkeypatch.chdir(tmp_path)
  exec(README_SNIPPET, {})
  image = np.asarray(PIL.Image.open(tmp_path / "hernia.png"))
  assert image.shape == (32, 32, 3) and image.std() > 0
