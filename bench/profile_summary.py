r"""Where the step's time goes: a summary of a `jax.profiler` trace, printed as one JSON line.

  python bench/train_step.py --config configs/bench_cpu_clip.py --steps 3 --profile_dir /tmp/prof
  python bench/profile_summary.py /tmp/prof [--top 15]

Reads the newest `*.xplane.pb` under the directory and, over the XLA operation events (fusions,
library matmuls, copies; the executor's own bookkeeping events are left out):

* `by_kind`: time per kind of operation (the HLO name without its numeric suffix, e.g.
  `ynn_fusion` for library matmuls on CPU, `copy_bitcast_fusion`, `transpose_copy_fusion`), in ms
  summed over threads and as a fraction of that total;
* `top_ops`: the most expensive single operations by HLO name (look them up in an XLA dump,
  XLA_FLAGS=--xla_dump_to=DIR, for shapes and the model op they come from);
* `busy_threads`: on CPU, the fraction of the traced wall time during which 0, 1, 2, ... executor
  threads were running an operation. With N cores, time at fewer than N is capacity the step left
  unused (a dependency chain, or a matmul that got fewer threads than the machine has).

Times are summed over every traced step; divide by the number of steps for per-step figures.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys

# Executor bookkeeping that wraps or waits on the real work; counting it would double-count.
_BOOKKEEPING = re.compile(r"^(ThunkExecutor|ThreadpoolListener|SlinkyThreadPool|end: )")
# Trace lines that carry XLA operations: the CPU executor's threads, and on GPU the per-device
# "XLA Ops" line (its "Stream" lines hold the same work as kernels, so they are not counted).
_OP_LINES = re.compile(r"XLAEigen|XLAPjRtCpuClient|XLA Ops")


def find_trace(profile_dir: str) -> str:
  paths = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"{profile_dir}: no *.xplane.pb trace found (write one with "
                            "bench/train_step.py --profile_dir DIR)")
  return max(paths, key=os.path.getmtime)


def op_events(trace_path: str) -> list[tuple[int, int, str, str]]:
  """(start_ns, end_ns, thread, op name) for every XLA operation event in the trace."""
  import jax.profiler  # pylint: disable=g-import-not-at-top
  data = jax.profiler.ProfileData.from_file(trace_path)
  events = []
  for plane in data.planes:
    for line in plane.lines:
      if not _OP_LINES.search(line.name):
        continue
      for ev in line.events:
        if _BOOKKEEPING.match(ev.name) or ev.duration_ns <= 0:
          continue
        events.append((int(ev.start_ns), int(ev.end_ns), f"{plane.name}/{line.name}", ev.name))
  return events


def kind_of(op_name: str) -> str:
  """`copy_bitcast_fusion.85` -> `copy_bitcast_fusion`."""
  return re.sub(r"\.\d+$", "", op_name)


def busy_thread_fractions(events) -> dict[int, float]:
  """Fraction of the wall time (first start to last end) with k operations running at once."""
  if not events:
    return {}
  edges = sorted([(s, 1) for s, _, _, _ in events] + [(e, -1) for _, e, _, _ in events])
  time_at = collections.Counter()
  running, last = 0, edges[0][0]
  for t, delta in edges:
    time_at[running] += t - last
    running, last = running + delta, t
  span = edges[-1][0] - edges[0][0]
  return {k: v / span for k, v in sorted(time_at.items()) if v > 0}


def summarize(events, top: int = 15) -> dict:
  per_op = collections.Counter()
  for s, e, _, name in events:
    per_op[name] += e - s
  total = sum(per_op.values())
  if not total:
    raise ValueError("the trace holds no XLA operation events (was a step run inside it?)")
  by_kind = collections.Counter()
  for name, ns in per_op.items():
    by_kind[kind_of(name)] += ns
  return {
      "op_time_ms": round(total / 1e6, 3),
      "threads": len({thread for _, _, thread, _ in events}),
      "by_kind": [{"kind": k, "ms": round(ns / 1e6, 3), "fraction": round(ns / total, 4)}
                  for k, ns in by_kind.most_common(top)],
      "top_ops": [{"op": k, "ms": round(ns / 1e6, 3)} for k, ns in per_op.most_common(top)],
      "busy_threads": {str(k): round(v, 4) for k, v in busy_thread_fractions(events).items()},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("profile_dir")
  parser.add_argument("--top", type=int, default=15, help="rows in by_kind and top_ops")
  args = parser.parse_args(argv)
  try:
    summary = summarize(op_events(find_trace(args.profile_dir)), args.top)
  except (FileNotFoundError, ValueError) as e:
    print(f"profile_summary: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
