#!/usr/bin/env bash
# The accelerator check: every benchmark that needs a GPU / TPU, in one short run (<= 8 minutes
# on one H100 / H200, compile included), each result one JSON line in OUT/results.jsonl, then a
# table of them (OUT/summary.md, also printed).
#
#   bash bench/gpu_check.sh [--out DIR]          # on the accelerator (installs nothing)
#   bash bench/gpu_check.sh --dry-run [--out DIR]  # the same stages at toy sizes, on any CPU
#   bash bench/gpu_check.sh --only train_step/scan_remat,decode   # a rerun of some stages
#
# Stages (each under its own time limit; one that fails or times out is recorded as such and the
# next one runs):
#   train_step/base        ViT-B/16 CLIP, bf16, the trainer's step (samples/s, TFLOP/s, MFU,
#                          peak memory), no scan, no remat
#   train_step/scan_remat  the same as the recipe runs it: model.scan + model.remat, keeping
#                          the matmuls without a batch dimension
#   attention_parity       einsum vs XLA's and cuDNN's fused attention on the models' masks:
#                          largest differences of outputs and gradients, bf16 against fp32
#   train_step/flash_attention  the recipe's step with model.attention=cudnn (cuDNN's flash
#                          kernel through jax.nn.dot_product_attention)
#   attention_ab           the recipe's step, einsum against cuDNN attention, alternating in
#                          one process (bench/option_ab.py)
#   decode                 CoCa ViT-B/32 captions, greedy and beam 3 at 8 / 32 / 64 tokens
#   matmul_floor           every matmul of the base step alone: how close the step is to the GEMMs
#   nonfinite_guard        the recipe's step with the NaN guard as lax.cond (default) against
#                          jnp.where, alternating in one process (bench/option_ab.py)
#   train_step/prefix_lm   the PaliGemma-shaped prefix-LM step (configs/bench_prefixlm.py: ViT-B/16
#                          + a 246 M Llama-style LM over 196 image + 64 text positions)
#   prefix_lm_attention_ab that step with einsum against cuDNN attention, alternating
# Environment: PYTHON (default: .venv/bin/python if present, else python3), BATCH (global batch of
# the train step, default 128: without remat the step holds about 0.5 GiB of activations an
# example, by bench/memory.py), STAGE_TIMEOUT (seconds per stage, default 150), DEADLINE (seconds
# for the whole script, default 480: a stage gets at most what is left, and one that would get
# under 20 s is recorded as skipped), JAX_COMPILATION_CACHE_DIR (default OUT/jax_cache, not in a
# dry run: stages that compile the same step reuse it). The stages import
# jax, flax, optax, orbax-checkpoint, chex and ml-collections (no TensorFlow, no data).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "${here}")"
out="${root}/runs/gpu_check"
dry_run=0
only=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --only) only="$2"; shift ;;
    --only=*) only="${1#--only=}" ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
python="${PYTHON:-}"
if [[ -z "${python}" ]]; then
  if [[ -x "${root}/.venv/bin/python" ]]; then python="${root}/.venv/bin/python"
  elif command -v python3 > /dev/null; then python=python3
  else python=python; fi
fi
stage_timeout="${STAGE_TIMEOUT:-150}"
deadline="${DEADLINE:-480}"
script_start=$(date +%s)
mkdir -p "${out}"
results="${out}/results.jsonl"
: > "${results}"
cd "${root}" || exit 1
if ((!dry_run)); then
  "${python}" -c 'import jax, sys; sys.exit(3 if jax.default_backend() == "cpu" else 0)'
  case $? in
    0) ;;
    3) echo "gpu_check.sh: JAX finds no GPU or TPU here (backend: cpu); run it on the" \
            "accelerator, or pass --dry-run for the toy-size stages on the CPU" >&2
       exit 1 ;;
    *) echo "gpu_check.sh: ${python} cannot import jax (set PYTHON=...)" >&2; exit 1 ;;
  esac
fi

declare -A dry_run_covered=()
if ((dry_run)); then
  # (no compilation cache here: a multi-device CPU step loaded from it can deadlock, README)
  clip=(--config=configs/bench_cpu_clip.py:tiny --config.batch_size=4)
  prefixlm=(--config=configs/bench_prefixlm.py:tiny --config.batch_size=4)
  steps=(--steps=2 --warmup=1 --peak_tflops=0.5)   # a fixed peak: no matmul to time
  coca=(--config=configs/shapes_coca.py:tiny --batch=2 --lengths=8 "--beams=1,2" --repeats=1
        --config.model.scan=True --config.model.remat=True   # as coca_vit_b32 runs
        --config.model.remat_policy=dots_no_batch)
  floor=(--repeats=1 --min_time=0.001 --torch=false)
  ab=(--rounds=1 --steps_per_round=1)
  flash=xla          # cuDNN's kernel needs a GPU; the dry run checks the stage with XLA's
  # Stages whose every part another dry-run stage already runs (the same script and flags, the
  # same config): a dry run checks the script, and these would only compile the same thing again.
  dry_run_covered[train_step/flash_attention]="the step of attention_ab's ${flash} variant"
  dry_run_covered[prefix_lm_attention_ab]="option_ab.py runs in attention_ab, the prefix-LM step in train_step/prefix_lm"
  parity=(--impls=xla --batch=2 --heads=2)
