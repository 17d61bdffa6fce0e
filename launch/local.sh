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
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

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

die() {
  printf '%s: error: %s\n' "${SCRIPT_NAME}" "$*" >&2
  exit 2
}

# One word, quoted only when the shell needs it, so a printed command can be pasted back.
quote() {
  local s="$1"
  if [[ "${s}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "${word}")"
  done
  printf '%s' "${out}"
}

config=""
workdir=""
cpu_devices=""
platform=""
python=""
env_vars=()
trainer_args=()
dry_run=0

readonly VALUE_FLAGS=(--config --workdir --cpu-devices --platform --python --env)

is_value_flag() {
  local flag
  for flag in "${VALUE_FLAGS[@]}"; do
    [[ "$1" == "${flag}" ]] && return 0
  done
  return 1
}

set_flag() {
  local flag="$1" value="$2" var
  if [[ "${flag}" == "--env" ]]; then
    [[ "${value}" == [A-Za-z_]*=* ]] || die "--env expects KEY=VALUE, got '${value}'"
    env_vars+=("${value}")
    return
  fi
  var="${flag#--}"
  var="${var//-/_}"
  printf -v "${var}" '%s' "${value}"
}

parse_flags() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) dry_run=1 ;;
      --) shift; trainer_args=("$@"); return ;;
      --*=*)
        is_value_flag "${1%%=*}" || die "unknown flag ${1%%=*} (see --help)"
        set_flag "${1%%=*}" "${1#*=}"
        ;;
      --*)
        is_value_flag "$1" || die "unknown flag $1 (see --help)"
        (($# >= 2)) || die "flag $1 needs a value"
        set_flag "$1" "$2"
        shift
        ;;
      *) die "unexpected argument '$1' (trainer flags go after --)" ;;
    esac
    shift
  done
}

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
  [[ -n "${config}" ]] || die "missing required flag --config (the experiment config, e.g. configs/shapes_coca.py)"
  [[ -n "${workdir}" ]] || die "missing required flag --workdir (where checkpoints and metrics go)"
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

  local cmd=()
  ((${#envs[@]} == 0)) || cmd=(env "${envs[@]}")
  cmd+=("${python}" -m vlm_jax.train --config "${config}" --workdir "${workdir}" "${trainer_args[@]}")
  if ((dry_run)); then
    printf '%s\n' "$(join_quoted "${cmd[@]}")"
    return 0
  fi
  printf '[%s] + %s\n' "${SCRIPT_NAME}" "$(join_quoted "${cmd[@]}")" >&2
  exec "${cmd[@]}"
}

main "$@"
