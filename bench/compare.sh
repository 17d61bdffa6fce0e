#!/usr/bin/env bash
# vlm_jax vs the PyTorch peer (Hugging Face CLIPModel) on the same benchmark config, alternating
# so that both see the same machine conditions; prints every JSON line, then the ratio of the
# medians of samples/s (and of CPU seconds per step) vlm_jax / peer.
#
#   bash bench/compare.sh                                  # 3 rounds, configs/bench_cpu_clip.py
#   ROUNDS=5 STEPS=10 WARMUP=3 bash bench/compare.sh configs/bench_cpu_clip.py
#   PEER_COMPILE=no bash bench/compare.sh                  # eager PyTorch (default: auto)
#
# Extra arguments after the config go to both scripts (e.g. --config.batch_size=32).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-configs/bench_cpu_clip.py}"
shift || true
rounds="${ROUNDS:-3}"
steps="${STEPS:-5}"
warmup="${WARMUP:-2}"
python="${PYTHON:-python}"
peer_compile="${PEER_COMPILE:-auto}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

for ((r = 1; r <= rounds; r++)); do
  "$python" "$here/train_step.py" --config="$config" --steps="$steps" --warmup="$warmup" \
      "$@" 2>/dev/null | tail -n 1 | tee -a "$log"
  "$python" "$here/peer_step.py" --config="$config" --steps="$steps" --warmup="$warmup" \
      --compile="$peer_compile" "$@" 2>/dev/null | tail -n 1 | tee -a "$log"
done

"$python" - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
ours = [r for r in rows if r["impl"] == "vlm_jax"]
peer = [r for r in rows if r["impl"] != "vlm_jax"]
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
print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
PY