else
  clip=(--config=configs/bench_vit_b16_clip.py "--config.batch_size=${BATCH:-128}")
  prefixlm=(--config=configs/bench_prefixlm.py "--config.batch_size=${BATCH:-128}")
  steps=(--steps=10 --warmup=3)
  coca=(--config=configs/coca_vit_b32.py --batch=32 "--lengths=8,32,64" "--beams=1,3" --repeats=3)
  floor=(--repeats=3 --torch=false)
  ab=(--rounds=3 --steps_per_round=2)
  flash=cudnn
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${out}/jax_cache}"
  parity=("--impls=xla,cudnn")
fi

# run_stage NAME COMMAND...: the command's JSON lines go to results.jsonl with "stage": NAME; a
# failure or a timeout becomes one line saying so (with the last lines of its error output).
run_stage() {
  local name="$1"; shift
  [[ -n "${only}" && ",${only}," != *",${name},"* ]] && return
  if ((dry_run)) && [[ -n "${dry_run_covered[${name}]:-}" ]]; then
    echo "{\"stage\": \"${name}\", \"skipped\": \"dry run: ${dry_run_covered[${name}]}\"}" \
        >> "${results}"
    return
  fi
  local log="${out}/${name//\//_}.log" start rc limit
  start=$(date +%s)
  limit=$(( deadline - (start - script_start) ))
  (( limit > stage_timeout )) && limit="${stage_timeout}"
  if (( limit < 20 )); then
    echo "{\"stage\": \"${name}\", \"failed\": \"skipped: the script's DEADLINE of ${deadline} s was spent\"}" \
        >> "${results}"
    return
  fi
  echo "[gpu_check] ${name} (at most ${limit} s) ..." >&2
  timeout "${limit}" "$@" > "${log}.out" 2> "${log}"
  rc=$?
  "${python}" - "${name}" "${rc}" "$(( $(date +%s) - start ))" "${log}.out" "${log}" \
      >> "${results}" <<'PY'
import json, sys
name, rc, seconds, out_path, err_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
lines = [l for l in open(out_path) if l.strip().startswith("{")]
if rc == 0 and lines:
  for line in lines:
    print(json.dumps({"stage": name, "stage_s": seconds, **json.loads(line)}))
else:
  tail = open(err_path).read().strip().splitlines()[-5:]
  why = "timed out" if rc in (124, 137) else f"exit status {rc}"
  print(json.dumps({"stage": name, "stage_s": seconds, "failed": why, "error_tail": tail}))
PY
}

"${python}" - >> "${results}" <<'PY'
import json, platform, subprocess
import jax
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"], capture_output=True, text=True) \
    if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0 else None
print(json.dumps({"stage": "env", "jax": jax.__version__, "backend": jax.default_backend(),
                  "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                  "nvidia_smi": gpu.stdout.strip() if gpu else None,
                  "python": platform.python_version()}))
PY
run_stage train_step/base "${python}" bench/train_step.py "${clip[@]}" "${steps[@]}" \
    --config.model.scan=False --config.model.remat=False --config.model.attention=einsum
run_stage train_step/scan_remat "${python}" bench/train_step.py "${clip[@]}" "${steps[@]}" \
    --config.model.scan=True --config.model.remat=True --config.model.remat_policy=dots_no_batch \
    --config.model.attention=einsum
run_stage attention_parity "${python}" bench/attention_parity.py "${parity[@]}"
run_stage train_step/flash_attention "${python}" bench/train_step.py "${clip[@]}" "${steps[@]}" \
    --config.model.scan=True --config.model.remat=True --config.model.remat_policy=dots_no_batch \
    "--config.model.attention=${flash}"
run_stage attention_ab "${python}" bench/option_ab.py "${clip[@]}" "${ab[@]}" \
    --config.model.scan=True --config.model.remat=True --config.model.remat_policy=dots_no_batch \
    --variant=einsum:config.model.attention=einsum "--variant=${flash}:config.model.attention=${flash}"
run_stage decode "${python}" bench/decode.py "${coca[@]}"
# The floor times each matmul of a straight-line (unscanned, einsum-attention) step alone.
run_stage matmul_floor "${python}" bench/matmul_floor.py "${clip[@]}" "${floor[@]}" \
    --config.model.scan=False --config.model.remat=False --config.model.attention=einsum
# The non-finite guard: the update inside lax.cond (default; on a GPU its predicate is read on
# the host) against jnp.where over an always-computed update (copies of the moments).
run_stage nonfinite_guard "${python}" bench/option_ab.py "${clip[@]}" "${ab[@]}" \
    --config.model.scan=True --config.model.remat=True --config.model.remat_policy=dots_no_batch \
    --config.model.attention=einsum \
    --variant=cond --variant=select:config.nonfinite_guard=select
run_stage train_step/prefix_lm "${python}" bench/train_step.py "${prefixlm[@]}" "${steps[@]}"
run_stage prefix_lm_attention_ab "${python}" bench/option_ab.py "${prefixlm[@]}" "${ab[@]}" \
    --variant=einsum:config.model.attention=einsum "--variant=${flash}:config.model.attention=${flash}"

"${python}" "${here}/gpu_summary.py" "${results}" | tee "${out}/summary.md"
