r"""In-process A/B of XLA compile options and config fields on the trainer's step: one JSON line
per variant.

  python bench/option_ab.py --config configs/bench_cpu_clip.py \
      --variant=base --variant=conc:xla_cpu_enable_concurrency_optimized_scheduler=true \
      [--rounds 6 --steps_per_round 2]
  python bench/option_ab.py --config configs/bench_cpu_clip.py \
      --variant=cond --variant=select:config.nonfinite_guard=select

Each `--variant NAME[:OPTION=VALUE,OPTION=VALUE...]` compiles the step with those XLA options
(`lowered.compile(compiler_options=...)`, the DebugOptions that XLA_FLAGS also sets, e.g.
`xla_cpu_*`, `xla_gpu_*`); an option named `config.<field>` instead overrides that config field
for the variant's step (e.g. `config.nonfinite_guard`, `config.model.attention`), which must keep
the train state's shapes (all variants step the same state). The variants then run round-robin in one process on one train
state, `--steps_per_round` steps each per round, so every variant sees the same machine
conditions and the same weights. That is what makes a few-percent effect visible on a machine
whose speed drifts by more than that between processes; separate runs with different XLA_FLAGS
cannot show it.

Values: true/false, integers and floats are converted; anything else stays a string. Per
variant: median and minimum step time over all its timed steps, `speedup` (the first variant's
median / this one's), its loss on one common state after the timing (equal up to rounding when
the options keep the function), and the size of the compiled program: `hlo_instructions` and
`hlo_copies` (instructions, and `copy` instructions, in XLA's optimized HLO, all computations).
"""
from __future__ import annotations

import os
import re
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def define_flags() -> dict:
  return dict(
      variant=flags.DEFINE_multi_string(
          "variant", None, "NAME[:OPTION=VALUE,...]; the first is the baseline (may be bare)."),
      rounds=flags.DEFINE_integer("rounds", 6, "Round-robin rounds (one untimed round first)."),
      steps_per_round=flags.DEFINE_integer("steps_per_round", 2, "Timed steps per variant per "
                                           "round."),
      seed=flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch."))


def _value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_variant(spec: str) -> tuple[str, dict]:
  """'name:opt=1,other=true' -> ('name', {'opt': 1, 'other': True}); 'name' -> ('name', {})."""
  name, _, rest = spec.partition(":")
  if not name:
    raise ValueError(f"--variant={spec!r}: a variant needs a name before the ':'")
  options = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"--variant={spec!r}: {item!r} is not OPTION=VALUE")
    options[key.strip()] = _value(value.strip())
  return name, options


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (?:\([^=]*?\)|\S+) ([\w\-]+)\(", re.M)


def hlo_sizes(hlo_text: str) -> dict:
  """Instructions and `copy` instructions of an optimized HLO module (all computations)."""
  ops = _INSTRUCTION.findall(hlo_text)
  return {"hlo_instructions": len(ops), "hlo_copies": ops.count("copy")}


def _variant_step(config, overrides: dict, rt, name: str):
  """The trainer's jitted step for `config` with `overrides`; its state must be `rt`'s."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  variant = runtime.Runtime.create(config_utils.apply_overrides(config, overrides))
  shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  if (jax.tree.structure(variant.abstract_state) != jax.tree.structure(rt.abstract_state) or
      shapes(variant.abstract_state) != shapes(rt.abstract_state)):
    raise ValueError(f"--variant {name}: config overrides {overrides} change the train state; "
                     "only fields that keep it can be compared on one state")
  return variant.make_step()


def run(config, variants: list[tuple[str, dict]], *, rounds: int = 6, steps_per_round: int = 2,
        seed: int = 0, config_name: str = "") -> list[dict]:
  """Compiles and times every variant; returns one record per variant (not printed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  if not variants:
    raise ValueError("give at least one --variant (the first one is the baseline)")
  names = [n for n, _ in variants]
  if len(set(names)) != len(names):
    raise ValueError(f"--variant names must differ, got {names}")
  if rounds < 1 or steps_per_round < 1:
    raise ValueError(f"--rounds={rounds} and --steps_per_round={steps_per_round} must be >= 1")
  rt, state, step_fn, _, batch = train_step.build_with_batch(config, seed)
  steps = {}            # built outside the mesh scope, as the trainer builds its own
  for name, options in variants:
    overrides = {k[len("config."):]: v for k, v in options.items() if k.startswith("config.")}
    steps[name] = _variant_step(config, overrides, rt, name) if overrides else step_fn
  with rt.context():
    executables, compile_s, sizes = {}, {}, {}
    for name, options in variants:
      xla = {k: v for k, v in options.items() if not k.startswith("config.")}
      fn = steps[name]
      t0 = time.perf_counter()
      try:
        executables[name] = fn.lower(state, batch).compile(compiler_options=xla or None)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"--variant {name}: XLA refused its options {xla}: {e}") from e
      compile_s[name] = time.perf_counter() - t0
      sizes[name] = hlo_sizes(executables[name].as_text())
    times = {name: [] for name in executables}
    # Round 0 warms every executable up and is not timed.
    for r in range(rounds + 1):
      for name, exe in executables.items():
        for _ in range(steps_per_round):
          t0 = time.perf_counter()
          state, out = exe(state, batch)
          jax.block_until_ready((state, out))
          if r:
            times[name].append(time.perf_counter() - t0)
    # Each variant's loss on one and the same state: equal up to rounding when the options keep
    # the function (a copy per variant, since the step donates its input state).
    losses = {name: float(exe(jax.tree.map(jnp.copy, state), batch)[1]["loss"])
              for name, exe in executables.items()}
  base = statistics.median(times[names[0]])
  records = []
  for name, options in variants:
    med = statistics.median(times[name])
    records.append({
        "impl": "option_ab", "config": config_name, "variant": name, "options": options,
        "median_step_s": med, "min_step_s": min(times[name]), "steps": len(times[name]),
        "speedup": base / med, "compile_s": compile_s[name], "loss": losses[name],
        **sizes[name],
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    })
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  f["config"] = cli.load_config()
  variants = [parse_variant(v) for v in (f["variant"] or [])]
  for record in run(f["config"], variants, rounds=f["rounds"],
                    steps_per_round=f["steps_per_round"], seed=f["seed"],
                    config_name=synthetic.config_spec(sys.argv)):
    synthetic.emit(record)


if __name__ == "__main__":
  _FLAGS = define_flags()
  cli.run(main)
