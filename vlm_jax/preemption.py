"""SIGTERM in every phase of a run, and the exit status that tells launchers how it ended.

Exit statuses of `python -m vlm_jax.train` (launchers read these, not log lines):

  EXIT_COMPLETED (0)   total_steps reached, final evaluation done
  EXIT_FAILED (1)      an error (its message is the last line on stderr)
  EXIT_PREEMPTED (75)  stopped on SIGTERM; the newest checkpoint holds the run (rerun the same
                       command to resume). 75 is EX_TEMPFAIL: try again later.

`install()` runs first thing in the trainer's main. A SIGTERM then only sets a flag that the run
looks at where it can stop cleanly (`stop_requested`, `check`): during start-up it stops before
the loop (nothing new to save), during training the loop saves at the current step, during an
evaluation the evaluation stops at its next batch and the step is saved if it is newer than the
newest checkpoint.

Multi-process runs: `jax.distributed` receives SIGTERM itself and the training loop stops every
process at the same step through its preemption sync point (see `vlm_jax.train`). An evaluation
of a multi-process run is not interrupted (the processes would have to agree on the batch to stop
at); it runs to its end first.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_COMPLETED, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 75

_requested = threading.Event()


class Preempted(Exception):
  """SIGTERM arrived; the run stops at a clean point. The message says where."""


def install():
  """SIGTERM sets the stop flag instead of killing the process (main thread only); returns the
  handler it replaced."""
  if threading.current_thread() is threading.main_thread():
    return signal.signal(signal.SIGTERM, lambda *_: _requested.set())
  return None


@contextlib.contextmanager
def handling():
  """`install()` for the duration of a block (a run called as a library function), then the
  previous handler again."""
  previous = install()
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def stop_requested() -> bool:
  return _requested.is_set()


def check(where: str) -> None:
  """Raises Preempted (naming `where`) when a SIGTERM has arrived."""
  if _requested.is_set():
    raise Preempted(f"SIGTERM {where}")


def reset() -> None:
  """Forgets a past request (tests run several phases in one process)."""
  _requested.clear()
