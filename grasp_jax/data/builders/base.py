"""Base classes of the project's builders, and builder options set by name.

Options are fields of a builder's config (its OPTIONS) set on top of a registered config, e.g.
{"resolution": 512, "skip_bad_images": True} on mimic_cxr_lt/cxr_lt_2022. A dataset built with
options lives under its own config name, the registered name plus the options that differ
("cxr_lt_2022_r512_skip_bad_images"; "default" is left out: "r512"), so it is never mixed up
with one built without them, and training finds it by that name too.
"""
import dataclasses
from typing import Any, ClassVar, Mapping

import tensorflow_datasets as tfds

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder writing array_record by default (random access, no TensorFlow)."""

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)


@dataclasses.dataclass(eq=False)
class ManualConfig(tfds.core.BuilderConfig):
  """Options of the builders that read a user's copy of a dataset (manual_dir).

  resolution: stored images are resolution x resolution.
  skip_bad_images: drop (and count in the metadata) missing or undecodable images instead of
    stopping at the first one.
  drop_overlapping_images: an image listed in two splits is an error (leakage) unless this is
    set; then it is kept only in the later split of the builder's split order (train first, test
    last, so evaluation splits stay whole) and counted.
  """
  OPTIONS: ClassVar[tuple[str, ...]] = ("resolution", "skip_bad_images",
                                        "drop_overlapping_images")
  resolution: int = 256
  skip_bad_images: bool = False
  drop_overlapping_images: bool = False

  def __post_init__(self):
    for name in self.OPTIONS:
      value, default = getattr(self, name), getattr(type(self), name)
      ok = (isinstance(value, bool) if isinstance(default, bool) else
            isinstance(value, int) and not isinstance(value, bool) and value >= 1)
      if not ok:
        want = "True or False" if isinstance(default, bool) else "a positive integer"
        raise ValueError(f"builder config {self.name!r}: {name} must be {want}, got {value!r}")


def _coerce(name: str, text: Any, default: Any) -> Any:
  """A command-line string (or a value) as the type of the option's default."""
  if not isinstance(text, str):
    return text  # ManualConfig checks it.
  s = text.strip().lower()
  if isinstance(default, bool):
    if s not in _TRUE + _FALSE:
      raise ValueError(f"builder option {name} takes true/false, 1/0 or yes/no, got {text!r}")
    return s in _TRUE
  try:
    return int(s)
  except ValueError:
    raise ValueError(f"builder option {name} takes an integer, got {text!r}") from None


def with_options(builder_cls: type, config_name: str | None,
                 options: Mapping[str, Any]) -> tfds.core.BuilderConfig:
  """The registered config `config_name` (None: the default) with `options` set.

  Option values may be strings as typed on a command line ("true", "512"). Without options that
  differ from the registered values, the registered config itself.
  """
  configs = builder_cls.builder_configs
  config_name = config_name or builder_cls.DEFAULT_BUILDER_CONFIG_NAME or next(iter(configs))
  if config_name not in configs:
    raise ValueError(f"{builder_cls.name} has no config {config_name!r}; configs are "
                     f"{sorted(configs)}")
  base = configs[config_name]
  allowed = getattr(base, "OPTIONS", ())
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"{builder_cls.name}/{config_name} has no builder options {unknown}; "
                     f"options are {list(allowed)}")
  changed = {}
  for name in allowed:
    if name in options:
      value = _coerce(name, options[name], getattr(base, name))
      if value != getattr(base, name) or type(value) is not type(getattr(base, name)):
        changed[name] = value
  if not changed:
    return base
  parts = [] if config_name == "default" else [config_name]
  parts += [_suffix(k, v) for k, v in changed.items()]
  return dataclasses.replace(base, name="_".join(parts), **changed)


def _suffix(name: str, value: Any) -> str:
  if isinstance(value, bool):
    return name if value else f"no_{name}"
  return f"r{value}" if name == "resolution" else f"{name}{value}"
