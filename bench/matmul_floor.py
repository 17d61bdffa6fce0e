r"""The matmul floor of a train step: every matrix multiplication in it, timed on its own.

  python bench/matmul_floor.py --config configs/bench_cpu_clip.py [--repeats 5]

Reads the `dot_general` operations of the trainer's lowered step (the shapes and dimension
numbers the step really has: forward, input gradients and weight gradients), runs each distinct
one alone (jitted, on the first device) and, on CPU with PyTorch installed, the same contraction
with `torch.einsum` on the same number of threads; multiplies by how often the step contains it
and sums. The result is the time a step would take if its matmuls ran back to back at their
stand-alone speed and everything else (LayerNorm, GELU, softmax, copies, the optimizer) were free:
with that matmul library on those cores, no implementation of the step gets below it.

It answers "how far can this step go?" before anyone tunes the rest: compare `xla_floor_s` with
`step_time_s` of `bench/train_step.py` (what the step loses outside the matmuls, or to running
them inside the step) and with `torch_floor_s` (how the two matmul libraries compare on exactly
these shapes).

One JSON line: `dots` (matmuls per step) and `distinct`; `matmul_flops_per_step` (from the dots)
next to `analytic_flops_per_step` (the task's count, what MFU uses; it also counts the patch
embedding, a convolution that is counted in `convolutions_untimed` but not timed, and halves
causal attention, which the dots compute in full); `xla_floor_s` /
`torch_floor_s` and their GFLOP/s; `max_samples_per_s_xla` / `_torch` (batch / floor); `slowest`,
the dots that take the most time in all (shapes, count, GFLOP/s in each library).

The dots are those of the whole global step (the program before it is split over the mesh),
timed on one device: a step split evenly over N devices has 1/N of the floor on each.

The step must be a straight line: a config with `model.scan=True` or `grad_accum_steps > 1` runs
its dots inside loops, which this count cannot multiply, and is refused.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import string
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def define_flags() -> dict:
  """Command-line flags (defined only when run as a script, so that tests can import this
  module next to the other benchmark scripts)."""
  return dict(
      repeats=flags.DEFINE_integer("repeats", 5, "Timings per dot; the best one counts."),
      min_time=flags.DEFINE_float("min_time", 0.05,
                                  "Seconds each timing runs at least (calls are repeated)."),
      top=flags.DEFINE_integer("top", 6, "How many of the costliest dots to list."),
      torch=flags.DEFINE_bool("torch", True, "Also time the dots in PyTorch (CPU only)."))


# ------------------------------------------------------------------------------------------------
# The dots of a lowered step.


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot_general: operand shapes, dimension numbers and element type (as StableHLO has it)."""
  lhs: tuple
  rhs: tuple
  lhs_batch: tuple
  rhs_batch: tuple
  lhs_contract: tuple
  rhs_contract: tuple
  dtype: str                       # StableHLO element type: f32, bf16, f16

  @property
  def flops(self) -> float:
    """2 x multiply-adds: every output element sums over the contracted dimensions."""
    batch = math.prod(self.lhs[d] for d in self.lhs_batch)
    contract = math.prod(self.lhs[d] for d in self.lhs_contract)
    lhs_free = math.prod(n for d, n in enumerate(self.lhs)
                         if d not in self.lhs_batch + self.lhs_contract)
    rhs_free = math.prod(n for d, n in enumerate(self.rhs)
                         if d not in self.rhs_batch + self.rhs_contract)
    return 2.0 * batch * contract * lhs_free * rhs_free

  def einsum(self) -> str:
    """The same contraction as an einsum string (output: batch, lhs free, rhs free dims, which
    is dot_general's order)."""
    letters = iter(string.ascii_letters)
    lhs = [next(letters) for _ in self.lhs]
    rhs = [None] * len(self.rhs)
    for l, r in zip(self.lhs_batch + self.lhs_contract, self.rhs_batch + self.rhs_contract):
      rhs[r] = lhs[l]
    rhs = [c or next(letters) for c in rhs]
    out = ([lhs[d] for d in self.lhs_batch]
           + [c for d, c in enumerate(lhs) if d not in self.lhs_batch + self.lhs_contract]
           + [c for d, c in enumerate(rhs) if d not in self.rhs_batch + self.rhs_contract])
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"

  def describe(self) -> str:
    shape = lambda s: "x".join(map(str, s))
    return (f"{shape(self.lhs)} . {shape(self.rhs)} contract {list(self.lhs_contract)}x"
            f"{list(self.rhs_contract)} batch {list(self.lhs_batch)}x{list(self.rhs_batch)} "
            f"{self.dtype}")


