"""Weight-space combinations of checkpoints of one model: model soups, WiSE-FT, task arithmetic.

    # WiSE-FT (Wortsman et al. 2022): halfway between the zero-shot and the fine-tuned weights
    python -m vlm_jax.soup --workdir runs/zeroshot --workdir runs/finetuned --weights 0.5,0.5 \
        --out runs/wise_0.5
    # a uniform soup of three fine-tunes (weights default to equal shares)
    python -m vlm_jax.soup --workdir runs/ft_a --workdir runs/ft_b --workdir runs/ft_c --out runs/soup
    # task arithmetic: pretrained + 1.5 x (fine-tuned - pretrained)
    python -m vlm_jax.soup --workdir runs/pretrained --workdir runs/finetuned --weights=-0.5,1.5 \
        --out runs/extrapolated

The output params are sum_i weights_i * params_i. Weights must sum to 1, which covers all three
(a task vector added with scale s to the pretrained weights is the weights 1 - s and s), and may
be negative. Every checkpoint must hold the same params with the same shapes (the first that
differs is named) for the same task; blocks stored plain or scanned mix freely, and the result
is stored in the first checkpoint's layout. OUT is a normal workdir (`checkpoints/0` with the
params, the first run's `config.json` and tokenizer, and `soup.json`: which checkpoints, steps
and weights), so `python -m vlm_jax.evaluate --workdir OUT`, `init_from` and `export` read it.
Nothing is written when the checkpoints cannot be combined.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np


class SoupError(ValueError):
  """Checkpoints that cannot be combined, or weights that do not describe a combination."""


def check_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
  """The weights of `count` checkpoints (equal shares when None); they must sum to 1."""
  if count < 2:
    raise SoupError(f"soup: {count} checkpoint(s); combining needs at least two --workdir")
  if weights is None:
    return [1.0 / count] * count
  weights = [float(w) for w in weights]
  if len(weights) != count:
    raise SoupError(f"soup: {len(weights)} weights for {count} checkpoints")
  if not all(math.isfinite(w) for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
    raise SoupError(f"soup: weights {weights} sum to {sum(weights):g}, not 1 (a soup or "
                    "WiSE-FT mixes with weights that sum to 1; task arithmetic pretrained + s x "
                    "(fine-tuned - pretrained) is the weights 1 - s, s)")
  return weights


def _plain_params(loaded) -> dict:
  """{path: numpy array} of a loaded checkpoint's params in the plain block layout."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.models import layers  # pylint: disable=g-import-not-at-top
  params = layers.unstack_block_params(jax.tree.map(np.asarray, jax.device_get(loaded.params)))
  return ckpt_lib.flatten(params)


def _check_same_model(first: dict, other: dict, name: str, first_name: str) -> None:
  for path in sorted(set(first) | set(other)):
    if path not in other or path not in first:
      where = name if path not in other else first_name
      raise SoupError(f"soup: {path} is not in {where}; only checkpoints of the same model "
                      "combine")
    if first[path].shape != other[path].shape:
      raise SoupError(f"soup: {path} is {first[path].shape} in {first_name} but "
                      f"{other[path].shape} in {name}; only checkpoints of the same model combine")
    if not np.issubdtype(first[path].dtype, np.floating):
      raise SoupError(f"soup: {path} holds {first[path].dtype} values, which do not average")


def combine(workdirs: Sequence[str], out: str, weights: Optional[Sequence[float]] = None, *,
            steps: Optional[Sequence[Optional[int]]] = None, ema: bool = False) -> dict:
  """Writes OUT (see the module docstring); returns the report also written as OUT/soup.json."""
  from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import common  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from vlm_jax.models import layers  # pylint: disable=g-import-not-at-top
  weights = check_weights(weights, len(workdirs))
  steps = list(steps) if steps is not None else [None] * len(workdirs)
  try:
    out = common.check_out_dir(out)
  except common.ConversionError as e:
    raise SoupError(str(e).replace("convert:", "soup:", 1)) from e
  total, first, first_params, used_steps = None, None, None, []
  for workdir, weight, step in zip(workdirs, weights, steps):
    loaded = inference.load(workdir, step, ema=ema)
    params = _plain_params(loaded)
    if first is None:
      first, first_params = loaded, params
      total = {path: weight * value.astype(np.float64) for path, value in params.items()}
    else:
      if loaded.config.task != first.config.task:
        raise SoupError(f"soup: {workdir} is a {loaded.config.task!r} model but "
                        f"{workdirs[0]} a {first.config.task!r} one")
      _check_same_model(first_params, params, workdir, workdirs[0])
      for path, value in params.items():
        total[path] += weight * value.astype(np.float64)
    used_steps.append(loaded.step)
  souped = ckpt_lib.unflatten({path: value.astype(first_params[path].dtype)
                               for path, value in total.items()})
  if first.config.model.get("scan"):
    souped = layers.stack_block_params(souped)
  tokenizer_bytes = tokenizers.to_bytes(first.tokenizer) if first.tokenizer is not None else None
  report = {"workdirs": [os.path.abspath(w) for w in workdirs], "steps": used_steps,
            "weights": weights, "ema": ema}
  common.write_output(out, souped, first.config.copy_and_resolve_references(),
                      tokenizer_bytes=tokenizer_bytes, report=report, report_name="soup.json")
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m vlm_jax.soup", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", action="append", required=True,
                 help="a training or conversion workdir (repeat: two or more)")
  p.add_argument("--weights", default=None,
                 help="comma-separated, one per --workdir, summing to 1 (default: equal)")
  p.add_argument("--out", required=True, help="output workdir (must not exist yet)")
  p.add_argument("--ema", action="store_true", help="combine the runs' EMA weights")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    weights = None if args.weights is None else [float(w) for w in args.weights.split(",")]
    report = combine(args.workdir, args.out, weights, ema=args.ema)
  except (SoupError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out} ({len(report['workdirs'])} checkpoints, weights "
        f"{', '.join(f'{w:g}' for w in report['weights'])})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
