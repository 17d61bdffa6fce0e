#!/usr/bin/env bash
# Launch vlm_jax training on a Cloud TPU VM slice (single host or pod) with gcloud.
#
# Every worker of a pod runs the same `python -m vlm_jax.train` process (`--worker=all`); the
# trainer calls jax.distributed.initialize(), which finds the other workers on its own on Cloud
# TPU. Checkpoints go to a gs:// workdir that all workers share, so a slice that is preempted
# can be recreated and the job relaunched with the same command: the trainer resumes from the
# latest checkpoint in the workdir.
#
# Run `launch/tpu_pod.sh --help` for the subcommands and flags, and `--dry-run` to see the exact
# commands (one per line) without running anything.
#
# Remote commands are built in single quotes on purpose: their $(...) expand on the workers.
# shellcheck disable=SC2016
set -euo pipefail

readonly SCRIPT_NAME="${0##*/}"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: ${SCRIPT_NAME} SUBCOMMAND --name NAME --zone ZONE [flags] [-- TRAINER_FLAGS...]

Subcommands:
  create    create the TPU VM slice (reuses it if it is already up; recreates it if preempted)
  setup     copy the code to every worker and install the pinned requirements + jax[tpu]
  train     start \`python -m vlm_jax.train\` on every worker, detached, logging to
            <remote-dir>/logs/train.log on each worker
  up        create + setup + train
  logs      stream the training log of one worker (default worker 0)
  status    print the slice state and the training job state on worker 0
  stop      stop the training processes on every worker (the slice keeps running)
  delete    delete the slice (and its queued resource)
  resume    bring a job back after preemption: recreate the slice if it is gone, set it up,
            and start training again (the trainer resumes from the workdir's last checkpoint)

Slice flags:
  --name NAME               TPU VM name (also the queued-resource id)           [required]
  --zone ZONE               e.g. us-central2-b                                  [required]
  --project PROJECT         default: the gcloud config's project
  --accelerator-type TYPE   e.g. v4-32, v5litepod-16, v5p-64, v6e-16    [required by create]
  --runtime-version VER     TPU software version; default chosen from the accelerator type
                            (v2/v3/v4: tpu-ubuntu2204-base, v5litepod: v2-alpha-tpuv5-lite,
                            v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                    use Spot capacity (cheaper, can be preempted at any time)
  --queued                  request the slice through a queued resource
                            (\`gcloud compute tpus queued-resources create\`), which waits
                            in the queue until capacity is available

Code flags:
  --repo-url URL            git clone URL on the workers instead of copying a tarball of
                            this checkout (\`git archive\` of --ref; uncommitted changes are
                            not copied)
  --ref REF                 commit, branch or tag to run (default: HEAD)
  --remote-dir DIR          code directory on the workers, relative to the home directory
                            or absolute (default: vlm_jax); the venv is DIR/.venv
  --python-bin BIN          Python used to create the venv on the workers (default:
                            python3.12; installed with apt when missing)

Training flags:
  --config PATH[:ARG]       experiment config, relative to the repo root   [required by train]
  --workdir gs://BUCKET/DIR shared checkpoint / metrics directory           [required by train]
  --env KEY=VALUE           environment variable for the trainer (repeatable)
  -- TRAINER_FLAGS...       passed on to vlm_jax.train, e.g. -- --config.total_steps=1000

Other flags:
  --watch                   with train / up / resume: keep polling; relaunch after a
                            preemption or a crash, stop when training exits with status 0
  --poll-interval SECONDS   polling period for --watch and queued resources (default: 60)
  --max-restarts N          give up after N relaunches under --watch (default: 20)
  --worker N|all            worker whose log \`logs\` streams (default: 0)
  --lines N                 lines of history \`logs\` prints before following (default: 100)
  --dry-run                 print the commands (one per line) instead of running them;
                            state queries are printed too and answered as if the slice did
                            not exist yet (so create / resume show the full bring-up)
  -h, --help                this help

Example (SigLIP B/16 on a v5e pod with Spot capacity, relaunched after preemptions):
  ${SCRIPT_NAME} up --name vlm-v5e --zone us-west4-a --accelerator-type v5litepod-64 \\
      --queued --spot --watch \\
      --config configs/siglip_vit_b16.py --workdir gs://my-bucket/runs/siglip_b16 -- \\
      --config.data.train_shards='gs://my-bucket/webli/{00000..09999}.tar' \\
      --config.tokenizer.model_path=gs://my-bucket/c4_en_32k.model
EOF
}

# Commands are printed on fd 3 (the original stdout) so that they still show when a query
# runs inside $(...) in dry-run mode.
exec 3>&1

# Runs a command, or prints it under --dry-run.
run() {
  if ((dry_run)); then
    printf '%s\n' "$(join_quoted "$@")" >&3
  else
    log "+ $(join_quoted "$@")"
    "$@"
  fi
}

# Runs a read-only query and prints its stdout; under --dry-run prints the command and
# answers with $1 instead.
query() {
  local dry_answer="$1"
  shift
  if ((dry_run)); then
    printf '%s\n' "$(join_quoted "$@")" >&3
    printf '%s' "${dry_answer}"
  else
    "$@" 2>/dev/null || true
  fi
}

# ---------------------------------------------------------------------------------------------
# Flags.

name=""
zone=""
project=""
accelerator_type=""
runtime_version=""
spot=0
queued=0
repo_url=""
ref="HEAD"
remote_dir="vlm_jax"
python_bin="python3.12"
watch=0
poll_interval=60
max_restarts=20
worker="0"
lines=100

readonly VALUE_FLAGS=(--name --zone --project --accelerator-type --runtime-version --repo-url
  --ref --remote-dir --python-bin --config --workdir --env --poll-interval --max-restarts
  --worker --lines)
SWITCH_FLAGS=(--spot --queued --watch)
SUBCOMMAND_FLAGS=1

default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) printf '' ;;
  esac
}

validate_flags() {
  [[ -n "${subcommand}" ]] || { usage >&2; die "missing SUBCOMMAND"; }
  case "${subcommand}" in
    create | setup | train | up | logs | status | stop | delete | resume) ;;
    *) die "unknown subcommand '${subcommand}'; expected one of create, setup, train, up, logs, status, stop, delete, resume" ;;
  esac
  require --name "${name}" "the TPU VM name"
  require --zone "${zone}" "the TPU zone, e.g. us-central2-b"
  is_uint "${poll_interval}" || die "--poll-interval must be a number of seconds, got '${poll_interval}'"
  is_uint "${max_restarts}" || die "--max-restarts must be a non-negative integer, got '${max_restarts}'"
  is_uint "${lines}" || die "--lines must be a non-negative integer, got '${lines}'"
  [[ "${worker}" == all ]] || is_uint "${worker}" || die "--worker must be a worker index or 'all', got '${worker}'"
  if ((watch)); then
    case "${subcommand}" in
      train | up | resume) ;;
      *) die "--watch only applies to train, up and resume, not '${subcommand}'" ;;
    esac
  fi

  local needs_slice=0 needs_train=0
  case "${subcommand}" in
    create) needs_slice=1 ;;
    up | resume) needs_slice=1; needs_train=1 ;;
    train) needs_train=1; ((watch)) && needs_slice=1 ;;
  esac
  if ((needs_slice)); then
    require --accelerator-type "${accelerator_type}" "e.g. v4-32 or v5litepod-16; needed to create the slice"
    if [[ -z "${runtime_version}" ]]; then
      runtime_version="$(default_runtime_version "${accelerator_type}")"
      [[ -n "${runtime_version}" ]] || die "missing required flag --runtime-version: no default for accelerator type '${accelerator_type}'"
    fi
  fi
  if ((needs_train)); then
    require --config "${config}" "the experiment config, e.g. configs/shapes_coca.py"
    require --workdir "${workdir}" "a gs:// directory shared by all workers"
    [[ "${workdir}" == gs://?* ]] || die "--workdir must be a gs:// path that every worker can reach, got '${workdir}'"
    local config_file="${config%%:*}"
    if [[ -z "${repo_url}" && ! -f "${ROOT}/${config_file}" ]]; then
      log "warning: --config file '${config_file}' is not in this checkout"
    fi
  fi
  if [[ -n "${repo_url}" ]]; then
    return 0
  fi
  # Tarball mode ships `git archive` of --ref: make sure that is what the user expects.
  case "${subcommand}" in
    setup | up | resume | train)
      if ! ((dry_run)) && [[ -n "$(git -C "${ROOT}" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        log "warning: uncommitted changes are not copied to the workers (only ${ref} is)"
      fi
      ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# gcloud pieces.

gcloud_location() {
  printf '%s\n' "--zone=${zone}"
  [[ -z "${project}" ]] || printf '%s\n' "--project=${project}"
}

# Fills the array named by $1 with the location flags (zone, project).
location_flags() {
  local -n _out="$1"
  mapfile -t _out < <(gcloud_location)
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND
  local loc
  location_flags loc
  run gcloud compute tpus tpu-vm ssh "${name}" "${loc[@]}" "--worker=$1" --command "$2"
}

# Prints the slice state: READY/CREATING/PREEMPTED/... for a TPU VM, ACTIVE/WAITING_FOR_RESOURCES/
# SUSPENDED/... for a queued resource; empty when it does not exist.
slice_state() {
  local dry_answer="$1" loc
  location_flags loc
  if ((queued)); then
    query "${dry_answer}" gcloud compute tpus queued-resources describe "${name}" "${loc[@]}" \
      --format 'value(state.state)'
  else
    query "${dry_answer}" gcloud compute tpus tpu-vm describe "${name}" "${loc[@]}" \
      --format 'value(state)'
  fi
}

# healthy | pending | lost | missing
classify_state() {
  case "$1" in
    "") printf 'missing' ;;
    READY | ACTIVE) printf 'healthy' ;;
    CREATING | STARTING | RESTARTING | REPAIRING | PROVISIONING | ACCEPTED | CREATING_RESOURCES | \
      WAITING_FOR_RESOURCES) printf 'pending' ;;
    *) printf 'lost' ;;  # PREEMPTED, TERMINATED, STOPPED, SUSPENDED, SUSPENDING, FAILED, DELETING...
  esac
}

create_slice() {
  local loc capacity=()
  location_flags loc
  ((spot)) && capacity=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "${name}" "${loc[@]}" "--node-id=${name}" \
      "--accelerator-type=${accelerator_type}" "--runtime-version=${runtime_version}" \
      "${capacity[@]}" || return 1
    wait_until_healthy || return 1
  else
    run gcloud compute tpus tpu-vm create "${name}" "${loc[@]}" \
      "--accelerator-type=${accelerator_type}" "--version=${runtime_version}" \
      "${capacity[@]}" || return 1
  fi
}

delete_slice() {
  local loc
  location_flags loc
  if ((queued)); then
    # --force also deletes the TPU VM that the queued resource created.
    run gcloud compute tpus queued-resources delete "${name}" "${loc[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "${name}" "${loc[@]}" --quiet
  fi
}

wait_until_healthy() {
  local state
  while true; do
    state="$(slice_state ACTIVE)"
    case "$(classify_state "${state}")" in
      healthy) return 0 ;;
      pending) log "slice ${name} is ${state}; waiting ${poll_interval}s" ;;
      *) log "slice ${name} is '${state:-missing}' instead of becoming ready"; return 1 ;;
    esac
    sleep "${poll_interval}"
  done
}

# create: reuse a healthy slice, recreate a lost one, create a missing one.
ensure_slice() {
  local state
  state="$(slice_state "")"
  case "$(classify_state "${state}")" in
    healthy) log "reusing slice ${name} (${state})" ;;
    pending) log "slice ${name} is ${state}"; wait_until_healthy || return 1 ;;
    lost) log "slice ${name} is ${state}; recreating it"; delete_slice || return 1; create_slice || return 1 ;;
    missing) create_slice || return 1 ;;
  esac
}

# The jax version pinned in requirements.txt; jax[tpu] is installed at the same version.
jax_version() {
  local version
  version="$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "${ROOT}/requirements.txt" | head -n 1)"
  [[ -n "${version}" ]] || die "no 'jax==VERSION' pin in ${ROOT}/requirements.txt"
  printf '%s' "${version}"
}
jax_pin=""

readonly TARBALL_REMOTE="vlm_jax-code.tar.gz"

setup_workers() {
  local dir loc fetch_code install tarball
  dir="$(quote "${remote_dir}")"
  location_flags loc
  if [[ -n "${repo_url}" ]]; then
    fetch_code="{ [ -d ${dir}/.git ] || git clone --quiet $(quote "${repo_url}") ${dir}; }"
    fetch_code+=" && git -C ${dir} fetch --quiet origin $(quote "${ref}")"
    fetch_code+=" && git -C ${dir} checkout --quiet --force FETCH_HEAD"
  else
    tarball="${TMPDIR:-/tmp}/vlm_jax-${name}.tar.gz"
    run git -C "${ROOT}" archive --format=tar.gz "--output=${tarball}" "${ref}" || return 1
    run gcloud compute tpus tpu-vm scp "${tarball}" "${name}:${TARBALL_REMOTE}" "${loc[@]}" \
      --worker=all || return 1
    # Replace the old code but keep the venv (slow to rebuild) and the logs.
    fetch_code="mkdir -p ${dir}"
    fetch_code+=" && find ${dir} -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +"
    fetch_code+=" && tar -xzf ${TARBALL_REMOTE} -C ${dir} && rm -f ${TARBALL_REMOTE}"
  fi
  local apt="sudo apt-get -o DPkg::Lock::Timeout=600 -q" py apt_python
  py="$(quote "${python_bin}")"
  apt_python="${apt} install -y ${py} $(quote "${python_bin}-venv")"
  # Ubuntu 22.04 images have no python3.12 package: then it comes from the deadsnakes PPA.
  install="{ command -v ${py} >/dev/null 2>&1 || { ${apt} update && { ${apt_python}"
  install+=" || { ${apt} install -y software-properties-common"
  install+=" && sudo add-apt-repository -y ppa:deadsnakes/ppa && ${apt} update && ${apt_python}; }; }; }; }"
  # A venv of another Python (an older setup) is rebuilt rather than patched.
  install+=" && cd ${dir} && { [ \"\$(.venv/bin/python -V 2>&1)\" = \"\$(${py} -V 2>&1)\" ]"
  install+=" || ${py} -m venv --clear .venv; }"
  install+=" && .venv/bin/python -m pip install -q --upgrade pip"
  install+=" && .venv/bin/python -m pip install -q -r requirements.txt $(quote "jax[tpu]==${jax_pin}")"
  tpu_ssh all "set -e; ${fetch_code}" || return 1
  tpu_ssh all "set -e; ${install}"
}

# Worker-side helper: is the job (the pid in logs/train.pid) alive? A zombie does not count.
readonly REMOTE_ALIVE='alive() { [ -f logs/train.pid ] || return 1; s=$(ps -o stat= -p "$(cat logs/train.pid)" 2>/dev/null | tr -d " "); [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }'

# Worker-side prefix of the job commands: define alive, then cd to the code directory.
alive_and_cd() {
  printf '%s; cd %s' "${REMOTE_ALIVE}" "$(quote "${remote_dir}")"
}

# The detached launch on each worker: setsid makes the job its own process group (so `stop` can
# signal python and all its children), nohup + redirections let the ssh session end, and the
# exit status is written to logs/train.exit so `status` and --watch can tell a crash from a
# clean finish.
start_training() {
  local train=() job remote
  # VLM_JAX_DISTRIBUTED=1: ssh sessions on TPU VMs carry no launcher variables, so tell the
  # trainer to call jax.distributed.initialize(), which reads the slice layout from the TPU
  # metadata (one process per worker; a single-host slice gives one process). --env can override.
  trainer_argv train .venv/bin/python
  job="$(join_quoted env PYTHONUNBUFFERED=1 VLM_JAX_DISTRIBUTED=1 "${env_vars[@]}" "${train[@]}")"
  job+='; echo $? > logs/train.exit'
  remote="set -e; $(alive_and_cd); mkdir -p logs"
  remote+='; if alive; then'
  remote+=' echo "vlm_jax.train is already running (pid $(cat logs/train.pid)); run stop first" >&2; exit 1; fi'
  remote+='; rm -f logs/train.exit; echo "=== launch $(date -u +%FT%TZ) ===" >> logs/train.log'
  remote+="; setsid nohup bash -c $(quote "${job}") >> logs/train.log 2>&1 < /dev/null &"
  remote+=' echo $! > logs/train.pid'
  tpu_ssh all "${remote}"
}

stop_training() {
  local remote
  remote="$(alive_and_cd) 2>/dev/null || exit 0"
  remote+='; if alive; then kill -TERM -- "-$(cat logs/train.pid)";'
  # Wait (up to 60 s) for the processes to exit so that the TPU is free for the next launch.
  remote+=' for _ in $(seq 60); do alive || break; sleep 1; done;'
  remote+=' echo "stopped on $(hostname)";'
  remote+=' else echo "not running on $(hostname)"; fi'
  tpu_ssh all "${remote}"
}

# The job state on worker 0: running | exited:STATUS | preempted | absent (set up, never
# launched) | nocode (needs setup). The trainer's exit status says how it ended: 0 completed,
# 75 stopped on SIGTERM after saving (`preempted`: resume it), anything else failed.
readonly EXIT_PREEMPTED=75

job_state_script() {
  local remote
  remote="$(alive_and_cd) 2>/dev/null && [ -x .venv/bin/python ] || { echo nocode; exit 0; }"
  remote+='; if alive; then echo running;'
  remote+=" elif [ \"\$(cat logs/train.exit 2>/dev/null)\" = ${EXIT_PREEMPTED} ]; then echo preempted;"
  remote+=' elif [ -f logs/train.exit ]; then echo "exited:$(cat logs/train.exit)"; else echo absent; fi'
  printf '%s' "${remote}"
}

job_state() {
  local dry_answer="$1" loc
  location_flags loc
  query "${dry_answer}" gcloud compute tpus tpu-vm ssh "${name}" "${loc[@]}" --worker=0 \
    --command "$(job_state_script)" | tail -n 1
}

stream_logs() {
  local dir
  dir="$(quote "${remote_dir}")"
  tpu_ssh "${worker}" "cd ${dir} && tail -n ${lines} -F logs/train.log"
}

show_status() {
  local state job
  state="$(slice_state "")"
  printf 'slice %s: %s\n' "${name}" "${state:-does not exist}"
  if [[ "$(classify_state "${state}")" == healthy ]]; then
    job="$(job_state absent)"
    printf 'training on worker 0: %s\n' "${job:-unknown}"
  fi
}

# One recovery pass. Returns 0 when there is nothing left to do (training exited with 0),
# 1 when it (re)started or left something running, and 2 on a failed attempt.
restarts=0
resume_once() {
  local dry_slice="$1" dry_job="$2" state job
  state="$(slice_state "${dry_slice}")"
  case "$(classify_state "${state}")" in
    healthy)
      job="$(job_state "${dry_job}")"
      case "${job}" in
        running) log "training is running on worker 0"; return 1 ;;
        "") log "could not read the job state from worker 0; trying again later"; return 1 ;;
        exited:0) log "training finished (exit status 0)"; return 0 ;;
        nocode) count_restart; setup_workers || return 2; start_training || return 2 ;;
        *)
          count_restart
          log "training is '${job:-unknown}'; relaunching"
          # Some workers may still hold the TPU after a crash elsewhere: stop them all first.
          stop_training || return 2
          start_training || return 2
          ;;
      esac
      ;;
    pending) log "slice ${name} is ${state}; waiting"; return 1 ;;
    lost | missing)
      count_restart
      log "slice ${name} is '${state:-missing}'; bringing it back"
      if [[ -n "${state}" ]]; then delete_slice || return 2; fi
      create_slice || return 2
      setup_workers || return 2
      start_training || return 2
      ;;
  esac
  return 1
}

count_restart() {
  restarts=$((restarts + 1))
  if ((watch && restarts > max_restarts)); then
    die "gave up after ${max_restarts} relaunches (--max-restarts)"
  fi
}

watch_loop() {
  local status
  if ((dry_run)); then
    # One polling pass with a healthy, running job; the loop itself would repeat it.
    resume_once ACTIVE running || true
    log "dry run: --watch would repeat these queries every ${poll_interval}s"
    return 0
  fi
  while true; do
    sleep "${poll_interval}"
    status=0
    resume_once "" "" || status=$?
    case "${status}" in
      0) return 0 ;;
      2) log "relaunch attempt failed; retrying in ${poll_interval}s" ;;
    esac
  done
}

main() {
  parse_flags "$@"
  validate_flags
  if ! ((dry_run)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found; install the Google Cloud SDK (https://cloud.google.com/sdk) and run gcloud auth login"
  fi
  case "${subcommand}" in
    setup | up | resume | train) jax_pin="$(jax_version)" ;;  # fails here, not half-way
  esac
  local status=0
  case "${subcommand}" in
    create) ensure_slice || status=$? ;;
    setup) setup_workers || status=$? ;;
    train) start_training || status=$? ;;
    up) { ensure_slice && setup_workers && start_training; } || status=$? ;;
    logs) stream_logs || status=$? ;;
    status) show_status || status=$? ;;
    stop) stop_training || status=$? ;;
    delete) delete_slice || status=$? ;;
    resume)
      resume_once "" absent || status=$?
      # 0: finished, 1: (re)started or running, 2: failed.
      if ((status == 1)); then status=0; fi
      ;;
  esac
  if ((watch)); then
    # The loop retries whatever failed above (create, setup or launch).
    ((status == 0)) || log "${subcommand} failed (status ${status}); --watch keeps trying"
    watch_loop
    return
  fi
  return "${status}"
}

main "$@"
