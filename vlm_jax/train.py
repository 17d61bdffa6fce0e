r"""The trainer: command line and loop, for every task. Sharded, checkpointed, exactly resumable.

  python -m vlm_jax.train --config configs/shapes_coca.py --workdir runs/shapes_coca \
      [--config.total_steps=2000 --config.mesh.fsdp=4 ...]

What happens (the pieces are in `vlm_jax.runtime`):
  * the config is checked, the training source opened and matched against the fields the task
    needs, and the tokenizer loaded or trained, all before anything is compiled;
  * a ('data', 'fsdp', 'tensor') mesh is built from `config.mesh`; the params and the optimizer
    state are created directly sharded, so FSDP / tensor parallelism are config changes only;
  * every step, each process's batch becomes one global `jax.Array` per field; the jitted step
    (state donated) computes the task's loss on the whole global batch;
  * checkpoints (Orbax, async) hold params, optimizer state, step, RNG and the data-iterator
    position, and the run resumes from the latest one automatically and exactly;
  * SIGTERM (preemption) saves at the current step and exits cleanly;
  * metrics go to DIR/metrics.jsonl, TensorBoard (DIR/tensorboard) and a progress bar; the
    evaluations of `config.evals` run every `eval_every_steps` and at the end.
Without --config, the config saved in the workdir is used (resuming a run as it was started).
Every config field, with its value and help: python -m vlm_jax.config show configs/x.py[:arg]
"""
from __future__ import annotations

import base64
import math
import os
import sys
import time

from absl import flags
from absl import logging
import jax
import ml_collections

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import cli
from vlm_jax import config_utils
from vlm_jax import evals as evals_lib
from vlm_jax import metrics as metrics_lib
from vlm_jax import preemption
from vlm_jax import preflight
from vlm_jax import runtime as runtime_lib
from vlm_jax import tasks
from vlm_jax.data import pipeline
from vlm_jax.data import tokenizers


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with NaN/Inf loss or gradients."""


class _NonFiniteWatch:
  """Checks every step for a skipped (non-finite) update without making a step wait: a step's
  counters are read one step late, once the next step is already queued on the devices. Each
  skipped step is written to the metrics (which terms were non-finite) and a streak of
  `limit` stops the run at the step that reaches it."""

  def __init__(self, limit: int, writer, checkpointer):
    self._limit, self._writer, self._ckpt = int(limit), writer, checkpointer
    self._pending = None

  def push(self, step: int, metrics) -> None:
    """Records this step's (device) metrics and checks the previous step's."""
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    """Checks the last step pushed (at the end of the loop)."""
    if self._pending is not None:
      previous, self._pending = self._pending, None
      self._check(*previous)

  def _check(self, step, metrics):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    streak = int(m["nonfinite_streak"])
    if not streak:
      return
    bad = sorted(k for k, v in m.items() if not math.isfinite(v))
    self._writer.write(step, {**{k: m[k] for k in bad}, "nonfinite_streak": float(streak),
                              "nonfinite_total": m["nonfinite_total"],
                              "nonfinite_terms": ",".join(bad)})
    logging.warning("step %d skipped: non-finite %s (%d in a row)", step, ", ".join(bad), streak)
    if streak >= self._limit:
      raise NonFiniteError(
          f"{streak} consecutive steps with non-finite loss or gradients (up to step {step}; "
          f"max_consecutive_nonfinite={self._limit}); stopping. The last good checkpoint is "
          f"step {self._ckpt.latest_step()}.")


def _data_stats(data_iter) -> dict:
  """Skipped-sample counters and the time spent waiting on input since the last call."""
  out = {f"data/skipped_{k}": float(v) for k, v in data_iter.skipped_counts().items()}
  out["data/skipped"] = float(sum(data_iter.skipped_counts().values()))
  out["data/wait_seconds"] = float(data_iter.pop_wait_seconds())
  return out


def _checkpoint_stats(checkpointer, step) -> dict:
  """How far the newest complete checkpoint lags behind, and the time saves waited for the
  previous one since the last call."""
  out = {"checkpoint/wait_seconds": checkpointer.wait_seconds}
  checkpointer.wait_seconds = 0.0
  finished = checkpointer.finished_step()
  if finished is not None:
    out["checkpoint/lag_steps"] = float(step - finished)
  return out


def prepare(config: ml_collections.ConfigDict, workdir: str):
  """Everything that can fail on the config or the data, before anything is compiled:
  (training source, tokenizer or None). Every problem of the config is reported at once
  (`vlm_jax.preflight`); then the data is prepared and checked. Completes the config from the
  data (the task's `finalize`, e.g. a classifier's number of classes)."""
  preflight.raise_problems(preflight.config_problems(config))
  preflight.warn(config)
  runtime_lib.prepare_data(config)
  source, problems = preflight.open_train_source(config)
  preflight.raise_problems(problems + preflight.eval_data_problems(config))
  task = tasks.get(config.task)
  task.finalize(config, source)
  return source, runtime_lib.load_tokenizer(config, workdir, source)


def _evaluate(ctx, params, step) -> dict:
  ctx.params = params
  try:
    with ctx.scope():
      results = evals_lib.run_evals(ctx, step)
  finally:
    ctx.params = None        # the context must not keep old params alive
  return {f"eval/{k}": v for k, v in results.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it has a checkpoint) and returns the last metrics.

  Raises `preemption.Preempted` when a SIGTERM stops the run (during start-up: before anything
  is saved; during training: after saving the current step; during an evaluation: after saving
  the step if it is newer than the newest checkpoint).
  """
  with preemption.handling():
    return _train_and_evaluate(config, os.path.abspath(workdir))


