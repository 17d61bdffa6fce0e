"""Two JAX processes on localhost (2 CPU devices each, gloo collectives) train, checkpoint and
resume (also on one process, and back on two), and log the same losses as one process with 4
devices on the same global batches; embeddings written by 2 processes equal 1 process's; a
SIGTERM to one process stops both."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from data_fixtures import write_tar_and_jsonl
import jax

from train_utils import (REPO, free_port, logged, run_steps, stop_all, subprocess_env,
                         tiny_config, tiny_overrides, train_command)
from vlm_jax import tasks
from vlm_jax.data import pipeline
from vlm_jax.data import tokenizer as tok_lib

# One group: each test runs two JAX processes, so two at once would oversubscribe the cores.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.xdist_group("multiprocess")]

COMMON = dict(log_every_steps=1, checkpoint_every_steps=2, schedule__kind="constant",
              schedule__warmup_steps=2, batch_size=16)


def _run_two_processes(workdir, data_dir, total_steps, tmp_path, tag, command=None):
  """Two JAX processes (2 devices each) run the trainer (or `command`) to completion."""
  port = free_port()
  o = tiny_overrides(data_dir, total_steps=total_steps, **COMMON)
  procs, logs = [], []
  for pid in range(2):
    env = subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(pid))
    log = open(tmp_path / f"{tag}_{pid}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen(command or train_command("coca", workdir, o), cwd=REPO,
                                  env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    for pid, p in enumerate(procs):
      rc = p.wait(timeout=400)
      assert rc == 0, open(tmp_path / f"{tag}_{pid}.log").read()[-4000:]
  finally:
    stop_all(procs, logs)


def _run_one_process(workdir, data_dir, total_steps, tmp_path, tag):
  o = tiny_overrides(data_dir, total_steps=total_steps, **COMMON)
  with open(tmp_path / f"{tag}.log", "w") as log:
    rc = subprocess.run(train_command("coca", workdir, o), cwd=REPO, env=subprocess_env(2),
                        stdout=log, stderr=subprocess.STDOUT, timeout=400, check=False).returncode
  assert rc == 0, open(tmp_path / f"{tag}.log").read()[-4000:]


def test_training_resumes_across_process_counts_like_one_run(shapes_data_dir, tmp_path):
  """2 processes train 4 steps and checkpoint; 1 process resumes to step 6 (elastic); 2
  processes resume again to step 8. Every step's losses equal one process with 4 devices
  training on the same global batches: the saved params and optimizer state carry over, and
  the data continues where it stopped (which global batches those are is built here with the
  pipeline exactly as the trainer builds them; that they read every example once is
  tests/test_pipeline.py::test_elastic_resume_reads_every_example_once)."""
  multi = str(tmp_path / "multi")
  _run_two_processes(multi, shapes_data_dir, 4, tmp_path, "first")
  assert sorted(os.listdir(os.path.join(multi, "checkpoints")))[-1] == "4"
  _run_one_process(multi, shapes_data_dir, 6, tmp_path, "one")          # resumes from step 4
  _run_two_processes(multi, shapes_data_dir, 8, tmp_path, "again")      # resumes from step 6

  # The same 8 global batches on ONE process with 4 devices. The global batch of a step is the
  # concatenation of the processes' batches (process 0's examples first).
  config = tiny_config("coca", shapes_data_dir, os.path.join(multi, "tokenizer.model"),
                       total_steps=8, **COMMON)
  tok = tok_lib.Tokenizer.load(os.path.join(multi, "tokenizer.model"))
  field_ops = tasks.get(config.task).train_ops(config, tok)

  def iterators(count, states=None):
    its = [pipeline.make_train_iterator(config.data, field_ops,
                                        batch_size=config.batch_size // count,
                                        process_index=p, process_count=count)
           for p in range(count)]
    for p, it in enumerate(its):
      if states is not None:
        it.set_state(pipeline.resume_state(states, p, count))
    return its

  batches, its = [], iterators(2)
  for steps, count in ((4, 2), (2, 1), (2, 2)):
    if len(its) != count:
      its = iterators(count, [it.get_state() for it in its])
    for _ in range(steps):
      parts = [next(it) for it in its]
      batches.append({k: np.concatenate([p[k] for p in parts]) for k in ("image", "text")})
  _, history, _ = run_steps(config, batches, devices=jax.devices()[:4])

  a = logged(multi)
  assert sorted(a) == list(range(1, 9))
  for step, h in enumerate(history, start=1):
    for key in a[step]:
      np.testing.assert_allclose(a[step][key], h[key], rtol=2e-4, err_msg=f"step {step} {key}")

  # `vlm_jax.embed` of the trained model on 2 processes writes what 1 process writes.
  from vlm_jax import embed, inference  # pylint: disable=g-import-not-at-top
  two = str(tmp_path / "embed_two")
  _run_two_processes(multi, shapes_data_dir, 8, tmp_path, "embed", command=[
      sys.executable, "-m", "vlm_jax.embed", f"--workdir={multi}", f"--out={two}",
      "--shard_size=24", "--batch_size=8"])
  one = str(tmp_path / "embed_one")
  model = inference.load(multi, mesh=inference.default_mesh(jax.devices()[:4]))
  embed.embed(model, embed.split_data_config(model.config, "eval"), one, shard_size=24,
              progress=False)
  for kind in ("images", "texts"):
    vectors_two, rows_two, manifest = embed.read(two, kind)
    vectors_one, rows_one, _ = embed.read(one, kind)
    assert rows_two == rows_one and len(rows_one) == (64 if kind == "images" else 256)
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-5, err_msg=kind)
  assert manifest["model"]["model_id"] == model.identity()["model_id"]

  # Tar shards (3 tars for 2 processes: one output shard per tar, read by offset) too.
  pattern = write_tar_and_jsonl(str(tmp_path / "tars"), 3, 5)
  tars_two = str(tmp_path / "tars_two")
  _run_two_processes(multi, shapes_data_dir, 8, tmp_path, "embed_tars", command=[
      sys.executable, "-m", "vlm_jax.embed", f"--workdir={multi}", f"--out={tars_two}",
      "--batch_size=8", "--config.data.source=wds", f"--config.data.eval_shards={pattern}"])
  data = embed.split_data_config(model.config, "eval")
  tars = type(data)(dict(data.to_dict(), source="wds", eval_shards=pattern))
  tars_one = str(tmp_path / "tars_one")
  embed.embed(model, tars, tars_one, progress=False)
  for kind in ("images", "texts"):
    vectors_two, rows_two, manifest = embed.read(tars_two, kind)
    vectors_one, rows_one, _ = embed.read(tars_one, kind)
    assert rows_two == rows_one and len(rows_one) == 15
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-5, err_msg=f"tars {kind}")
  assert manifest["num_shards"] == 3


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
