"""Orbax checkpointing: async saves, keep-last-k, restore into any mesh, how far saving lags.

Layout of a workdir:
  DIR/checkpoints/<step>/state   the TrainState (params, opt state, step, RNG, counters)
  DIR/checkpoints/<step>/data    JSON: each process's data-iterator state (exact resume)
  DIR/checkpoints/<step>/meta    JSON: the config (as JSON) and the tokenizer path used
  DIR/config.json, DIR/tokenizer.model   for evaluation / inference without the config file

Orbax writes every checkpoint into a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoint as the latest one; leftovers are
removed at the next start (`cleanup_tmp_directories`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax import checkpoint_layout

PyTree = Any


@dataclasses.dataclass
class CheckpointLocation:
  workdir: Optional[str]     # the run directory (config.json, tokenizer.model), if known
  checkpoints: str           # the Orbax CheckpointManager directory
  step: int


def locate(path: str, step: Optional[int] = None, *, field: str = "checkpoint"
           ) -> CheckpointLocation:
  """Resolves a workdir, a `checkpoints/` directory or a `checkpoints/<step>` directory.

  Raises FileNotFoundError naming the path (and `field`, the option it came from) when there is
  no checkpoint (or not that step).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{field}: {path} does not exist or is not a directory")
  base = os.path.basename(path.rstrip("/"))
  workdir = None
  if os.path.isdir(os.path.join(path, "checkpoints")):
    workdir, ckpt_dir = path, os.path.join(path, "checkpoints")
  elif base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    ckpt_dir = os.path.dirname(path)
    if step is not None and int(step) != int(base):
      raise ValueError(f"{field}: {path} is step {base}, but step={step} was asked for")
    step = int(base)
  else:
    ckpt_dir = path
  if workdir is None and os.path.basename(ckpt_dir) == "checkpoints":
    workdir = os.path.dirname(ckpt_dir)
  steps = saved_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"{field}: no checkpoint in {ckpt_dir} (expected step directories "
                            "written by vlm_jax.train or vlm_jax.convert)")
  if step is None:
    step = max(steps)
  elif int(step) not in steps:
    raise FileNotFoundError(f"{field}: step {step} not found in {ckpt_dir}; available steps: "
                            f"{sorted(steps)}")
  return CheckpointLocation(workdir=workdir, checkpoints=ckpt_dir, step=int(step))