_DOT = re.compile(
    r"stablehlo\.dot_general\s+%[\w#.]+,\s*%[\w#.]+,\s*"
    r"(?:batching_dims\s*=\s*\[([\d,\s]*)\]\s*x\s*\[([\d,\s]*)\],\s*)?"
    r"contracting_dims\s*=\s*\[([\d,\s]*)\]\s*x\s*\[([\d,\s]*)\]"
    r"[^:\n]*:\s*\(tensor<([\dx]*)x(\w+)>,\s*tensor<([\dx]*)x(\w+)>\)")
# Symbol names are bare (@main) or quoted (@"<lambda>").
_NAME = r'@(?:"([^"]+)"|([\w.$-]+))'
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?" + _NAME + r"\(")
_CALL = re.compile(r"\bcall\s+" + _NAME + r"\(")


def _ints(text: str | None) -> tuple:
  return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


def parse_dots(module_text: str) -> tuple[list[Dot], int]:
  """(every dot_general the module executes, once per execution; how many convolutions it
  executes). Calls into private functions are followed; a loop anywhere is refused, since its
  body runs an unknown number of times."""
  if "stablehlo.while" in module_text:
    raise ValueError("the step contains a loop (model.scan=True or grad_accum_steps > 1?): "
                     "the dots in its body run several times and cannot be counted here; "
                     "use a config without scan / accumulation")
  # Split the module into functions: name -> (its dots, its convolutions, what it calls).
  starts = [(m.start(), m.group(1) or m.group(2)) for m in _FUNC.finditer(module_text)]
  if not starts:
    raise ValueError("no func.func in the module text: expected a lowered StableHLO module")
  bodies = {}
  for (pos, name), nxt in zip(starts, starts[1:] + [(len(module_text), None)]):
    text = module_text[pos:nxt[0]]
    dots = []
    for m in _DOT.finditer(text):
      lb, rb, lc, rc, lshape, ltype, rshape, rtype = m.groups()
      if ltype != rtype:
        raise ValueError(f"dot_general with mixed operand types {ltype} / {rtype}: "
                         f"{m.group(0)[:200]}")
      dots.append(Dot(_ints(lshape.replace("x", ",")), _ints(rshape.replace("x", ",")),
                      _ints(lb), _ints(rb), _ints(lc), _ints(rc), ltype))
    if len(dots) != text.count("stablehlo.dot_general"):
      raise ValueError(f"@{name}: a dot_general this script cannot read (dynamic shapes?)")
    calls = [quoted or bare for quoted, bare in _CALL.findall(text)]
    bodies[name] = (dots, text.count("stablehlo.convolution"), calls)
  entry = "main" if "main" in bodies else starts[0][1]

  def expand(name, depth=0):
    if depth > 100:
      raise ValueError(f"call chain through @{name} too deep (recursion?)")
    dots, convs, calls = bodies[name]
    dots = list(dots)
    for callee in calls:
      more, more_convs = expand(callee, depth + 1)
      dots += more
      convs += more_convs
    return dots, convs
  return expand(entry)


# ------------------------------------------------------------------------------------------------
# Timing one dot in XLA and in torch.


def _best_seconds(fn, repeats: int, min_time: float) -> float:
  """Best over `repeats` of the mean time of one call, each timing at least `min_time` long."""
  fn()
  fn()
  best = float("inf")
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      fn()
      n += 1
      dt = time.perf_counter() - t0
      if dt >= min_time:
        break
    best = min(best, dt / n)
  return best


def time_xla(dot: Dot, repeats: int, min_time: float) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}[dot.dtype]
  device = jax.local_devices()[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, dot.lhs, dtype), device)
  b = jax.device_put(jax.random.normal(k2, dot.rhs, dtype), device)
  dims = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))
  f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, dims))
  return _best_seconds(lambda: f(a, b).block_until_ready(), repeats, min_time)


