"""The shipped base: which configs it serves, and that it is restored, not retrained."""
import json
import os

import flax
import jax
import numpy as np
import pytest

from configs import demo
from configs import study as study_config
from grasp_jax.inference import model as inference_model
from grasp_jax.models import dit
from grasp_jax.run import pretrain
from grasp_jax.task import experiment


def test_the_demo_and_the_study_share_the_shipped_base():
  runs = study_config.get_config().runs["dit"]
  folder = pretrain.shipped_folder(demo.get_config(""))
  assert folder, "configs/demo.py's base fields changed: rebuild the shipped base (README)"
  with open(os.path.join(folder, "spec.json")) as f:
    record = json.load(f)
  want = pretrain.spec(pretrain.pretraining_config(demo.get_config("")))
  assert record["spec"] == want and record["key"] == os.path.basename(folder)
  assert all(pretrain.shipped_folder(runs[r]) == folder for r in ("base", "full", "grasp"))
  for variant in ("method=full", "target=target_p1", "method=lora,coral"):
    assert pretrain.shipped_folder(demo.get_config(variant)) == folder, variant
  for variant in ("smoke", "backbone=unet", "seed=1"):
    assert pretrain.shipped_folder(demo.get_config(variant)) is None, variant


@pytest.mark.parametrize("field,value,same", [
    ("data.data_dir", "/elsewhere", True), ("eval.real_per_class", 7, True),
    ("sample.per_class", 3, True), ("train.steps", 9, True), ("method.rank", 2, True),
    ("model.base_steps", 1499, False), ("seed", 1, False), ("model.base_learning_rate", 3e-4, False),
    ("data.batch_size", 16, False), ("diffusion.flow_shift", 1.0, False)])
def test_key_follows_what_trains_the_base(field, value, same):
  c = demo.get_config("")
  key = pretrain.key(pretrain.spec(pretrain.pretraining_config(c)))
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  assert (pretrain.key(pretrain.spec(pretrain.pretraining_config(c))) == key) == same


def test_shipped_base_is_restored_and_loads(tmp_path, monkeypatch):
  def no_training(*args, **kwargs):
    raise AssertionError("a shipped base was trained again")
  monkeypatch.setattr(experiment, "build", no_training)
  c = demo.get_config("")
  folder = pretrain.pretrain_base(c, str(tmp_path))
  shipped = pretrain.shipped_folder(c)
  for name in pretrain.WEIGHTS:
    with open(os.path.join(folder, name), "rb") as a, open(os.path.join(shipped, name), "rb") as b:
      assert a.read() == b.read()
  # The weights fit the demo's architecture, leaf by leaf.
  module, params, _ = inference_model.load_backbone(c, folder)
  want = flax.linen.unbox(
      jax.eval_shape(module.init, jax.random.key(0), *dit.example_inputs(module))["params"])
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, want)
  c.model.base_shipped = False  # Now it must train its own.
  with pytest.raises(AssertionError, match="trained again"):
    pretrain.pretrain_base(c, str(tmp_path / "own"))

