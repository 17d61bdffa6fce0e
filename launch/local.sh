#!/usr/bin/env bash
# Train on this machine: one process on its CPU, GPU(s) or TPU.
#
#   launch/local.sh --config configs/shapes_coca.py --workdir runs/coca
#   launch/local.sh --config configs/shapes_coca.py --workdir runs/coca --cpu-devices 8
#
# --cpu-devices N splits the CPU into N XLA devices, so data / FSDP / tensor sharding can be tried
# on a laptop exactly as it runs on N accelerators (slowly). `--dry-run` prints the command.
set -euo pipefail

readonly SCRIPT_NAME="${0##*/}"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/${SCRIPT_NAME} --config PATH[:ARG] --workdir DIR [flags] [-- TRAINER_FLAGS...]

  --config PATH[:ARG]   experiment config, e.g. configs/shapes_coca.py          [required]
  --workdir DIR         checkpoint / metrics directory (local path or gs://)   [required]
  --cpu-devices N       run on the CPU as N simulated devices (sets JAX_PLATFORMS=cpu and
                        XLA_FLAGS=--xla_force_host_platform_device_count=N)
  --platform NAME       cpu | cuda | rocm | tpu: the JAX backend (default: JAX picks the
                        accelerator if there is one)
  --python PY           interpreter (default: the active virtualenv's python, else the repo's
                        .venv/bin/python, else python3)
  --env KEY=VALUE       extra environment variable for the trainer (repeatable)
  -- TRAINER_FLAGS...   passed on to vlm_jax.train, e.g. -- --config.total_steps=100
  --dry-run             print the command instead of running it
  -h, --help            this help
EOF
}

cpu_devices=""
platform=""
python=""

readonly VALUE_FLAGS=(--config --workdir --cpu-devices --platform --python --env)

default_python() {
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    printf 'python'
  elif [[ -x "${ROOT}/.venv/bin/python" ]]; then
    printf '%s' "${ROOT}/.venv/bin/python"
  else
    printf 'python3'
  fi
}

main() {
  parse_flags "$@"
  require --config "${config}" "the experiment config, e.g. configs/shapes_coca.py"
  require --workdir "${workdir}" "where checkpoints and metrics go"
  case "${platform}" in
    "" | cpu | cuda | rocm | tpu) ;;
    *) die "--platform must be one of cpu, cuda, rocm, tpu; got '${platform}'" ;;
  esac
  local envs=()
  if [[ -n "${cpu_devices}" ]]; then
    [[ "${cpu_devices}" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices must be a positive integer, got '${cpu_devices}'"
    [[ -z "${platform}" || "${platform}" == cpu ]] ||
      die "--cpu-devices simulates CPU devices and cannot be combined with --platform ${platform}"
    platform=cpu
    # Keep any XLA flags the user already set.
    envs+=("XLA_FLAGS=${XLA_FLAGS:+${XLA_FLAGS} }--xla_force_host_platform_device_count=${cpu_devices}")
  fi
  [[ -z "${platform}" ]] || envs+=("JAX_PLATFORMS=${platform}")
  envs+=("${env_vars[@]}")
  [[ -n "${python}" ]] || python="$(default_python)"

  local cmd=() train=()
  ((${#envs[@]} == 0)) || cmd=(env "${envs[@]}")
  trainer_argv train "${python}"
  run_exec "${cmd[@]}" "${train[@]}"
}

main "$@"