def time_torch(dot: Dot, repeats: int, min_time: float) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dot.dtype]
  g = torch.Generator().manual_seed(0)
  a = torch.randn(dot.lhs, generator=g).to(dtype)
  b = torch.randn(dot.rhs, generator=g).to(dtype)
  spec = dot.einsum()
  return _best_seconds(lambda: torch.einsum(spec, a, b), repeats, min_time)


# ------------------------------------------------------------------------------------------------


def lowered_step_text(config) -> str:
  """The trainer's step (same mesh, shardings and jit as `bench/train_step.py`), lowered."""
  import train_step  # pylint: disable=g-import-not-at-top
  rt, state, step_fn, _, batch = train_step.build_with_batch(config)
  with rt.context():
    return step_fn.lower(state, batch).as_text()


def _torch_available() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def run(config, *, repeats: int = 5, min_time: float = 0.05, top: int = 6,
        with_torch: bool = True, config_name: str = "") -> dict:
  """Parses the step's dots and times them; returns the JSON record (not printed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  if repeats < 1 or min_time <= 0:
    raise ValueError(f"--repeats={repeats} must be >= 1 and --min_time={min_time} > 0")
  dots, convolutions = parse_dots(lowered_step_text(config))
  if not dots:
    raise ValueError("the lowered step contains no dot_general")
  counts = {}
  for d in dots:
    counts[d] = counts.get(d, 0) + 1
  device = jax.local_devices()[0]
  use_torch = with_torch and device.platform == "cpu" and _torch_available()
  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(synthetic.cpu_threads())

  rows = []
  for d, n in counts.items():
    row = {"dot": d.describe(), "count": n, "xla_s": time_xla(d, repeats, min_time)}
    row["torch_s"] = time_torch(d, repeats, min_time) if use_torch else None
    row["flops"] = d.flops
    rows.append(row)
  flops = sum(r["flops"] * r["count"] for r in rows)
  xla = sum(r["xla_s"] * r["count"] for r in rows)
  tor = sum(r["torch_s"] * r["count"] for r in rows) if use_torch else None
  gflops = lambda f, s: f / s / 1e9 if s else None
  rows.sort(key=lambda r: -r["xla_s"] * r["count"])
  rounded = lambda x: float(f"{x:.4g}") if x is not None else None
  slowest = [{"dot": r["dot"], "count": r["count"],
              "xla_ms_total": rounded(1e3 * r["xla_s"] * r["count"]),
              "xla_gflops": rounded(gflops(r["flops"], r["xla_s"])),
              "torch_gflops": rounded(gflops(r["flops"], r["torch_s"]))} for r in rows[:top]]
  batch = int(config.batch_size)
  return {
      "impl": "matmul_floor", "config": config_name, "batch_size": batch,
      "dots": len(dots), "distinct": len(counts), "convolutions_untimed": convolutions,
      "matmul_flops_per_step": flops,
      "analytic_flops_per_step": tasks.get(config.task).train_flops_per_example(config) * batch,
      "xla_floor_s": xla, "xla_floor_gflops": gflops(flops, xla),
      "torch_floor_s": tor, "torch_floor_gflops": gflops(flops, tor),
      "max_samples_per_s_xla": batch / xla,
      "max_samples_per_s_torch": batch / tor if tor else None,
      "slowest": slowest, "device": device.device_kind, "num_devices": jax.device_count(),
      "threads": synthetic.cpu_threads() if device.platform == "cpu" else None,
      "jax": jax.__version__,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  f["config"] = cli.load_config()
  record = run(f["config"], repeats=f["repeats"], min_time=f["min_time"], top=f["top"],
               with_torch=f["torch"], config_name=synthetic.config_spec(sys.argv))
  synthetic.emit(record)


if __name__ == "__main__":
  _FLAGS = define_flags()
  cli.run(main)
