"""`python -m grasp_jax.sample` and --mode=sample on a tiny trained run that has no dataset: a
workdir written as training writes it (orbax checkpoint with EMA, base folder, partition.json,
config.json; config.data.data_dir does not exist), sampled by the command, against the
in-training sampler (generate.sample_classes on the in-memory state). Prompt routing against the
partition's own rule.
"""
import itertools
import json
import os
import subprocess
import sys
import types

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from configs import common
from grasp_jax import partition as partition_lib
from grasp_jax.data import classes as cxr_classes
from grasp_jax.inference import conditioning
from grasp_jax.inference import export
from grasp_jax.inference import generate
from grasp_jax.inference import generator
from grasp_jax.inference import model
from grasp_jax.inference import routing
from grasp_jax.models import convert
from grasp_jax.models import trainable as trainable_lib
from grasp_jax.models import unet
from grasp_jax.run import hooks
from grasp_jax.run import setup
from grasp_jax.run import stages
from grasp_jax.trainer import checkpoint
from grasp_jax.trainer import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("T-shirt/top", "Trouser", "Bag", "Ankle boot")
PARTITION = partition_lib.Partition(CLASSES, (0, 1, 2, 2), ("healthy", "head", "tail"),
                                    (600, 94, 11, 10))


def tiny_config(workdir):
  c = common.base_config()
  c.data.image_size, c.data.channels = 8, 1
  c.data.data_dir = os.path.join(workdir, "no_tfds_here")
  c.model.base = dict(block_out_channels=[8, 16], norm_num_groups=4, attention_head_dim=2,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
  c.method = common.method_config("grasp", num_clusters=3, rank=2)
  c.train.ema_decay = 0.9
  c.diffusion.clip_sample = True
  c.sample.steps, c.sample.guidance_scale, c.sample.batch_size = 2, 2.0, 4
  c.sample.per_class = 2
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir as a GRASP run leaves it, and the in-training sampler's images of every class."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(workdir)
  module, _, _ = model.load_backbone(config, "", from_scratch=True)
  x = jnp.zeros((1, 8, 8, 1))
  ids = jnp.zeros((1,), jnp.int32)
  variables = flax.linen.unbox(jax.jit(module.init)(jax.random.key(0), x, ids,
                                                    jnp.zeros((1, 1, 384)), cluster_ids=ids))
  trainable, frozen = trainable_lib.split(variables["params"], config.method.trainable)
  rng = np.random.default_rng(0)
  noisy = lambda t: jax.tree.map(lambda v: 0.1 * rng.standard_normal(v.shape, np.float32), t)
  trainable, ema = noisy(trainable), noisy(trainable)  # The EMA differs: it must be the one used.
  convert.save_diffusers(os.path.join(workdir, "base"), frozen,
                         unet.tiny_config(**config.model.base.to_dict()))
  base_hash = model.load_backbone(config, os.path.join(workdir, "base"))[2]
  state = loop.TrainState(step=jnp.int32(5), params=trainable, opt_state=(), ema=ema, extra={},
                          method_state={})
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
  data_iter = iter(grain.MapDataset.source([0]).to_iter_dataset())
  checkpoint.save(mngr, 5, state, data_iter, config.to_json_best_effort(), PARTITION.to_json(),
                  base_hash, force=True)
  mngr.wait_until_finished()
  PARTITION.save(os.path.join(workdir, "partition.json"))
  setup.write_config(config, workdir)
  # The in-training sampler: the trainer's sampling_params on an experiment built in memory.
  params, extra = hooks.sampling_params(
      type("Trainer", (), {"state": state, "frozen": frozen})())
  conditioner = conditioning.minilm_conditioner()
  exp = types.SimpleNamespace(config=config, partition=PARTITION, conditioner=conditioner,
                              module=module, schedule=model.make_schedule(config, ""),
                              null_cond=conditioner.null_condition())
  images, labels = generate.sample_classes(exp, params, extra, None, 2, jax.random.key(0))
  return workdir, images, labels


def read_pngs(folder, names):
  return np.stack([np.asarray(PIL.Image.open(os.path.join(folder, n))) for n in names])[..., None]


def test_command_needs_no_dataset_and_matches_the_in_training_sampler(run, tmp_path):
  workdir, images, labels = run
  out = str(tmp_path / "out")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "grasp_jax.sample", f"--workdir={workdir}",
       "--prompt=a photo of a t-shirt/top", "--prompt=a bag next to a t-shirt/top",
       "--num_per_prompt=2",
       f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "sampled 4/4 images" in proc.stderr
  with open(os.path.join(out, "manifest.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [(r["file"], r["labels"], r["cluster"], r["index"]) for r in records] == [
      ("00000.png", ["T-shirt/top"], "healthy", 0), ("00001.png", ["T-shirt/top"], "healthy", 1),
      ("00002.png", ["T-shirt/top", "Bag"], "tail", 2),
      ("00003.png", ["T-shirt/top", "Bag"], "tail", 3)]
  assert {(r["seed"], r["guidance"], r["steps"], r["sampler"]) for r in records} == {
      (0, 2.0, 2, "ddim")}
  got = read_pngs(out, [r["file"] for r in records])
  # Indices 0, 1 with the template prompt of class 0: the first images of sample_classes.
  first = images[labels == 0].astype(int)
  assert np.abs(got[:2].astype(int) - first).max() <= 1
  assert np.abs(got[2:].astype(int) - first).max() > 8  # Another prompt and cluster.
  assert not os.path.exists(os.path.join(workdir, "no_tfds_here"))


def test_mode_sample_goes_through_the_generator(run):
  workdir, images, labels = run
  config = tiny_config(workdir)
  out = stages.train_and_evaluate(config, workdir, "sample")  # No dataset, no train step.
  assert out.labels.tolist() == labels.tolist()
  assert np.abs(out.images.astype(int) - images.astype(int)).max() <= 1
  assert sorted(os.listdir(os.path.join(workdir, "samples", "Ankle_boot"))) == ["0.png", "1.png"]


def test_explicit_labels_cluster_and_unknown_prompts(run):
  workdir, _, _ = run
  gen = generator.load(workdir)
  texts = ["a cat", "a photo of a trouser"]
  assert gen.route(texts, labels=["Ankle boot"]) == [(["Ankle boot"], 2)] * 2
  assert gen.route(texts, cluster="head") == [([], 1)] * 2
  assert gen.route(texts, unknown="healthy") == [([], 0), (["Trouser"], 1)]
  with pytest.raises(routing.UnknownPromptError, match="'a cat'"):
    gen.route(texts)


def test_adapter_export_loads_the_same_model(run):
  workdir, _, _ = run
  gen = generator.load(workdir)
  trained, _ = trainable_lib.split(gen.params, gen.config.method.trainable)
  folder = os.path.join(workdir, "export", "adapters")
  export.export_adapters(trained, gen.config, PARTITION, folder)
  again = generator.load(folder)  # Finds the demo base at WORKDIR/base.
  assert again.partition == PARTITION and "adapter export" in again.source
  jax.tree.map(np.testing.assert_array_equal, again.params, gen.params)
  with pytest.raises(FileNotFoundError, match="neither a run's workdir nor an adapter export"):
    generator.load(os.path.join(workdir, "samples"))


# ---------------------------------------------------------------------------------------------
# Routing.

def _data(name, config=""):
  return types.SimpleNamespace(name=name, config=config)


def mimic_router(part):
  return routing.Router(generator.routing_table(part, _data("mimic_cxr_lt")))


def test_phrases_and_nested_names():
  part = partition_lib.build_partition(cxr_classes.MIMIC_CXR_LT_CLASSES,
                                       list(range(1000, 0, -50))[:19], strategy="class")
  router = mimic_router(part)
  assert router.labels("normal chest x-ray") == ["No Finding"]
  assert router.labels("Chest X-ray showing SUBCUTANEOUS emphysema") == ["Subcutaneous Emphysema"]
  assert router.labels("pleural effusions and a fracture") == ["Pleural Effusion", "Fracture"]
  assert router.labels("chest x-ray showing edematous lungs") == []
  fashion = routing.Router(generator.routing_table(PARTITION, _data("fashion_mnist_lt")))
  assert fashion.labels("a photo of a t-shirt/top") == ["T-shirt/top"]  # Not 'shirt' inside it.
  assert fashion.labels("two bags") == ["Bag"]


def test_router_agrees_with_the_partition_on_label_sets():
  names = cxr_classes.NIH_CXR_LT_CLASSES
  rng = np.random.default_rng(0)
  part = partition_lib.build_partition(names, rng.integers(1, 500, len(names)),
                                       strategy="healthy+frequency", k=4,
                                       healthy="No Finding")
  router = routing.Router(generator.routing_table(part, _data("nih_cxr_lt")))
  for pair in itertools.combinations(names, 2):
    prompt = f"chest x-ray showing {pair[0].lower()} and {pair[1].replace('_', ' ')}"
    found, k = router.route(prompt)
    assert sorted(found) == sorted(pair), prompt
    assert k == part.assign_names([pair])[0], prompt
