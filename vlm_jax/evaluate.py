r"""Evaluate a checkpoint with the evals of a config.

  python -m vlm_jax.evaluate --config configs/shapes_coca.py --workdir runs/shapes_coca \
      [--step N] [--tag NAME] [--config.evals.run=zeroshot,caption ...]

Restores the latest (or the given) checkpoint of DIR, runs `vlm_jax.evals.run_evals` with the
config's `evals` section on the config's mesh (or data parallelism over all devices when it does
not fit), writes DIR/eval/metrics_<step>.json (and the generated captions to
DIR/eval/captions_<step>.json), and prints the metrics as one JSON object on the last line of
standard output. `--tag NAME` writes metrics_<step>_NAME.json (and captions_<step>_NAME.json,
...) instead, so that several evaluations of one step are all kept. Without --config the config
saved in DIR (config.json) is used, with any --config.<field>=<value> overrides applied to it.
Every config field, with its value and help: python -m vlm_jax.config show configs/x.py[:arg]
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from vlm_jax import cli
from vlm_jax import evals as evals_lib
from vlm_jax import inference
from vlm_jax import preflight
from vlm_jax import sharding

_FLAGS = {}


def define_flags():
  """--workdir and --step (and, through `vlm_jax.cli`, --config with its overrides). Defined only
  when run as a program, so that importing this module next to the trainer does not clash."""
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None,
                                          "Run directory (or its checkpoints/ directory).")
  _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  _FLAGS["tag"] = flags.DEFINE_string("tag", None, "Suffix of the files written to DIR/eval "
                                      "(keeps several evaluations of one step).")
  flags.mark_flags_as_required(["workdir"])


def check_tag(tag):
  """A tag is a file-name suffix: letters, digits, '.', '_' and '-' only."""
  if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
    raise ValueError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (it becomes part "
                     "of file names)")


def evaluate(config, workdir: str, step: int | None = None, *, mesh=None,
             write: bool = True, tag: str | None = None) -> tuple[dict, int]:
  """Evaluates checkpoint `step` (latest if None) of `workdir`; returns (metrics, step).

  `config` None uses the config saved in the workdir. Metrics also go to
  WORKDIR/eval/metrics_<step>[_<tag>].json when `write`.
  """
  check_tag(tag)
  loc = inference.locate(workdir, step)
  if config is None:
    config = inference.load_config(loc)
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.prepare_data(config)         # the embedded data, if the cache lacks it
  preflight.check_evals(config)        # every problem of the evals, before any restore
  if not evals_lib.entries(config):
    raise ValueError("evals.run: no evaluation selected (config.evals.run is empty)")
  if mesh is None:
    mesh = _mesh(config)
  model = inference.load(workdir, loc.step, mesh=mesh, config=config)
  t0 = time.time()
  with model.context.scope():
    metrics = evals_lib.run_evals(model.context, step=loc.step)
  logging.info("evaluation of step %d took %.1fs", loc.step, time.time() - t0)
  if write and jax.process_index() == 0:
    out_dir = os.path.join(loc.workdir or os.path.dirname(loc.checkpoints), "eval")
    os.makedirs(out_dir, exist_ok=True)
    suffix = f"{loc.step}_{tag}" if tag else f"{loc.step}"
    _write_json(os.path.join(out_dir, f"metrics_{suffix}.json"),
                {"step": loc.step, **_finite(metrics)})
    captions = {k: v for k, v in model.context.artifacts.items() if k.startswith("caption/")}
    if captions:
      _write_json(os.path.join(out_dir, f"captions_{suffix}.json"), captions)
    for key, answers in model.context.artifacts.items():
      if key.startswith("vqa/"):   # the official VQA results format, for the scorer CLI
        dataset = key.split("/", 1)[1].replace("/", "_")
        _write_json(os.path.join(out_dir, f"vqa_results_{dataset}_{suffix}.json"), answers)
  return metrics, loc.step


def _mesh(config):
  """The config's (training) mesh, so a model that needs FSDP / tensor parallelism to fit is
  evaluated the same way; pure data parallelism when this machine's devices do not fit it."""
  try:
    return sharding.make_mesh(config.mesh)
  except (ValueError, KeyError, AttributeError) as e:
    logging.warning("mesh: config.mesh does not fit the %d devices here (%s); evaluating with "
                    "data parallelism over all devices", jax.device_count(), e)
    return inference.default_mesh()


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
  os.replace(tmp, path)


def _jsonable(x):
  return float(x)


def _finite(metrics: dict) -> dict:
  """JSON has no NaN: non-finite values are printed as null."""
  return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
          for k, v in metrics.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.start()
  workdir = _FLAGS["workdir"].value
  try:
    loc = inference.locate(workdir, _FLAGS["step"].value)
    config = cli.load_config(saved=None if cli.config_spec() else inference.load_config(loc))
    metrics, step = evaluate(config, workdir, loc.step, tag=_FLAGS["tag"].value)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e)
  if jax.process_index() == 0:
    sys.stdout.flush()
    print(json.dumps({"step": step, **_finite(metrics)}, sort_keys=True), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
