"""What every entry point does before training: check the config, record it, quiet the logs.

`validate_config` checks every field against FIELDS (a type, a range or one of a listed set) and
the few rules that tie fields together. It imports no jax, so a bad value fails in a fraction of
a second, before anything is built. A field without an entry in FIELDS is an error too: a new
config field needs its check here (tests/test_config.py walks every shipped config).
"""
import json
import logging as std_logging
import math
import os
import re

from absl import logging

from grasp_jax import partition

BACKBONES = ("unet", "dit")
METHODS = ("grasp", "full", "lora", "selora", "moe")
ADAPTERS = ("none", "grasp", "lora", "selora", "moe")  # method.adapter: 'none' for 'full'.
# The library's own sets, repeated here because their modules import jax (tests/test_config.py
# checks they agree): trainer/optim.NAMES, .SCHEDULES, diffusion/schedules.BETA_SCHEDULES,
# inference/generate.SAMPLERS, parallel/sharding.MESH_AXES, models/adapters.METHODS,
# evaluation/inception.RESIZE_METHODS.
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SAMPLERS = ("ddim", "dpmpp2m", "euler")
MESH_AXES = ("data", "fsdp")
FID_MODES = ("ours", "clean")


# ---------------------------------------------------------------------------------------------
# Checks: (what is expected, predicate).

def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def integer(lo=None, hi=None, *, also=()):
  bounds = " and ".join(s for s in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}")
                        if s)
  expected = "an integer" + (f" {bounds}" if bounds else "") + "".join(f" or {a}" for a in also)
  return expected, lambda v: _is_int(v) and (v in also or (
      (lo is None or v >= lo) and (hi is None or v <= hi)))


def real(lo=None, hi=None, *, lo_open=False, hi_open=False):
  """A finite number within the bounds (open bounds exclude the value)."""
  parts = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
           f"{'<' if hi_open else '<='} {hi}" if hi is not None else ""]
  def ok(v):
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
      return False
    above = lo is None or (v > lo if lo_open else v >= lo)
    return above and (hi is None or (v < hi if hi_open else v <= hi))
  return " ".join(["a finite number"] + [" and ".join(p for p in parts if p)]).strip(), ok


def one_of(*allowed):
  return f"one of {allowed}", lambda v: type(v) is type(allowed[0]) and v in allowed


def boolean():
  return "True or False", lambda v: isinstance(v, bool)


def text(pattern=r".*", expected="a string"):
  return expected, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None


def _regex(v):
  try:
    re.compile(v)
    return True
  except (re.error, TypeError):
    return False


def regexes():
  return "a non-empty list of regular expressions", lambda v: (
      isinstance(v, (list, tuple)) and len(v) > 0 and all(
          isinstance(r, str) and _regex(r) for r in v))


def sizes(empty=False):
  return f"a{'' if empty else ' non-empty'} list of integers >= 1", lambda v: (
      isinstance(v, (list, tuple)) and (empty or len(v) > 0) and
      all(_is_int(x) and x >= 1 for x in v))


def _plain(v):
  return v is None or isinstance(v, (bool, int, float, str)) or (
      isinstance(v, (list, tuple)) and all(_plain(x) for x in v))


def architecture():
  return "a dict of architecture fields (name -> number, string, bool, None or list)", (
      lambda v: hasattr(v, "items") and all(
          isinstance(k, str) and k.isidentifier() and _plain(x) for k, x in v.items()))


def data_overrides():
  """Fields of config.data with values their own checks accept (checked when called)."""
  return "a dict of config.data fields and valid values", lambda v: hasattr(v, "items") and all(
      f"data.{k}" in FIELDS and FIELDS[f"data.{k}"][1](x) for k, x in v.items())


def mesh_rules():
  def axes(a):
    return a is None or a in MESH_AXES or (
        isinstance(a, (list, tuple)) and all(x in MESH_AXES for x in a))
  return f"pairs (logical axis name, None | mesh axis | list of mesh axes in {MESH_AXES})", (
      lambda v: isinstance(v, (list, tuple)) and all(
          isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) and axes(r[1])
          for r in v))


def thresholds():
  def ok(v):
    if not isinstance(v, str) or not re.fullmatch(r"(\d+(,\d+)*)?", v):
      return False
    t = [int(x) for x in v.split(",")] if v else []
    return all(a > b for a, b in zip(t, t[1:]))
  return "'' or decreasing integers, comma-separated (e.g. '100,20')", ok


SIZE = integer(1)
COUNT = integer(0)
NAME = text(r"\S+", "a non-empty string without spaces")
PATH = text()

