#!/usr/bin/env bash
# Multi-node GPU training with SLURM: an sbatch script and its own submitter.
#
#   launch/gpu_slurm.sh --nodes 4 --gpus-per-node 8 --config C --workdir W   # submits with sbatch
#   sbatch launch/gpu_slurm.sh --config C --workdir W                          # the #SBATCH defaults
#
# Outside a SLURM allocation the script submits itself with sbatch (the flags below override the
# #SBATCH defaults). Inside an allocation (the batch job, or an salloc shell) it runs
# `srun python -m vlm_jax.train ...`: one process per GPU by default, or one per node with
# --per-node. jax.distributed.initialize() reads the SLURM environment (SLURM_JOB_ID, SLURM_NTASKS,
# SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST) to find the coordinator (first node) and each
# process's rank; with one process per GPU it also makes each process use GPU number
# SLURM_LOCALID, so GPUs must not be bound per task (use --gpus-per-node, not --gpus-per-task).
#
# Submit from the repository root: sbatch runs the job in the submit directory.
#SBATCH --job-name=vlm_jax
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

readonly SCRIPT_NAME="gpu_slurm.sh"
# sbatch runs a copy of this script from its spool directory, where common.sh is not: look for it
# next to the script, then in the launch/ directory that submit() exports, then in the submit
# directory's launch/.
for launch_dir in "$(dirname "${BASH_SOURCE[0]}")" "${VLM_JAX_LAUNCH_DIR:-}" \
  "${SLURM_SUBMIT_DIR:+${SLURM_SUBMIT_DIR}/launch}"; do
  [[ -n "${launch_dir}" && -f "${launch_dir}/common.sh" ]] && break
done
if [[ ! -f "${launch_dir}/common.sh" ]]; then
  printf '%s: error: %s\n' "${SCRIPT_NAME}" "launch/common.sh not found; submit from the repository root" >&2
  exit 2
fi
# shellcheck source=common.sh
source "${launch_dir}/common.sh"

usage() {
  cat <<EOF
Usage: launch/${SCRIPT_NAME} --config PATH[:ARG] --workdir DIR [flags] [-- TRAINER_FLAGS...]

Required:
  --config PATH[:ARG]     experiment config, e.g. configs/shapes_coca.py
  --workdir DIR           checkpoint / metrics directory on storage every node shares
                          (a shared filesystem path or gs://...)

Allocation (used when submitting; inside an allocation they are already fixed):
  --nodes N               number of nodes (default: 2)
  --gpus-per-node G       GPUs per node (default: 8)
  --per-node              one process per node driving all its GPUs
                          (default: one process per GPU)
  --partition NAME        sbatch --partition
  --account NAME          sbatch --account
  --time D-HH:MM:SS       sbatch --time (default: 24:00:00)
  --job-name NAME         sbatch --job-name (default: vlm_jax)
  --sbatch-arg ARG        any other sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)

Run:
  --python PY             Python with vlm_jax's requirements and jax[cuda12] installed on every
                          node (default: python; sbatch passes on the submitting shell's
                          environment, so an activated venv works)
  --env KEY=VALUE         environment variable for the trainer processes (repeatable)
  -- TRAINER_FLAGS...     passed on to vlm_jax.train, e.g. -- --config.total_steps=1000
  --dry-run               print the sbatch (or, inside an allocation, srun) command and exit
  -h, --help              this help

Environment worth knowing (set with --env, or export before submitting):
  NCCL_DEBUG=WARN                   NCCL logging (INFO when debugging hangs)
  NCCL_SOCKET_IFNAME=eth0           network interface NCCL uses for bootstrap / sockets
  NCCL_IB_HCA=mlx5                  InfiniBand adapters to use (cluster specific)
  XLA_PYTHON_CLIENT_MEM_FRACTION=.9 share of GPU memory JAX preallocates (default .75)
  XLA_FLAGS=...                     XLA compiler flags; an unknown flag aborts start-up, so only
                                    set flags your jaxlib version knows
  JAX_COORDINATOR_PORT=PORT         coordinator port (default: derived from SLURM_JOB_ID)
EOF
}

