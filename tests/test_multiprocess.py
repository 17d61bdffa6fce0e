"""Two JAX processes on localhost (2 CPU devices each, gloo collectives) train, checkpoint and
resume together, and log the same losses as one process with 4 devices on the same global
batches."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
import jax

from train_utils import (REPO, free_port, logged, run_steps, stop_all, subprocess_env,
                         tiny_config, tiny_overrides, train_command)
from vlm_jax import tasks
from vlm_jax.data import pipeline
from vlm_jax.data import tokenizer as tok_lib

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

COMMON = dict(log_every_steps=1, checkpoint_every_steps=2, schedule__kind="constant",
              schedule__warmup_steps=2, batch_size=16)


def _run_two_processes(workdir, data_dir, total_steps, tmp_path, tag):
  port = free_port()
  o = tiny_overrides(data_dir, total_steps=total_steps, **COMMON)
  procs, logs = [], []
  for pid in range(2):
    env = subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(pid))
    log = open(tmp_path / f"{tag}_{pid}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen(train_command("coca", workdir, o), cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT))
  try:
    for pid, p in enumerate(procs):
      rc = p.wait(timeout=400)
      assert rc == 0, open(tmp_path / f"{tag}_{pid}.log").read()[-4000:]
  finally:
    stop_all(procs, logs)


def test_two_processes_train_checkpoint_resume_like_one(shapes_data_dir, tmp_path):
  multi = str(tmp_path / "multi")
  _run_two_processes(multi, shapes_data_dir, 4, tmp_path, "first")
  assert sorted(os.listdir(os.path.join(multi, "checkpoints")))[-1] == "4"
  _run_two_processes(multi, shapes_data_dir, 8, tmp_path, "resume")   # resumes from step 4

  # The same 8 global batches on ONE process with 4 devices. The global batch of a step is the
  # concatenation of the processes' batches (process 0's examples first), built here from the
  # pipeline exactly as each process built its share.
  config = tiny_config("coca", shapes_data_dir, os.path.join(multi, "tokenizer.model"),
                       total_steps=8, **COMMON)
  tok = tok_lib.Tokenizer.load(os.path.join(multi, "tokenizer.model"))
  field_ops = tasks.get(config.task).train_ops(config, tok)
  its = [pipeline.make_train_iterator(config.data, field_ops, batch_size=config.batch_size // 2,
                                      process_index=p, process_count=2)
         for p in range(2)]
  batches = []
  for _ in range(8):
    parts = [next(it) for it in its]
    batches.append({k: np.concatenate([p[k] for p in parts]) for k in ("image", "text")})
  _, history, _ = run_steps(config, batches, devices=jax.devices()[:4])

  a = logged(multi)
  assert sorted(a) == list(range(1, 9))
  for step, h in enumerate(history, start=1):
    for key in a[step]:
      np.testing.assert_allclose(a[step][key], h[key], rtol=2e-4, err_msg=f"step {step} {key}")


def test_sigterm_to_one_process_stops_both_at_the_same_evaluation_batch(shapes_data_dir,
                                                                          tmp_path):
  """The preemption notice reaches every process: a SIGTERM to process 1 during the final
  evaluation stops both (same batch, or the collectives would hang), exit status 75."""
  workdir = str(tmp_path / "run")
  port = free_port()
  o = tiny_overrides(shapes_data_dir, total_steps=3, evals__run="caption",
                     evals__caption__tokenizer="python", evals__batch_size=8,
                     **dict(COMMON, checkpoint_every_steps=10, schedule__warmup_steps=1))
  procs, paths, logs = [], [], []
  for pid in range(2):
    env = subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(pid))
    paths.append(tmp_path / f"p{pid}.log")
    logs.append(open(paths[-1], "w"))
    procs.append(subprocess.Popen(train_command("coca", workdir, o), cwd=REPO, env=env,
                                  stdout=logs[-1], stderr=subprocess.STDOUT))
  try:
    deadline = time.time() + 300
    while time.time() < deadline:
      try:
        if max(logged(workdir)) >= 3:
          break
      except (FileNotFoundError, ValueError):
        pass
      assert all(p.poll() is None for p in procs), paths[0].read_text()[-3000:]
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    for pid, p in enumerate(procs):
      assert p.wait(timeout=300) == 75, paths[pid].read_text()[-4000:]
  finally:
    stop_all(procs, logs)
  for path in paths:
    assert "preempted: SIGTERM during the final evaluation at step 3" in path.read_text()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert not any("eval/" in line for line in f)