FIELDS = {
    "seed": integer(0, 2**31 - 1),
    "data.name": NAME,
    "data.config": text(r"\S*", "a string without spaces"),
    "data.data_dir": PATH,
    "data.manual_dir": PATH,
    "data.cache": PATH,
    "data.builder_options": text(r"(\w+=[^,=\s]+(,\w+=[^,=\s]+)*)?",
                                 "'' or key=value[,key=value] without spaces"),
    "data.train_split": NAME,
    "data.eval_split": NAME,
    "data.image_size": integer(1, 16384),
    # Images: 1 grey, 3 RGB; 4 / 16: the SD2 / SD3 latents of configs/sharding.py's plans.
    "data.channels": one_of(1, 3, 4, 16),
    "data.batch_size": SIZE,
    "data.balance": one_of("", "class", "cluster"),
    "partition.strategy": one_of(*partition.STRATEGIES),
    "partition.k": SIZE,
    "partition.healthy": text(),
    "partition.thresholds": thresholds(),
    "partition.groups": PATH,
    "partition.seed": integer(0, 2**31 - 1),
    # Optional (run/gradient_partition.options).
    "partition.gradient_batches": integer(2),
    "partition.gradient_repeats": SIZE,
    "partition.gradient_min_images": SIZE,
    "model.backbone": one_of(*BACKBONES),
    "model.pretrained": PATH,
    "model.dtype": one_of("float32", "bfloat16", "float16"),
    "model.remat": boolean(),
    "model.frozen_dtype": one_of("float32", "bfloat16", "float16"),
    "model.vae": PATH,
    "model.base": architecture(),
    "model.base_data": data_overrides(),  # What differs for pretraining the base.
    "model.base_steps": COUNT,
    "model.base_learning_rate": real(0, lo_open=True),
    "model.base_shipped": boolean(),
    "text.encoder": text(r".+", "'minilm', 'pipeline' or a folder"),
    "text.max_length": SIZE,
    "text.cache": boolean(),
    "text.cache_dtype": one_of("float16", "float32"),
    "text.t5_length": COUNT,
    "text.t5": one_of("", "zeros", "encoder"),
    "method.name": one_of(*METHODS),
    "method.adapter": one_of(*ADAPTERS),
    "method.num_clusters": SIZE,
    "method.rank": SIZE,
    "method.moe_mode": text(r"soft|top[1-9][0-9]*", "'soft' or 'top<k>'"),
    "method.moe_aux_weight": real(0),
    "method.selora_threshold": real(0, lo_open=True),
    "method.selora_every": SIZE,
    "method.trainable": regexes(),
    "diffusion.objective": one_of("eps", "v", "flow"),
    "diffusion.schedule": one_of(*BETA_SCHEDULES),
    "diffusion.num_train_timesteps": SIZE,
    "diffusion.cfg_dropout": real(0, 1),
    "diffusion.min_snr_gamma": real(0),
    "diffusion.clip_sample": boolean(),
    "diffusion.flow_shift": real(0, lo_open=True),
    "diffusion.cbdm_weight": real(0),
    "diffusion.cbdm_prior": one_of("uniform", "frequency"),
    "diffusion.coral_weight": real(0),
    "diffusion.coral_temperature": real(0, lo_open=True),
    "optim.name": one_of(*OPTIMIZERS),
    "optim.learning_rate": real(0, lo_open=True),
    "optim.schedule": one_of(*LR_SCHEDULES),
    "optim.warmup_steps": COUNT,
    "optim.b1": real(0, 1, hi_open=True),
    "optim.b2": real(0, 1, hi_open=True),
    "optim.eps": real(0),
    "optim.weight_decay": real(0),
    "optim.grad_clip": real(0),
    "optim.momentum": real(0, 1, hi_open=True),  # Optional (trainer/optim.DEFAULTS), sgd only.
    "train.steps": COUNT,
    "train.log_every": SIZE,
    "train.checkpoint_every": SIZE,
    "train.keep_checkpoints": SIZE,
    "train.ema_decay": real(0, 1, hi_open=True),
    "train.grad_accum_steps": SIZE,
    "train.nan_policy": one_of("stop", "skip"),
    "train.sample_every": COUNT,
    "train.diagnostics_every": COUNT,
    "train.diagnostics_batches": SIZE,
    "train.profile_steps": COUNT,
    "train.resume_from": COUNT,
    "mesh.data": integer(1, also=(-1,)),
    "mesh.fsdp": integer(1, also=(-1,)),
    "mesh.rules": mesh_rules(),
    "sample.sampler": one_of(*SAMPLERS),
    "sample.steps": SIZE,
    "sample.guidance_scale": real(0),
    "sample.minority_guidance": real(0.0),
    "sample.per_class": SIZE,
    "sample.batch_size": SIZE,
    "sample.classes": text(),
    "eval.every": COUNT,
    "eval.every_per_class": SIZE,
    "eval.every_real_per_class": SIZE,
    "eval.real_per_class": SIZE,
    "eval.heldout_per_class": SIZE,
    "eval.split_seed": integer(0, 2**31 - 1),
    "eval.evaluator_widths": sizes(),
    "eval.evaluator_hidden": COUNT,
    "eval.evaluator_extra_splits": text(r"([^,\s]+(,[^,\s]+)*)?",
                                        "'' or split names, comma-separated"),
    "eval.evaluator_steps": SIZE,
    "eval.evaluator_batch_size": SIZE,
    "eval.evaluator_learning_rate": real(0, lo_open=True),
    "eval.evaluator_floor": real(0, 1),
    "eval.evaluator_brightness": real(0, 255),
    "eval.evaluator_noise": real(0, 255),
    "eval.evaluator_blocks": sizes(empty=True),
    "eval.n_boot": SIZE,
    "eval.inception": boolean(),
    "eval.inception_n_boot": SIZE,
    "eval.fid_mode": one_of(*FID_MODES),
    "eval.classifier_steps": SIZE,
    "eval.classifier_batch_size": SIZE,
    "eval.downstream_val_per_class": SIZE,
    "eval.downstream_test_per_class": COUNT,
    "eval.downstream_validate_every": SIZE,
    "eval.downstream_patience": SIZE,
    "eval.train_per_class": COUNT,
    "eval.downstream": boolean(),
    "eval.cache_dir": PATH,
}


