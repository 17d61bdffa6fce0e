"""Device prefetch: the next batches put on the devices from a background thread, while the
current step runs."""
import queue
import threading
import time
from typing import Any, Callable

_END = object()


class DevicePrefetcher:
  """Puts the next `size` batches of `iterator` (a `vlm_jax.data.pipeline.DataIterator`) on
  device from a background thread.

  `put` maps a numpy batch to device arrays (e.g. `jax.make_array_from_process_local_data` with
  the batch sharding). `wait_seconds` accumulates the time the consumer blocked on input; read and
  reset it per logging interval with `pop_wait_seconds()` ('time waiting on input'). The state
  (`get_state`) and skip counts are those of the last batch handed to the consumer, not of the
  batches prefetched beyond it, so checkpoints stay exact.
  """

  def __init__(self, iterator, put: Callable[[dict], Any], size: int = 2):
    self._it, self._put, self._size = iterator, put, max(1, int(size))
    self._state = iterator.get_state()
    self._skipped = iterator.skipped_counts()
    self.wait_seconds = 0.0
    self._start()

  def _start(self):
    self._queue = queue.Queue(maxsize=self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, daemon=True, name="device-prefetch")
    self._thread.start()

  def _work(self):
    try:
      for batch in self._it:
        item = (self._put(batch), self._it.get_state(), self._it.skipped_counts())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put(_END)
    except Exception as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - t0
    if item is _END:
      self._queue.put(_END)
      raise StopIteration
    if isinstance(item, Exception):
      raise item
    batch, self._state, self._skipped = item
    return batch

  def pop_wait_seconds(self):
    wait, self.wait_seconds = self.wait_seconds, 0.0
    return wait

  def skipped_counts(self):
    return dict(self._skipped)

  def get_state(self):
    return self._state

  def _halt(self):
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
    self._thread.join()

  def set_state(self, state):
    self._halt()
    self._it.set_state(state)
    self._state, self._skipped = self._it.get_state(), self._it.skipped_counts()
    self._start()

  def close(self):
    self._halt()
    self._it.close()
