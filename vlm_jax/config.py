r"""Every field of a config, with its value and what it means.

    python -m vlm_jax.config show configs/shapes_coca.py[:arg] [--config.total_steps=500 ...]
    python -m vlm_jax.config show runs/shapes_coca          # the config a run saved (config.json)

Prints one line per field, `name = value  # help`, sorted by name, with the overrides
applied (so it shows exactly what `train` would run). Each line is a valid
`--config.<name>=<value>` override once the spaces around '=' are dropped. The help is the comment
written next to the field where its default is defined (`vlm_jax/config_defaults.py`, the task,
the towers and the evaluators), so it cannot drift from the code that reads it.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from typing import Callable, Dict, Iterator, Tuple

from absl import app

from vlm_jax import cli
from vlm_jax import config_utils

# `c.field = value  # help` or `c.a.b = value  # help`, and comment lines just above a field.
_ASSIGN = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=[^#]*?(?:#\s?(.*))?$")
_COMMENT = re.compile(r"^\s*#\s?(.*)$")


def comment_help(fn: Callable) -> Dict[str, str]:
  """{field path relative to `c`: its help} from the source of a function that builds a
  ConfigDict `c`: the comment after the assignment (with the comment-only lines that continue
  it), else the comment block just above it."""
  try:
    lines = inspect.getsource(fn).splitlines()
  except (OSError, TypeError):
    return {}
  helps, above = {}, []
  continued = None            # (field, column of its trailing '#'): comment lines there go on
  pending = None              # (field, the block above it): its help if it is the block's only
  for line in lines:          # field (a block above several fields is a heading)
    assign, comment = _ASSIGN.match(line), _COMMENT.match(line)
    if comment and continued and line.index("#") == continued[1]:
      helps[continued[0]] += " " + comment.group(1).strip()
      continue
    if pending and not assign:
      helps.setdefault(*pending)
    pending = continued = None
    if assign:
      field, trailing = assign.group(1), (assign.group(2) or "").strip()
      if trailing:
        helps[field] = trailing
        continued = (field, line.index("#", assign.end(1)))
      elif above:
        pending = (field, " ".join(above))
      above = []
    elif comment:
      above.append(comment.group(1).strip())
    else:
      above = []
  if pending:
    helps.setdefault(*pending)
  return helps


def _prefixed(prefix: str, fn: Callable) -> Dict[str, str]:
  return {prefix + k: v for k, v in comment_help(fn).items()}


def field_help(config) -> Dict[str, str]:
  """{dotted field name: help} for every field of `config` whose default carries a comment."""
  from vlm_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from vlm_jax import evals  # pylint: disable=g-import-not-at-top
  from vlm_jax import models  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  from vlm_jax.evals import common  # pylint: disable=g-import-not-at-top
  helps = {}
  helps.update(_prefixed("", config_defaults.train_config))
  helps.update(_prefixed("data.", config_defaults.data_config))
  helps.update(_prefixed("tokenizer.", config_defaults.tokenizer_config))
  helps.update(_prefixed("mesh.", config_defaults.mesh_config))
  helps.update(_prefixed("model.", models.shared_config))
  task = tasks.get(config.task)
  for cls in reversed(type(task).__mro__):     # a task may extend its parent's sections
    for method, prefix in (("head_config", "model."), ("loss_config", "loss.")):
      if method in vars(cls):
        helps.update(_prefixed(prefix, vars(cls)[method]))
  for section, (kind, _) in task.towers.items():
    name = config.model[section].get("name")
    if name in models.TOWERS[kind]:
      helps.update(_prefixed(f"model.{section}.", models.TOWERS[kind][name].default_config))
  helps.update(_prefixed("evals.", evals.evals_config))
  for name, entry in config.evals.items():
    if hasattr(entry, "get") and entry.get("kind") in evals.EVALUATORS:
      helps.update(_prefixed(f"evals.{name}.", common.entry_config))
      helps.update(_prefixed(f"evals.{name}.", evals.EVALUATORS[entry.kind].default_config))
  helps["task"] = f"the objective: {', '.join(tasks.TASKS)} (vlm_jax/tasks/)"
  return helps


def flat_fields(config, prefix: str = "") -> Iterator[Tuple[str, object]]:
  """(dotted name, value) of every leaf field, in the config's order."""
  for key, value in config.items():
    name = prefix + key
    if hasattr(value, "items") and not isinstance(value, dict):
      yield from flat_fields(value, name + ".")
    else:
      yield name, value


def render(config) -> str:
  helps = field_help(config)
  rows = [(f"{name} = {config_utils._to_flag_string(value) if value is not None else 'None'}",  # pylint: disable=protected-access
           helps.get(name, "")) for name, value in flat_fields(config)]
  width = min(max(len(left) for left, _ in rows), 60)
  return "\n".join(f"{left:{width}s}  # {text}" if text else left for left, text in rows)


def load(target: str):
  """A config file spec ('configs/x.py[:arg]'), or a run directory (its saved config.json),
  with the command line's overrides."""
  overrides = cli.config_overrides()
  if os.path.isdir(target):
    saved = os.path.join(target, "config.json")
    if not os.path.isfile(saved):
      raise FileNotFoundError(f"{target}: no config.json (not a run directory)")
    with open(saved) as f:
      config = config_utils.config_from_json(f.read(), source=saved)
    return config_utils.apply_overrides(config, overrides)
  return config_utils.load_config(target, overrides)


def main(argv):
  args = argv[1:]
  target = cli.config_spec()
  if args and args[0] == "show":
    args = args[1:]
  if target is None and len(args) == 1:
    target = args[0]
  elif args or target is None:
    raise app.UsageError("usage: python -m vlm_jax.config show configs/x.py[:arg] | RUN_DIR "
                         "[--config.<field>=<value> ...]")
  try:
    text = render(load(target))
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e)
  sys.stdout.write(text + "\n")


if __name__ == "__main__":
  cli.run(main)
