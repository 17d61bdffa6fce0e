# Shared pieces of the launch scripts (tpu_pod.sh, gpu_slurm.sh, local.sh); sourced, not run.
#
# The sourcing script sets SCRIPT_NAME (the name in messages) before sourcing this file, defines
# usage(), and before calling parse_flags sets VALUE_FLAGS (the flags that take a value) and, if it
# has them, LIST_FLAGS (repeatable value flags: `--sbatch-arg X` appends X to sbatch_args),
# SWITCH_FLAGS (flags without a value: `--per-node` sets per_node=1) and SUBCOMMAND_FLAGS=1 (the
# first positional argument is the subcommand).
#
# SCRIPT_NAME and VALUE_FLAGS come from the sourcing script:
# shellcheck shell=bash disable=SC2154

# The repository root (this file lives in launch/); used by the sourcing scripts.
# shellcheck disable=SC2034
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

# Flags every script has; the scripts add their own.
config=""
workdir=""
env_vars=()
trainer_args=()
dry_run=0
subcommand=""
LIST_FLAGS=()
SWITCH_FLAGS=()
SUBCOMMAND_FLAGS=0

die() {
  printf '%s: error: %s\n' "${SCRIPT_NAME}" "$*" >&2
  exit 2
}

log() {
  printf '[%s] %s\n' "${SCRIPT_NAME}" "$*" >&2
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

# Replaces this shell with the command, or prints it and exits under --dry-run.
run_exec() {
  if ((dry_run)); then
    printf '%s\n' "$(join_quoted "$@")"
    exit 0
  fi
  log "+ $(join_quoted "$@")"
  exec "$@"
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

require() {
  local flag="$1" value="$2" why="$3"
  [[ -n "${value}" ]] || die "missing required flag ${flag} (${why})"
}

# Fills the array named by $1 with the trainer command line run with the Python $2.
trainer_argv() {
  local -n _argv="$1"
  _argv=("$2" -m vlm_jax.train --config "${config}" --workdir "${workdir}" "${trainer_args[@]}")
}

# ---------------------------------------------------------------------------------------------
# Flag parsing: `--flag VALUE` and `--flag=VALUE` set the variable named after the flag
# (--gpus-per-node -> gpus_per_node); --env KEY=VALUE and the LIST_FLAGS are repeatable.

in_list() {
  local word="$1" item
  shift
  for item in "$@"; do
    [[ "${word}" == "${item}" ]] && return 0
  done
  return 1
}

is_value_flag() { in_list "$1" "${VALUE_FLAGS[@]}"; }

flag_var() {
  local var="${1#--}"
  printf '%s' "${var//-/_}"
}

set_flag() {
  local flag="$1" value="$2"
  case "${flag}" in
    --env)
      [[ "${value}" == [A-Za-z_]*=* ]] || die "--env expects KEY=VALUE, got '${value}'"
      env_vars+=("${value}")
      ;;
    *)
      if in_list "${flag}" "${LIST_FLAGS[@]}"; then
        local list
        list="$(flag_var "${flag}")s"
        local -n _list="${list}"
        _list+=("${value}")
      else
        printf -v "$(flag_var "${flag}")" '%s' "${value}"
      fi
      ;;
  esac
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
        if in_list "$1" "${SWITCH_FLAGS[@]}"; then
          printf -v "$(flag_var "$1")" '%s' 1
        else
          is_value_flag "$1" || die "unknown flag $1 (see --help)"
          (($# >= 2)) || die "flag $1 needs a value"
          set_flag "$1" "$2"
          shift
        fi
        ;;
      *)
        ((SUBCOMMAND_FLAGS)) && [[ -z "${subcommand}" ]] ||
          die "unexpected argument '$1' (trainer flags go after --)"
        subcommand="$1"
        ;;
    esac
    shift
  done
}