def saved_steps(ckpt_dir: str) -> list:
  """The complete checkpoints (step directories with a `state` item) in `ckpt_dir`."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir)
                if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying the TARGET shardings: what restore should produce."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@contextlib.contextmanager
def _without_log_line(prefix: str):
  """Drops the absl log lines starting with `prefix` (a library's routine notice) meanwhile."""
  def keep(record):
    return not str(record.msg).startswith(prefix)
  logger = logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, directory: str, *, save_every_steps: int = 0, keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        # Saves are requested explicitly by the loop (periodic, final, preemption): `force`.
        # Read-only: the values Orbax would otherwise set itself, with a warning each.
        save_interval_steps=0 if read_only else max(int(save_every_steps), 1),
        max_to_keep=None if read_only else keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    # The newest save known to be complete, and the seconds saves have waited for the previous
    # one to finish (saving slower than the checkpoint interval).
    self._finished = None
    self.wait_seconds = 0.0
    with _without_log_line("Given directory is read only"):   # what read_only means
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                         "data": ocp.JsonCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

  # ---- queries -------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # ---- save / restore ------------------------------------------------------------------------
  def finished_step(self) -> int | None:
    """The newest checkpoint whose save is complete (an async save in progress is not)."""
    if not self.manager.is_saving_in_progress():
      self._finished = self.manager.latest_step()
    return self._finished

  def save(self, step: int, state: PyTree, data_state: Any, meta: dict) -> bool:
    """Starts an (async) save of `state` at `step`.

    `data_state` is this process's iterator state; the states of all processes are gathered so
    the (primary-written) JSON holds every process's position. A previous save still in
    progress is waited for first (Orbax would too), with a warning: saving is then slower than
    the checkpoint interval, and the gap a kill would lose must not grow.
    """
    if self.manager.is_saving_in_progress():
      logging.warning("checkpoint: the save of step %s is still being written at step %d; "
                      "waiting for it (saving is slower than the checkpoint interval)",
                      self.manager.latest_step(), step)
      t0 = time.time()
      self.manager.wait_until_finished()
      self.wait_seconds += time.time() - t0
    self._finished = self.manager.latest_step()
    data_states = gather_json(data_state)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({"per_process": data_states}),
        meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, list, dict]:
    """Restores (state, every process's data state in process order, meta) at `step` (latest
    if None). The data states come from the processes that wrote the checkpoint, which may be
    another number than now (`vlm_jax.data.pipeline.resume_state` picks this process's).

    `abstract_state` holds ShapeDtypeStructs with the target shardings, so a checkpoint written
    on one mesh is re-laid-out onto the current one.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    ema = (abstract_state.get("ema_params") if isinstance(abstract_state, dict)
           else getattr(abstract_state, "ema_params", None))
    self._check_ema(step, ema is not None)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored.state, list(restored.data["per_process"]), dict(restored.meta)

  def has_ema(self, step: int) -> bool:
    """Whether the checkpoint at `step` holds EMA params (it was written with ema_decay)."""
    return _ema_in(self.manager.item_metadata(step)["state"])

  def _check_ema(self, step: int, want: bool) -> None:
    have = self.has_ema(step)
    if want and not have:
      raise ValueError(f"checkpoint {self.directory}/{step} has no EMA weights (its run had no "
                       "ema_decay), and this run keeps an EMA (ema_decay is set): resume it "
                       "without --config.ema_decay, or start a new run from it with "
                       "--config.init_from (the average then starts at its params)")
    if have and not want:
      raise ValueError(f"checkpoint {self.directory}/{step} holds EMA weights, and this run has "
                       "no ema_decay: resume with the run's --config.ema_decay (see its "
                       "config.json), or start a new run from it with --config.init_from")

  def restore_params(self, step: int | None, abstract_params: PyTree, *, skip: str = "",
                     field: str = "init_from", ema: bool = False,
                     prefix: str = "") -> tuple[dict, list[str]]:
    """Loads the params present in both this checkpoint and `abstract_params` (ShapeDtypeStructs
    with target shardings), straight into those shardings; `ema`: its EMA params instead.
    With `prefix`, only the params under `prefix/` are wanted (and reported on). Blocks stored
    in the other layout (plain vs scanned, `model.scan`) are converted into the model's, and an
    image tower's position embedding learned for another patch grid is resampled to the model's.

    Returns (restored params by path, messages about what was skipped, missing or unused).
    Shape mismatches raise a ValueError naming every mismatched param, unless the path matches
    `skip`; `field` is the option named in messages.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{field}: no checkpoint in {self.directory}")
    item_key = "ema_params" if ema else "params"
    meta = self.manager.item_metadata(step)["state"]
    if ema and not _ema_in(meta):
      raise ValueError(f"{field}: checkpoint {self.directory}/{step} has no EMA weights (its "
                       "run had no ema_decay); use its params (no --ema / evals.use_ema)")
    saved = flatten(_get(meta, item_key))
    wanted = flatten(abstract_params)
    if prefix:
      under = lambda path: path.startswith(prefix + "/")
      wanted = {p: v for p, v in wanted.items() if under(p)}
      saved = {p: v for p, v in saved.items() if under(p)}
    # A stack of blocks stored in the other layout (plain vs scanned) is read in the checkpoint's
    # layout and converted afterwards: each checkpoint path below feeds one or more model paths.
    relayout = checkpoint_layout.Relayout.plan(saved, wanted)
    targets = relayout.checkpoint_targets(wanted)
    rx = re.compile(skip) if skip else None
    skipped = lambda path: rx is not None and rx.search(path) is not None
    messages, mismatched, target, resample = relayout.messages(field), [], {}, {}
    for path, (want, model_paths) in targets.items():
      if skipped(path) or all(skipped(p) for p in model_paths):
        messages.append(f"{field}: skipped by init_from_skip: {path}")
        continue
      if path not in saved:
        messages.append(f"{field}: missing in checkpoint (kept fresh init): {path}")
        continue
      have = tuple(saved[path].shape)
      if have == tuple(want.shape):
        target[path] = want
        continue
      plan = checkpoint_layout.grid_resample_plan(path, have, tuple(want.shape))
      if plan is None:
        mismatched.append(f"{path}: checkpoint {have} vs model {tuple(want.shape)}")
        continue
      # An image tower's position embedding for another grid: read as stored, resized below.
      resample[path] = plan
      target[path] = jax.ShapeDtypeStruct(have, want.dtype,
                                          sharding=checkpoint_layout.replicated(want.sharding))
      messages.append(f"{field}: {path} resampled from a {plan[1]}x{plan[1]} grid to "
                      f"{plan[2]}x{plan[2]} (antialiased bicubic)")
    for path in saved:
      if path not in targets:
        messages.append(f"{field}: unused checkpoint param: {path}")
    if mismatched:
      raise ValueError(f"{field}: shape mismatch for " + "; ".join(mismatched) +
                       " (set init_from_skip to a regex for params to leave freshly initialised)")
    # Partial restore of only the params we take; everything else in the checkpoint is ignored.
    item = {item_key: unflatten(target)}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    loaded, more = relayout.to_model(flatten(restored.state[item_key]), wanted, field, skipped)
    return checkpoint_layout.resample_grids(loaded, resample, wanted), messages + more

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def init_from_entries(value: str) -> list:
  """[(subtree or "", checkpoint path)] of `config.init_from`: one checkpoint, or comma-separated
  `subtree=checkpoint` entries (see `vlm_jax.runtime.Runtime.init_params_from`)."""
  parts = [p.strip() for p in str(value or "").split(",") if p.strip()]
  entries = []
  for part in parts:
    subtree, sep, where = part.partition("=")
    if not sep:
      if len(parts) > 1:
        raise ValueError(f"init_from: {part!r}: with several checkpoints each entry is "
                         "subtree=checkpoint (e.g. image=runs/clip,lm=runs/gpt2)")
      subtree, where = "", part
    elif not subtree.strip() or not where.strip():
      raise ValueError(f"init_from: {part!r}: expected subtree=checkpoint")
    entries.append((subtree.strip().strip("/"), where.strip()))
  return entries


