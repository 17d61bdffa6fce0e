#!/usr/bin/env bash
# vlm_jax vs the PyTorch peer (Hugging Face CLIPModel) on the same benchmark config, alternating
# so that both see the same machine conditions; prints every JSON line, then the ratio of the
# medians of samples/s (and of CPU seconds per step) vlm_jax / peer. Then bench/matmul_floor.py
# once: the samples/s the step's matmuls alone allow in each library, and the best ratio an XLA
# step could reach against the peer if everything but its matmuls were free (FLOOR=no skips it).
#
#   bash bench/compare.sh                                  # 3 rounds, configs/bench_cpu_clip.py
#   ROUNDS=5 STEPS=10 WARMUP=3 bash bench/compare.sh configs/bench_cpu_clip.py
#   PEER_COMPILE=no bash bench/compare.sh                  # eager PyTorch (default: auto)
#   FLOOR=no bash bench/compare.sh                         # skip the matmul floor
#   FLOOR_REPEATS=1 bash bench/compare.sh                  # quicker floor (default 5 timings)
#
# Extra arguments after the config go to every script (e.g. --config.batch_size=32).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-configs/bench_cpu_clip.py}"
shift || true
rounds="${ROUNDS:-3}"
steps="${STEPS:-5}"
warmup="${WARMUP:-2}"
python="${PYTHON:-python}"
peer_compile="${PEER_COMPILE:-auto}"
floor="${FLOOR:-yes}"
floor_repeats="${FLOOR_REPEATS:-5}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

for ((r = 1; r <= rounds; r++)); do
  "$python" "$here/train_step.py" --config="$config" --steps="$steps" --warmup="$warmup" \
      "$@" 2>/dev/null | tail -n 1 | tee -a "$log"
  "$python" "$here/peer_step.py" --config="$config" --steps="$steps" --warmup="$warmup" \
      --compile="$peer_compile" "$@" 2>/dev/null | tail -n 1 | tee -a "$log"
done
if [[ "$floor" != no ]]; then
  "$python" "$here/matmul_floor.py" --config="$config" --repeats="$floor_repeats" "$@" \
      2>/dev/null | tail -n 1 | tee -a "$log"
fi

"$python" - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
ours = [r for r in rows if r["impl"] == "vlm_jax"]
floor = [r for r in rows if r["impl"] == "matmul_floor"]
peer = [r for r in rows if r["impl"] not in ("vlm_jax", "matmul_floor")]
if not ours or not peer:
  sys.exit("compare.sh: a benchmark produced no result line (run it alone to see its error)")
med = lambda rs, k: statistics.median(r[k] for r in rs)
summary = {
    "rounds": min(len(ours), len(peer)),
    "vlm_jax_samples_per_s": med(ours, "samples_per_s"),
    "peer_samples_per_s": med(peer, "samples_per_s"),
    "ratio_samples_per_s": med(ours, "samples_per_s") / med(peer, "samples_per_s"),
    "ratio_cpu_work": med(peer, "cpu_s_per_step") / med(ours, "cpu_s_per_step"),
    "peer_torch_compile": peer[-1].get("torch_compile"),
}
if floor:
  summary["xla_matmul_floor_samples_per_s"] = floor[-1]["max_samples_per_s_xla"]
  summary["torch_matmul_floor_samples_per_s"] = floor[-1]["max_samples_per_s_torch"]
  # The most any XLA step could reach against this peer: its matmuls at stand-alone speed and
  # nothing else.
  summary["ratio_ceiling_at_xla_matmul_floor"] = (floor[-1]["max_samples_per_s_xla"]
                                                  / summary["peer_samples_per_s"])
print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
PY
