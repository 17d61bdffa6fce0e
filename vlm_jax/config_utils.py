"""Configs: load an experiment file, complete it with the library's defaults, apply overrides.

An experiment file (`configs/<experiment>.py`) is plain data: `get_config(arg=None)` returns a
ConfigDict (or dict) that names a task and sets what differs from the defaults; it imports
nothing from vlm_jax. Shared pieces between config files are imported relatively
(`from . import shapes_common`): a config folder with an `__init__.py` is loaded as a package.

    config = load_config("configs/shapes_coca.py:tiny", ["total_steps=10", "optim.lr=1e-3"])

`complete` turns the file's dict into the full config: the task's model and loss sections (towers
chosen by name get their own defaults), the library's data / tokenizer / mesh / trainer / evals
defaults (`vlm_jax.config_defaults`), then the file's values on top. A field the defaults do not
have is an error naming it (with the closest known names), as is a value of the wrong type. The
result is locked, so later typos fail too. Overrides are typed like the command line's
`--config.a.b=value`.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import sys
from typing import Any, Iterable, Mapping

from absl import flags
import ml_collections
from ml_collections import config_flags

from vlm_jax import config_defaults


class ConfigError(ValueError):
  """A config that cannot be used; the message names every offending field."""


# ---- loading an experiment file -----------------------------------------------------------------


def load_config(spec: str, overrides: Iterable[str] | Mapping[str, Any] = ()
               ) -> ml_collections.ConfigDict:
  """The complete, locked config of `spec` = 'path/to/config.py[:arg]' with `overrides`.

  `overrides` are command-line strings ('model.remat=True', with or without a leading
  '--config.') or a mapping {'model.remat': True}.
  """
  path, _, arg = spec.partition(":")
  module = _import_config_file(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config: {path} has no get_config(arg=None) function")
  user = module.get_config(arg) if arg else module.get_config()
  return apply_overrides(complete(user, source=path), overrides)


def _import_config_file(path: str):
  """Imports a config file by path. When its folder is a package (has `__init__.py`), the file is
  imported as a module of that package, so its relative imports work from any working
  directory and without touching sys.path."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config: no config file {path}")
  folder = os.path.dirname(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  tag = hashlib.sha1(folder.encode()).hexdigest()[:10]
  package = None
  if os.path.isfile(os.path.join(folder, "__init__.py")):
    package = f"_vlm_jax_configs_{tag}"
    if package not in sys.modules:
      spec = importlib.util.spec_from_file_location(
          package, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
      module = importlib.util.module_from_spec(spec)
      sys.modules[package] = module
      spec.loader.exec_module(module)
  name = f"{package}.{stem}" if package else f"_vlm_jax_config_{tag}_{stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module     # reloaded every time: a config file may have changed
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module


# ---- completing a config with the defaults ------------------------------------------------------


def complete(user, *, source: str = "config") -> ml_collections.ConfigDict:
  """The full locked config: defaults of `user['task']` and of the library, `user` on top.

  Raises ConfigError listing every unknown field and every value of the wrong type.
  """
  from vlm_jax import evals  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  user = _to_dict(user)
  if not user.get("task"):
    raise ConfigError(f"{source}: the config names no task; set config.task to one of "
                      f"{', '.join(tasks.TASKS)}")
  try:
    task = tasks.get(user["task"])
    user_model = user.get("model") or {}
    names = {s: user_model[s].get("name") for s in task.towers
             if isinstance(user_model.get(s), Mapping)}
    config = config_defaults.base_config(task, names)
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None
  problems = []
  _merge(config, user, "", problems, evals.entry_config)
  if problems:
    raise ConfigError(f"{source}: " + "; ".join(problems))
  config.lock()
  return config


def _to_dict(x):
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  return dict(x)


def _merge(base: ml_collections.ConfigDict, user: Mapping, path: str, problems: list,
           entry_config):
  for key, value in user.items():
    field = f"{path}{key}"
    if key not in base:
      if path == "evals." and isinstance(value, Mapping) and "kind" in value:
        try:
          base[key] = entry_config(value["kind"])      # a new evaluation entry
        except ValueError as e:
          problems.append(f"{field}.kind: {e}")
          continue
      else:
        known = list(base.keys())
        close = difflib.get_close_matches(str(key), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        problems.append(f"unknown field {field}{hint}")
        continue
    current = base[key]
    if isinstance(current, ml_collections.ConfigDict):
      if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        _merge(current, _to_dict(value), f"{field}.", problems, entry_config)
      else:
        problems.append(f"{field}: expected a section (dict), got {value!r}")
      continue
    try:
      base[key] = value
    except TypeError as e:
      problems.append(f"{field}: {value!r} has the wrong type ({e})")


# ---- overrides ----------------------------------------------------------------------------------


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str] | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' overrides, parsed and type-checked as on the command line."""
  if isinstance(overrides, Mapping):
    overrides = [f"{k}={_to_flag_string(v)}" for k, v in overrides.items()]
  argv = ["config"]
  for o in overrides:
    o = o[len("--"):] if o.startswith("--") else o
    o = o[len("config."):] if o.startswith("config.") else o
    argv.append(f"--config.{o}")
  if len(argv) == 1:
    return config
  problems = [p for p in (_missing_field(config, a[len("--config."):].split("=", 1)[0])
                          for a in argv[1:]) if p]
  if problems:
    raise ConfigError("--config overrides: " + "; ".join(problems))
  fv = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
  except flags.Error as e:
    raise ConfigError(f"--config overrides: {e}") from None
  return fv.config


def _missing_field(config, path: str):
  """A message when `path` ('a.b.c') names no field of `config`, with the closest names."""
  node, walked = config, []
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=3)
      hint = f" (did you mean {', '.join('.'.join(walked + [c]) for c in close)}?)" if close else ""
      return f"no config field {path!r}{hint}"
    node = node[part]
    walked.append(part)
  return None


def _to_flag_string(value: Any) -> str:
  if value is None:
    return "None"
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


# ---- saved configs ------------------------------------------------------------------------------


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """The config as JSON, saved beside checkpoints so evaluation / inference rebuild the model
  without the original config file."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str, *, source: str = "config.json") -> ml_collections.ConfigDict:
  """Inverse of `config_to_json`: the complete, locked config (configs saved by earlier
  versions are upgraded first, see `upgrade_legacy`)."""
  return complete(upgrade_legacy(json.loads(text)), source=source)


# Fields that earlier versions saved and that no longer exist (their job moved elsewhere).
_REMOVED = {"data": ("eval_all_captions", "eval_max_captions")}
_LEGACY_KINDS = {"clip": "contrastive", "siglip": "contrastive", "coca": "coca"}


def upgrade_legacy(saved: dict) -> dict:
  """A config saved before tasks existed (`model.kind` = clip / siglip / coca, towers without a
  name) as a task config; a current config is returned unchanged."""
  saved = json.loads(json.dumps(saved))
  model = saved.get("model") or {}
  if "task" not in saved and "kind" in model:
    kind = model.pop("kind")
    if kind not in _LEGACY_KINDS:
      raise ConfigError(f"config: model.kind={kind!r} from an earlier version is unknown")
    saved["task"] = _LEGACY_KINDS[kind]
    for section, name in (("image", "vit"), ("text", "transformer"),
                          ("decoder", "cross_attention")):
      if isinstance(model.get(section), dict):
        model[section].setdefault("name", name)
    if saved["task"] == "contrastive":
      model.pop("decoder", None)
      for key in ("caption_weight", "label_smoothing"):
        (saved.get("loss") or {}).pop(key, None)
  for section, keys in _REMOVED.items():
    for key in keys:
      (saved.get(section) or {}).pop(key, None)
  return saved
