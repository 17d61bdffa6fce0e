"""SIGTERM in every phase of a run, and the exit status that tells launchers how it ended.

Exit statuses of `python -m vlm_jax.train` (launchers read these, not log lines):

  EXIT_COMPLETED (0)   total_steps reached, final evaluation done
  EXIT_FAILED (1)      an error (its message is the last line on stderr)
  EXIT_PREEMPTED (75)  stopped on SIGTERM; the newest checkpoint holds the run (rerun the same
                       command to resume). 75 is EX_TEMPFAIL: try again later.

`install()` runs first thing in the trainer's main. A SIGTERM then only sets a flag that the run
looks at where it can stop cleanly (`reached`, `check`): during start-up it stops before
the loop (nothing new to save), during training the loop saves at the current step, during an
evaluation the evaluation stops at its next batch and the step is saved if it is newer than the
newest checkpoint.

Multi-process runs: `jax.distributed` receives SIGTERM itself (the notice reaches every process),
and the stop points (`reached`) go through JAX's preemption sync point, so that every process
stops at the same training step or evaluation batch. A SIGTERM during their start-up is kept for
the first stop point (the first step boundary), where the run stops without a new checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_COMPLETED, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 75

_requested = threading.Event()
_watching = threading.Event()      # set while a run handles SIGTERM (see `handling`)
_sync_points = [0]                 # stop points passed (multi-process: their sequence number)


class Preempted(Exception):
  """SIGTERM arrived; the run stops at a clean point. The message says where."""


def install():
  """SIGTERM sets the stop flag instead of killing the process (main thread, one process: with
  several, `jax.distributed` has its own SIGTERM handler, which must stay); returns the handler
  it replaced."""
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  if (threading.current_thread() is threading.main_thread()
      and not sharding.multiprocess_environment()):
    return signal.signal(signal.SIGTERM, lambda *_: _requested.set())
  return None


@contextlib.contextmanager
def handling():
  """SIGTERM handled for the duration of a run (`install()`, then the previous handler again),
  and its stop points active (`reached`)."""
  previous = install()
  _watching.set()
  try:
    yield
  finally:
    _watching.clear()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def reached() -> bool:
  """Whether to stop at this point: a training step boundary or an evaluation batch, passed in
  the same order by every process. One process: a SIGTERM has arrived. Several: JAX's preemption
  sync point, which every process reaches at the same stop point once any of them got the notice
  (the points are numbered in the order they are passed, one increasing sequence for training
  steps and evaluation batches alike). False outside a run (`handling`)."""
  if not _watching.is_set():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return _requested.is_set()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  _sync_points[0] += 1
  return multihost_utils.reached_preemption_sync_point(_sync_points[0])


def check(where: str) -> None:
  """Raises Preempted (naming `where`) when a SIGTERM has arrived."""
  if _requested.is_set():
    raise Preempted(f"SIGTERM {where}")
