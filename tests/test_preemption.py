"""SIGTERM in every phase of a training run: start-up, an evaluation between checkpoints, the final
evaluation. Each stops cleanly with exit status 75 and says where; training mid-run is covered by
test_train_resume.py (saves the step, resumes bitwise).

Three `python -m vlm_jax.train` subprocesses run side by side (1 CPU device each)."""
import json
import os
import signal
import subprocess
import time

import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import (REPO, logged, stop_all, subprocess_env, tiny_overrides,
                         train_command)
from vlm_jax import preemption

pytestmark = pytest.mark.slow

RUNS = {
    # Stopped before the loop: nothing is saved.
    "startup": dict(total_steps=50),
    # An evaluation at step 3, between checkpoints (every 10): step 3 is saved.
    "eval": dict(total_steps=20, eval_every_steps=3, checkpoint_every_steps=10),
    # The final evaluation, after the last checkpoint (step 3).
    "final": dict(total_steps=3),
}
TRIGGER = {"startup": "JAX: 1 processes", "eval": 3, "final": 3}


def _start(name, workdir, data_dir, log):
  o = tiny_overrides(data_dir, log_every_steps=1, schedule__warmup_steps=1,
                     evals__run="caption", evals__caption__tokenizer="python",
                     evals__batch_size=16, **RUNS[name])
  return subprocess.Popen(train_command("coca", workdir, o), cwd=REPO, env=subprocess_env(1),
                          stdout=log, stderr=subprocess.STDOUT)


def _triggered(name, workdir, log_path):
  if name == "startup":
    return TRIGGER[name] in open(log_path).read()
  try:
    return max(logged(workdir)) >= TRIGGER[name]
  except (FileNotFoundError, ValueError):
    return False


def test_sigterm_in_every_phase_stops_cleanly(shapes_data_dir, tmp_path):
  dirs = {k: str(tmp_path / k) for k in RUNS}
  paths = {k: tmp_path / f"{k}.log" for k in RUNS}
  logs = {k: open(paths[k], "w") for k in RUNS}
  procs = {k: _start(k, dirs[k], shapes_data_dir, logs[k]) for k in RUNS}
  try:
    pending, deadline = set(RUNS), time.time() + 300
    while pending and time.time() < deadline:
      for k in list(pending):
        if _triggered(k, dirs[k], paths[k]):
          procs[k].send_signal(signal.SIGTERM)
          pending.discard(k)
        assert procs[k].poll() is None, paths[k].read_text()[-3000:]
      time.sleep(0.02)
    assert not pending, pending
    for k, p in procs.items():
      assert p.wait(timeout=300) == preemption.EXIT_PREEMPTED, paths[k].read_text()[-3000:]
  finally:
    stop_all(procs.values(), logs.values())

  def checkpoints(k):
    folder = os.path.join(dirs[k], "checkpoints")
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(
        folder) else []

  def eval_records(k):
    with open(os.path.join(dirs[k], "metrics.jsonl")) as f:
      return [r for r in map(json.loads, f) if any(key.startswith("eval/") for key in r)]

  text = {k: paths[k].read_text() for k in RUNS}
  assert "preempted: SIGTERM during start-up" in text["startup"], text["startup"][-2000:]
  assert checkpoints("startup") == []
  # The evaluation at step 3 stopped at a batch; step 3, newer than any checkpoint, was saved.
  assert "preempted: SIGTERM during an evaluation at step 3" in text["eval"], text["eval"][-2000:]
  assert checkpoints("eval") == [3] and eval_records("eval") == []
  assert ("preempted: SIGTERM during the final evaluation at step 3" in text["final"]), (
      text["final"][-2000:])
  assert checkpoints("final") == [3] and eval_records("final") == []
