"""Training metrics: JSON lines, TensorBoard events, a console progress bar, and device peaks.

Only the primary process writes. Values are pulled to the host only at log steps, so logging adds
no per-step device synchronisation. Training FLOPs per example come from the task
(`Task.train_flops_per_example`: 3 x the forward matmul FLOPs of its towers, causal attention
counted at half); MFU divides the measured TFLOP/s by the device's peak below.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax

# Peak dense bf16 FLOP/s per device (chip), from vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,    # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,    # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,           # SXM
    "H200": 989e12,
}


def device_peak_flops(device=None) -> float | None:
  """Peak bf16 FLOP/s of `device` (default: the first local device), None if unknown (CPU)."""
  kind = (device or jax.local_devices()[0]).device_kind
  # Longest key first, so 'TPU v5 lite' wins over 'TPU v5'.
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in kind.lower():
      return PEAK_FLOPS[key]
  return None


class MetricWriter:
  """metrics.jsonl + TensorBoard + tqdm progress bar (primary process only)."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
               progress_bar: bool = True, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from flax.metrics import tensorboard as tb  # pylint: disable=g-import-not-at-top
      self._tb = tb.SummaryWriter(os.path.join(workdir, "tensorboard"), auto_flush=False)
    if progress_bar:
      import tqdm
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                            file=sys.stderr, desc="train", unit="step")

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    clean = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v) if not isinstance(v, str) else v
      clean[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else None
    self._jsonl.write(json.dumps(clean) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if k != "step" and isinstance(v, float):
          self._tb.scalar(k, v, int(step))
      self._tb.flush()
    if self._bar is not None:
      short = {k: f"{clean[k]:.4g}" for k in ("loss", "lr") if isinstance(clean.get(k), float)}
      self._bar.set_postfix(short, refresh=False)

  def advance(self, step: int):
    """Moves the progress bar to `step` (cheap; called every step)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All JSON lines of DIR/metrics.jsonl (tests, demo)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