def fields(config, prefix=""):
  """(dotted name, value) of every field; FIELDS entries that hold dicts are one field."""
  for key, value in config.items():
    name = prefix + key
    if name not in FIELDS and hasattr(value, "items"):
      yield from fields(value, name + ".")
    else:
      yield name, value


def _fail(field, value, expected):
  value = value.to_dict() if hasattr(value, "to_dict") else value  # Not ConfigDict's YAML.
  raise ValueError(f"config.{field}={value!r} is invalid; expected {expected}")


def validate_config(config):
  """Raises ValueError naming the first bad field, its value and what it must be."""
  for name, value in fields(config):
    if name not in FIELDS:
      raise ValueError(f"config.{name}={value!r} is not a known field (no check in "
                       "grasp_jax/run/setup.py FIELDS): a typo, or a new field without its check")
    expected, ok = FIELDS[name]
    if not ok(value):
      _fail(name, value, expected)
  c = config
  objectives = ("eps", "v") if c.model.backbone == "unet" else ("flow",)
  if c.diffusion.objective not in objectives:
    _fail("diffusion.objective", c.diffusion.objective, f"one of {objectives} for "
          f"model.backbone={c.model.backbone!r}")
  samplers = ("euler",) if c.diffusion.objective == "flow" else ("ddim", "dpmpp2m")
  if c.sample.sampler not in samplers:
    _fail("sample.sampler", c.sample.sampler, f"one of {samplers} for "
          f"diffusion.objective={c.diffusion.objective!r}")
  adapter = "none" if c.method.name == "full" else c.method.name
  if c.method.adapter != adapter:
    _fail("method.adapter", c.method.adapter, f"{adapter!r} for method.name={c.method.name!r}")
  top = re.fullmatch(r"top([0-9]+)", c.method.moe_mode)
  if top and int(top.group(1)) > c.method.num_clusters:
    _fail("method.moe_mode", c.method.moe_mode, f"'soft' or 'top<k>' with k <= "
          f"method.num_clusters={c.method.num_clusters}")
  if c.data.batch_size % c.train.grad_accum_steps:
    _fail("train.grad_accum_steps", c.train.grad_accum_steps, f"a divisor of data.batch_size="
          f"{c.data.batch_size} (the global batch is split into that many micro-batches)")
  if c.mesh.data == c.mesh.fsdp == -1:
    _fail("mesh.fsdp", -1, "a size when mesh.data is -1 (at most one axis takes the rest)")
  odd = [k for k in c.eval.evaluator_blocks if c.data.image_size % k]
  if odd:
    _fail("eval.evaluator_blocks", list(c.eval.evaluator_blocks), f"block sizes that divide "
          f"data.image_size={c.data.image_size} ({odd} do not)")
  if "groups" in c.partition.strategy.split("+") and not c.partition.groups:
    _fail("partition.groups", "", f"a groups name or JSON file for partition.strategy="
          f"{c.partition.strategy!r}")


# ---------------------------------------------------------------------------------------------
# Recording.

def write_config(config, workdir):
  """Writes WORKDIR/config.json; a different earlier config is kept as config.N.json."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text_ = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != text_:
      n = 1
      while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
        n += 1
      os.replace(path, os.path.join(workdir, f"config.{n}.json"))
      logging.info("config changed since the last run; the old one is config.%d.json", n)
  with open(path, "w") as f:
    f.write(text_)
  json.loads(text_)  # Fails loudly if a field is not JSON-serialisable.


class QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax / TFDS (dozens of lines per checkpoint); keeps warnings."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/grain/", "/jax/_src/")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)
