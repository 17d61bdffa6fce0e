"""Load an experiment config exactly as the command line does.

`python -m vlm_jax.train --config configs/x.py:arg --config.a.b=1` is parsed by
`ml_collections.config_flags`; `load_config` runs the same parser on its own absl `FlagValues`
so tests, notebooks and the demo get identical behaviour (locked config, typed overrides, a
mistyped key fails with its name) without touching the global flags.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Mapping

from absl import flags
import ml_collections
from ml_collections import config_flags


def load_config(spec: str, overrides: Iterable[str] | Mapping[str, Any] = ()
               ) -> ml_collections.ConfigDict:
  """Returns the locked ConfigDict for `spec` = 'path/to/config.py[:arg]'.

  `overrides` are either command-line strings (`'model.remat=True'`, with or without a leading
  `--config.`) or a mapping {'model.remat': True} whose values are converted to strings the way
  the command line would see them.
  """
  _make_config_package_importable(spec.split(":", 1)[0])
  if isinstance(overrides, Mapping):
    overrides = [f"{k}={_to_flag_string(v)}" for k, v in overrides.items()]
  argv = ["load_config", f"--config={spec}"]
  for o in overrides:
    o = o[len("--"):] if o.startswith("--") else o
    o = o[len("config."):] if o.startswith("config.") else o
    argv.append(f"--config.{o}")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                 sys_argv=argv)
  fv(argv)
  return fv.config


def _make_config_package_importable(path: str):
  """Config files import their shared pieces as `configs.common`; make that work from any cwd by
  putting the folder that holds the `configs` package on sys.path."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.exists(os.path.join(folder, "__init__.py")):
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)


def _to_flag_string(value: Any) -> str:
  if value is None:
    return "None"
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """A JSON rendering of the config, saved next to checkpoints so evaluation/inference can rebuild
  the model without the original config file."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `config_to_json` (tuples come back as lists; the result is not locked)."""
  return ml_collections.ConfigDict(json.loads(text))
