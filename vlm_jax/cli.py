"""What every command-line entry point shares: config flags, start-up, and how errors end a run.

    python -m vlm_jax.<command> --config configs/x.py[:arg] --config.a.b=value ... --workdir DIR

`--config` and the `--config.<field>=<value>` overrides are taken off the command line before
absl parses the rest (`run`), so a command without `--config` can still take overrides and apply
them to the config saved in its workdir. Overrides are typed like the field they set; a boolean
field also takes `--config.<field>` / `--noconfig.<field>`.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging

from vlm_jax import config_utils
from vlm_jax import console

_ARGS = {"spec": None, "overrides": []}


def split_config_args(argv: list) -> tuple[Optional[str], list, list]:
  """(config spec, overrides 'a.b=value', the other arguments) of a command line."""
  spec, overrides, rest = None, [], [argv[0]] if argv else []
  i = 1
  while i < len(argv):
    arg = argv[i]
    name = arg.lstrip("-")
    if arg.startswith("-") and (name == "config" or name.startswith("config=")):
      if "=" in name:
        spec = name.split("=", 1)[1]
      elif i + 1 < len(argv):
        spec, i = argv[i + 1], i + 1
      else:
        raise app.UsageError("--config needs a value: --config=path/to/config.py[:arg]")
    elif arg.startswith("-") and name.startswith("config."):
      field = name[len("config."):]
      overrides.append(field if "=" in field else f"{field}=True")
    elif arg.startswith("-") and name.startswith("noconfig."):
      overrides.append(f"{name[len('noconfig.'):]}=False")
    else:
      rest.append(arg)
    i += 1
  return spec, overrides, rest


def _parse(argv):
  _ARGS["spec"], _ARGS["overrides"], rest = split_config_args(list(argv))
  return app.parse_flags_with_usage(rest)


def run(main: Callable) -> None:
  """`absl.app.run(main)` with the config arguments split off first (see the module doc), quiet
  library logs (`vlm_jax.console`) and `--verbose` (library INFO logs, tracebacks of errors)."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs, and on an error the "
                      "traceback too.")

  def quiet_main(argv):
    console.quiet_logs(verbose=flags.FLAGS.verbose)
    return main(argv)
  app.run(quiet_main, flags_parser=_parse)


def config_spec() -> Optional[str]:
  """The `--config` argument, or None."""
  return _ARGS["spec"]


def config_overrides() -> list:
  """The `--config.<field>=<value>` arguments, as 'field=value'."""
  return list(_ARGS["overrides"])


def load_config(workdir: Optional[str] = None, saved=None):
  """The command's config: `--config` with its overrides, else the run's saved config (`saved`,
  or `workdir`/config.json) with the overrides; fails when there is neither."""
  spec, overrides = _ARGS["spec"], _ARGS["overrides"]
  if spec:
    return config_utils.load_config(spec, overrides)
  if saved is not None:
    return config_utils.apply_overrides(saved, overrides)
  path = os.path.join(workdir, "config.json") if workdir else None
  if path and os.path.isfile(path):
    with open(path) as f:
      config = config_utils.config_from_json(f.read(), source=path)
    return config_utils.apply_overrides(config, overrides)
  where = f" and {path} does not exist" if path else ""
  raise ValueError(f"--config: no config file given{where}; pass "
                   "--config=configs/<experiment>.py")


def start() -> None:
  """Start-up of every command: multi-process JAX when launched so, and TensorFlow (used for
  data only) kept off the accelerators."""
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if sharding.multiprocess_environment() and os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Cross-process collectives on CPU (tests, local multi-process runs) go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  sharding.maybe_initialize_distributed()
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pylint: disable=broad-except
    pass
  logging.info("JAX: %d processes, %d devices (%s)", jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)


def fail(error: BaseException) -> None:
  """Ends the command with the error's message (`error: ...`) and exit status 1; with
  `--verbose` the traceback is printed first."""
  if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS and flags.FLAGS.verbose:
    print("".join(traceback.format_exception(error)), file=sys.stderr, flush=True)
  raise SystemExit(f"error: {error}")


def ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside a command line nothing parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