def _train_and_evaluate(config, workdir):
  source, tokenizer = prepare(config, workdir)
  preemption.check("during start-up (checking the config and the data); nothing to save")
  rt = runtime_lib.Runtime.create(config)
  config_json = config_utils.config_to_json(config)
  tok_bytes = tokenizers.to_bytes(tokenizer) if tokenizer is not None else None
  ckpt_lib.write_workdir_files(workdir, config_json, tok_bytes)
  # Checkpoints are self-contained: config and tokenizer travel with them.
  meta = {"config": config_json}
  if tok_bytes is not None:
    meta.update(tokenizer_kind=config.tokenizer.kind,
                tokenizer_model_b64=base64.b64encode(tok_bytes).decode("ascii"))

  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints, async_save=config.async_checkpointing)
  data_iter = writer = None
  try:
    latest = checkpointer.latest_step()
    data_state = None
    if latest is not None:
      state, data_states, _ = checkpointer.restore(latest, rt.abstract_state)
      data_state = pipeline.resume_state(data_states, jax.process_index(), jax.process_count())
      if len(data_states) != jax.process_count():
        logging.warning("resuming step %d, written by %d process(es), on %d: the data continues "
                        "at the first example none of them read", latest, len(data_states),
                        jax.process_count())
      logging.info("resumed from %s/checkpoints/%d", workdir, latest)
    else:
      state = rt.init_state()
      if config.init_from:
        state = rt.init_params_from(state)
    data_iter = runtime_lib.make_train_data(rt, tokenizer, source, data_state)
    eval_ctx = evals_lib.EvalContext.create(config, rt.task, rt.model, None, rt.mesh, tokenizer)
    step_fn = rt.make_step()
    start = int(jax.device_get(state.step))
    preemption.check(f"during start-up (building the state and the data); the newest "
                     f"checkpoint is step {latest}, nothing new to save")
    total = int(config.total_steps)
    writer = metrics_lib.MetricWriter(workdir, total_steps=total, initial_step=start,
                                      progress_bar=config.progress_bar)
    flops = rt.task.train_flops_per_example(config)
    peak = metrics_lib.device_peak_flops()
    watch = _NonFiniteWatch(config.max_consecutive_nonfinite, writer, checkpointer)
    last_metrics: dict = {}
    t0, t0_step = time.time(), start
    step = start

    def save(step_now, wait=True):
      """Checkpoints `step_now` unless it is the newest already; `wait` for the write."""
      if jax.device_get(state.nonfinite_streak) >= config.max_consecutive_nonfinite:
        return  # never checkpoint a run that is about to stop on NaNs
      if checkpointer.latest_step() != step_now:
        checkpointer.save(step_now, state, data_iter.get_state(), meta)
      if wait:
        checkpointer.wait()

    def evaluate_or_stop(step_now, what):
      """Runs the evals; a SIGTERM during them saves the step (if newer) and stops the run."""
      try:
        params = state.ema_params if config.evals.use_ema else state.params
        return _evaluate(eval_ctx, params, step_now)
      except preemption.Preempted:
        save(step_now)
        raise preemption.Preempted(f"SIGTERM during {what} at step {step_now}; stopped it, the "
                                   f"newest checkpoint is step {checkpointer.latest_step()}")

    with rt.context():
      while step < total:
        if preemption.reached():
          logging.warning("preemption: saving at step %d and exiting", step)
          watch.flush()
          save(step)
          raise preemption.Preempted(f"SIGTERM at step {step}; saved checkpoint "
                                     f"{checkpointer.latest_step()}")
        batch = next(data_iter)
        state, step_metrics = step_fn(state, batch)
        step += 1
        writer.advance(step)
        watch.push(step, step_metrics)

        log_now = step % config.log_every_steps == 0 or step == total
        ckpt_now = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        if log_now:
          m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          dt = time.time() - t0
          steps_done = step - t0_step
          if steps_done and dt > 0:
            sps = steps_done * config.batch_size / dt
            m["samples_per_sec"] = sps
            m["tflops_per_device"] = sps * flops / jax.device_count() / 1e12
            if peak:
              m["mfu"] = m["tflops_per_device"] * 1e12 / peak
          m.update(_data_stats(data_iter))
          m.update(_checkpoint_stats(checkpointer, step))
          writer.write(step, m)
          last_metrics = m
          t0, t0_step = time.time(), step
        if ckpt_now:
          save(step, wait=False)          # asynchronous: training goes on while it is written
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total:
          ev = evaluate_or_stop(step, "an evaluation")
          if ev:
            writer.write(step, ev)
            last_metrics.update(ev)
      watch.flush()
      save(step)
      ev = evaluate_or_stop(step, "the final evaluation")
      if ev:
        writer.write(step, ev)
        last_metrics.update(ev)
  finally:
    if data_iter is not None:
      data_iter.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
  last_metrics["step"] = step
  return last_metrics


# ------------------------------------------------------------------------------------------------
# Command line.

def define_flags():
  """--workdir (and, through `vlm_jax.cli`, --config with its overrides). Defined only when run
  as a program, so importing this module defines no flags."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, logs.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  preemption.install()                 # first thing: a SIGTERM from now on stops cleanly
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  try:
    cli.start()
    preemption.check("during start-up (before the config was read); nothing to save")
    config = cli.load_config(workdir)
    final = train_and_evaluate(config, workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e} (exit status {preemption.EXIT_PREEMPTED}; rerun the same command to "
          "resume)", file=sys.stderr, flush=True)
    raise SystemExit(preemption.EXIT_PREEMPTED) from None
  except (NonFiniteError, ValueError, FileNotFoundError) as e:
    cli.fail(e)
  logging.info("final metrics: %s", final)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