def _ema_in(state_metadata) -> bool:
  try:
    return _get(state_metadata, "ema_params") is not None
  except (KeyError, AttributeError, TypeError):
    return False


def gather_json(obj: Any) -> list:
  """All processes' JSON-serialisable `obj`, in process order (a collective: call everywhere)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  buf = np.zeros((int(lengths.max()),), np.uint8)
  buf[:data.size] = data
  gathered = multihost_utils.process_allgather(buf)
  return [json.loads(bytes(gathered[i, :int(lengths[i, 0])]).decode())
          for i in range(gathered.shape[0])]


def _get(tree, key):
  return tree[key] if isinstance(tree, dict) or hasattr(tree, "__getitem__") else getattr(tree, key)


def flatten(tree) -> dict:
  """{'a/b/c': leaf} of a nested dict of params (any mapping; arrays are leaves)."""
  return flax.traverse_util.flatten_dict(_plain(tree), sep="/")


def unflatten(flat: dict) -> dict:
  """Inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _plain(tree):
  """Nested plain dicts (Orbax metadata trees and FrozenDicts are mappings of their own types)."""
  if hasattr(tree, "items") and not hasattr(tree, "shape"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def write_workdir_files(workdir: str, config_json: str, tokenizer_model: bytes | None):
  """DIR/config.json and DIR/tokenizer.model, written atomically (primary process only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  files = {"config.json": config_json.encode()}
  if tokenizer_model:
    files["tokenizer.model"] = tokenizer_model
  for name, data in files.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        if f.read() == data:
          continue
    with open(path + ".tmp", "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)
  logging.info("wrote %s/config.json and tokenizer.model", workdir)