# ---------------------------------------------------------------------------------------------
# Flags.

nodes="2"
gpus_per_node="8"
per_node=0
partition=""
account=""
time="24:00:00"
job_name="vlm_jax"
python="python"
sbatch_args=()

readonly VALUE_FLAGS=(--config --workdir --nodes --gpus-per-node --partition --account --time
  --job-name --python --env --sbatch-arg)
LIST_FLAGS=(--sbatch-arg)
SWITCH_FLAGS=(--per-node)

validate_flags() {
  require --config "${config}" "the experiment config, e.g. configs/shapes_coca.py"
  require --workdir "${workdir}" "a directory every node can reach"
  if ! is_uint "${nodes}" || ((nodes == 0)); then
    die "--nodes must be a positive integer, got '${nodes}'"
  fi
  if ! is_uint "${gpus_per_node}" || ((gpus_per_node == 0)); then
    die "--gpus-per-node must be a positive integer, got '${gpus_per_node}'"
  fi
}

# Outside an allocation: submit this very script with the allocation as sbatch flags. The job
# runs in the current directory (sbatch's default), so relative --config / --workdir paths mean
# what they mean here.
submit() {
  local tasks_per_node cmd=() inner=()
  tasks_per_node="${gpus_per_node}"
  ((per_node)) && tasks_per_node=1
  cmd=(sbatch "--job-name=${job_name}" "--nodes=${nodes}" "--gpus-per-node=${gpus_per_node}"
    "--ntasks-per-node=${tasks_per_node}" "--time=${time}")
  [[ -z "${partition}" ]] || cmd+=("--partition=${partition}")
  [[ -z "${account}" ]] || cmd+=("--account=${account}")
  cmd+=("${sbatch_args[@]}")
  inner=(--config "${config}" --workdir "${workdir}" --python "${python}")
  local kv
  for kv in "${env_vars[@]}"; do inner+=(--env "${kv}"); done
  ((${#trainer_args[@]} == 0)) || inner+=(-- "${trainer_args[@]}")
  command -v sbatch >/dev/null 2>&1 || ((dry_run)) ||
    die "sbatch not found: run this on a SLURM login node"
  # For the job's copy of this script to find common.sh (see the top).
  export VLM_JAX_LAUNCH_DIR="${ROOT}/launch"
  run_exec "${cmd[@]}" "${ROOT}/launch/${SCRIPT_NAME}" "${inner[@]}"
}

# Inside an allocation: one srun step over all its tasks.
launch_step() {
  local tasks_per_node gpus envs=() train=()
  tasks_per_node="${SLURM_NTASKS_PER_NODE:-}"
  tasks_per_node="${tasks_per_node%%(*}"  # "8(x2)" -> "8"
  if [[ -z "${tasks_per_node}" && -n "${SLURM_NTASKS:-}" && -n "${SLURM_JOB_NUM_NODES:-}" ]]; then
    tasks_per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
  fi
  gpus="${SLURM_GPUS_ON_NODE:-}"
  # JAX gives process k of a node GPU number SLURM_LOCALID by default; a single process per node
  # must be told to use them all.
  if [[ "${tasks_per_node}" == 1 ]] && is_uint "${gpus}" && ((gpus > 1)); then
    envs+=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
  fi
  envs+=("${env_vars[@]}")
  trainer_argv train "${python}"
  command -v srun >/dev/null 2>&1 || ((dry_run)) || die "srun not found inside the allocation"
  run_exec srun --kill-on-bad-exit=1 --label env PYTHONUNBUFFERED=1 "${envs[@]}" "${train[@]}"
}

main() {
  parse_flags "$@"
  validate_flags
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    launch_step
  else
    submit
  fi
}

main "$@"
