"""Config checks: every field has a validator, bad values fail before jax, strict booleans."""
import math
import re
import subprocess
import sys

import pytest

from configs import common
from configs import demo
from configs import imagenet_lt
from configs import mimic
from configs import nih
from configs import sharding as sharding_configs
from configs import study
from grasp_jax.run import setup


def shipped_configs():
  out = [common.base_config(), demo.get_config(), mimic.get_config(), nih.get_config(),
         mimic.get_config("backbone=dit,method=moe"), imagenet_lt.get_config(),
         sharding_configs.get_config(), sharding_configs.get_config("model=sd2_unet")]
  for backbone, runs in study.get_config("smoke").runs.items():
    out += [runs[r] for r in runs]
  return out


def test_every_field_has_a_check():
  """Fails for a field added to configs/ without its entry in setup.FIELDS."""
  names = {name for c in shipped_configs() for name, _ in setup.fields(c)}
  assert len(names) > 80
  assert sorted(names - set(setup.FIELDS)) == []
  for c in shipped_configs():
    setup.validate_config(c)


def test_a_new_field_without_a_check_is_refused():
  c = demo.get_config()
  c.train.new_thing = 1
  with pytest.raises(ValueError, match=r"config.train.new_thing=1 is not a known field"):
    setup.validate_config(c)


def test_every_check_rejects_a_wrong_type_and_accepts_the_default():
  defaults = dict(setup.fields(common.base_config()))
  for name, (expected, ok) in setup.FIELDS.items():
    assert not ok(object()), name
    assert not ok(math.nan), name
    if name in defaults:
      assert ok(defaults[name]), (name, defaults[name], expected)


# The values of issue 18 that passed validation, plus one of each other kind of check.
BAD = [("train.log_every", 0), ("sample.sampler", "foo"), ("optim.name", "adamz"),
       ("optim.schedule", "cosin"), ("partition.strategy", "freq"), ("data.image_size", -32),
       ("data.channels", 7), ("optim.learning_rate", math.nan), ("train.ema_decay", 1.5),
       ("method.rank", 0), ("train.keep_checkpoints", 0), ("train.checkpoint_every", 0),
       ("model.dtype", "float64"), ("diffusion.cfg_dropout", 1.5), ("mesh.data", 0),
       ("partition.thresholds", "20,100"), ("method.trainable", ("(unclosed",)),
       ("mesh.rules", (("batch", "model"),)), ("model.base", {"num layers": 2}),
       ("data.channels", True), ("sample.guidance_scale", -1.0), ("train.resume_from", -1),
       ("model.base_data", {"config": "a b"}), ("model.base_data", {"size": 3})]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_field_and_value(field, value):
  c = demo.get_config()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=rf"^config\.{re.escape(field)}=.+ is invalid; "
                                       "expected ") as e:
    setup.validate_config(c)
  if not isinstance(value, (dict, tuple)):
    assert f"={value!r} is invalid" in str(e.value)


@pytest.mark.parametrize("changes,field", [
    (dict(sample__sampler="euler"), "sample.sampler"),  # A flow sampler on the eps UNet.
    (dict(diffusion__objective="flow"), "diffusion.objective"),
    (dict(method__moe_mode="top9"), "method.moe_mode"),  # More experts than clusters.
    (dict(method__adapter="lora"), "method.adapter"),
    (dict(mesh__fsdp=-1), "mesh.fsdp"),  # Both axes -1.
    (dict(partition__strategy="groups"), "partition.groups"),
    (dict(eval__evaluator_blocks=(3,)), "eval.evaluator_blocks"),  # 3 does not divide 32.
])
def test_fields_that_must_agree(changes, field):
  c = demo.get_config("backbone=unet")
  for k, v in changes.items():
    section, key = k.split("__")
    c[section][key] = v
  with pytest.raises(ValueError, match=rf"^config\.{field}=.* is invalid"):
    setup.validate_config(c)


def test_parse_arg_booleans_are_strict():
  for word, value in [("true", True), ("YES", True), ("1", True), ("False", False),
                      ("no", False), ("0", False)]:
    assert common.parse_arg(f"cbdm={word}", cbdm=not value).cbdm is value
  assert common.parse_arg("cbdm", cbdm=False).cbdm is True
  for word in ("maybe", "on", "ture", ""):
    with pytest.raises(ValueError, match=rf"cbdm='{word}': expected one of"):
      common.parse_arg(f"cbdm={word}", cbdm=False)
  with pytest.raises(ValueError, match=r"cbdm='maybe'"):
    demo.get_config("smoke,cbdm=maybe")
  with pytest.raises(ValueError, match=r"seed='x': expected int"):
    common.parse_arg("seed=x", seed=0)
  with pytest.raises(ValueError, match=r"'seed' needs a value"):
    common.parse_arg("seed", seed=0)


def test_validation_runs_before_jax_is_imported():
  code = ("import sys; from configs import demo; from grasp_jax.run import setup\n"
          "c = demo.get_config(); c.train.log_every = 0\n"
          "try: setup.validate_config(c)\n"
          "except ValueError as e: print(e)\n"
          "print('jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split("\n")
  assert out[:2] == ["config.train.log_every=0 is invalid; expected an integer >= 1", "False"]


def test_sets_agree_with_the_library():
  """setup repeats sets whose modules import jax; they must stay the library's."""
  from grasp_jax.diffusion import schedules
  from grasp_jax.evaluation import inception
  from grasp_jax.inference import generate
  from grasp_jax.models import adapters
  from grasp_jax.parallel import sharding
  from grasp_jax.trainer import optim
  assert setup.OPTIMIZERS == optim.NAMES
  assert setup.LR_SCHEDULES == optim.SCHEDULES
  assert setup.BETA_SCHEDULES == schedules.BETA_SCHEDULES
  assert set(setup.SAMPLERS) == set(generate.SAMPLERS)
  assert setup.MESH_AXES == sharding.MESH_AXES
  assert setup.ADAPTERS == adapters.METHODS
  assert set(setup.FID_MODES) == set(inception.RESIZE_METHODS)
