"""Exact resume: N uninterrupted steps == K steps + SIGKILL / SIGTERM + resume to N, bitwise.

Runs `python -m vlm_jax.train` in subprocesses (2 CPU devices each) on the tiny shapes data.
"""
import json
import os
import signal
import subprocess
import time

import jax
import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import (REPO, logged, stop_all, subprocess_env, tiny_config,
                         tiny_overrides, train_command, tree_equal)
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import runtime

pytestmark = pytest.mark.slow

N = 14
COMMON = dict(log_every_steps=1, checkpoint_every_steps=5, schedule__kind="constant",
              schedule__warmup_steps=3, async_checkpointing=True)


def _start(workdir, data_dir, total_steps, log):
  o = tiny_overrides(data_dir, total_steps=total_steps, **COMMON)
  return subprocess.Popen(train_command("coca", workdir, o), cwd=REPO, env=subprocess_env(2),
                          stdout=log, stderr=subprocess.STDOUT)


def _last_step(workdir):
  try:
    return max(logged(workdir))
  except (FileNotFoundError, ValueError):
    return 0


def _wait(proc, timeout, what):
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"{what} did not finish in {timeout}s")


def _params(workdir, config):
  rt = runtime.Runtime.create(config, jax.devices()[:2])
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ck.latest_step() == N
  state, _, meta = ck.restore(N, rt.abstract_state)
  ck.close()
  assert "config" in meta and meta["tokenizer_model_b64"]
  return jax.device_get(state.params)


def test_exact_resume_after_sigkill_and_sigterm(shapes_data_dir, tmp_path):
  dirs = {k: str(tmp_path / k) for k in ("ref", "kill", "term")}
  logs = {k: open(tmp_path / f"{k}.log", "w") for k in dirs}
  procs = {"ref": _start(dirs["ref"], shapes_data_dir, N, logs["ref"]),
           # Interrupted runs are given far more steps; the constant schedule makes them
           # identical to the reference up to the interruption.
           "kill": _start(dirs["kill"], shapes_data_dir, 1000, logs["kill"]),
           "term": _start(dirs["term"], shapes_data_dir, 1000, logs["term"])}
  try:
    deadline = time.time() + 400
    pending = {"kill", "term"}
    while pending and time.time() < deadline:
      for k in list(pending):
        step = _last_step(dirs[k])
        have_ckpt = os.path.isdir(os.path.join(dirs[k], "checkpoints", "5"))
        if k == "kill" and have_ckpt and step >= 7:
          procs[k].send_signal(signal.SIGKILL)       # between checkpoints 5 and 10
          pending.discard(k)
        elif k == "term" and step >= 7:
          procs[k].send_signal(signal.SIGTERM)       # mid-run: save now and exit cleanly
          pending.discard(k)
        assert procs[k].poll() is None, open(tmp_path / f"{k}.log").read()[-3000:]
      time.sleep(0.05)
    assert not pending, "interrupted runs never reached step 7"
    # Stopped on SIGTERM after saving: exit status 75 (preempted), the message names the step.
    assert _wait(procs["term"], 300, "SIGTERM run") == 75, open(tmp_path / "term.log").read()[-3000:]
    assert "preempted: SIGTERM at step" in open(tmp_path / "term.log").read()
    _wait(procs["kill"], 60, "SIGKILL run")
    term_steps = sorted(int(s) for s in os.listdir(os.path.join(dirs["term"], "checkpoints"))
                        if s.isdigit())
    preempted_at = term_steps[-1]
    assert 7 <= preempted_at < N, term_steps           # saved where it stopped
    kill_steps = sorted(int(s) for s in os.listdir(os.path.join(dirs["kill"], "checkpoints"))
                        if s.isdigit())
    assert kill_steps and kill_steps[-1] < N

    # Resume both to N (the run's total), alongside the reference finishing.
    procs["kill"] = _start(dirs["kill"], shapes_data_dir, N, logs["kill"])
    procs["term"] = _start(dirs["term"], shapes_data_dir, N, logs["term"])
    for k in dirs:
      assert _wait(procs[k], 400, k) == 0, open(tmp_path / f"{k}.log").read()[-3000:]
  finally:
    stop_all(procs.values(), logs.values())

  ref_log = logged(dirs["ref"])
  assert sorted(ref_log) == list(range(1, N + 1))
  for k in ("kill", "term"):
    assert logged(dirs[k]) == ref_log, k                 # identical logged losses, every step
  config = tiny_config("coca", shapes_data_dir, total_steps=N, **COMMON)
  ref = _params(dirs["ref"], config)
  assert tree_equal(_params(dirs["kill"], config), ref)
  assert tree_equal(_params(dirs["term"], config), ref)
  # The workdir holds what evaluation / inference need.
  for k in dirs:
    assert os.path.exists(os.path.join(dirs[k], "tokenizer.model"))
    json.load(open(os.path.join(dirs[k], "config.json")))
