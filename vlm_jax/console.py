"""What a command shows on the console: its own log lines, progress bars, and little else.

`quiet_logs()` (called by every command, `vlm_jax.cli.run`) keeps the libraries' INFO lines
(Orbax, TFDS, JAX, grain) off the console unless `--verbose`: vlm_jax's own INFO lines and every
library's WARNING and ERROR lines still show. Many of those libraries log through absl, so the
logger name does not tell them apart; the file that logged does. Log lines are written around the
progress bars (`tqdm.external_write_mode`), never through them.

`bar(...)` is a tqdm bar on the primary process (and nothing elsewhere or when disabled).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_STATE = {"installed": False, "verbose": False}


class _LibraryInfoFilter(logging.Filter):
  """Passes WARNING and above, and INFO / DEBUG only from vlm_jax or the program's own file."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or _STATE["verbose"]:
      return True
    path = os.path.abspath(record.pathname or "")
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return path.startswith(_PACKAGE_DIR) or (main is not None and path == os.path.abspath(main))


def quiet_logs(verbose: bool = False) -> None:
  """Filters library INFO lines from the log handlers (absl's and the root logger's) unless
  `verbose`, and writes log lines around active progress bars. Safe to call again."""
  _STATE["verbose"] = verbose
  if _STATE["installed"]:
    return
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_handler = absl_logging.get_absl_handler()
  # absl's handler hands each record to its python_handler's `handle`, bypassing its own filters.
  handlers = {absl_handler.python_handler, *logging.getLogger().handlers} - {absl_handler}
  for handler in handlers:
    handler.addFilter(_LibraryInfoFilter())
    _write_around_bars(handler)
  _STATE["installed"] = True


def _write_around_bars(handler: logging.Handler) -> None:
  import tqdm  # pylint: disable=g-import-not-at-top
  emit = handler.emit

  def emit_around_bars(record):
    with tqdm.tqdm.external_write_mode(file=sys.stderr):
      emit(record)
  handler.emit = emit_around_bars


def bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
        unit: str = "it", enabled: bool = True, leave: bool = True):
  """A tqdm bar over `iterable` on the primary process; elsewhere, or not `enabled`, the iterable
  itself (or a bar that shows nothing)."""
  import jax  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  show = enabled and jax.process_index() == 0
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, leave=leave,
                   dynamic_ncols=True, file=sys.stderr)
