r"""Pretraining loop for CLIP / SigLIP / CoCa: sharded, checkpointed, exactly resumable.

  python -m vlm_jax.train --config configs/shapes_coca.py --workdir runs/shapes_coca \
      [--config.total_steps=2000 --config.mesh.fsdp=4 ...]

What happens:
  * a ('data', 'fsdp', 'tensor') mesh is built from `config.mesh`; the params and the optimizer
    state are created directly sharded (`jax.jit(init, out_shardings=...)`) according to the
    logical axis rules, so FSDP / tensor parallelism are config changes only;
  * every step, each process's batch becomes one global `jax.Array`; the jitted step (state
    donated) computes the loss on the whole global batch (see `vlm_jax.train_state`);
  * checkpoints (Orbax, async) hold params, optimizer state, step, RNG and the data-iterator
    position, and the run resumes from the latest one automatically and exactly;
  * SIGTERM (preemption) saves at the current step and exits cleanly;
  * metrics go to DIR/metrics.jsonl, TensorBoard (DIR/tensorboard) and a progress bar.
"""
from __future__ import annotations

import base64
import dataclasses
import importlib
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags
import optax

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_utils
from vlm_jax import metrics as metrics_lib
from vlm_jax import optim
from vlm_jax import sharding
from vlm_jax import train_state as ts
from vlm_jax.models import build_model

PyTree = Any


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with NaN/Inf loss or gradients."""


# ------------------------------------------------------------------------------------------------
# Set-up pieces (usable on their own by tests, evaluation and inference).


@dataclasses.dataclass
class Setup:
  """Everything derived from the config that the loop (and tests) need."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable
  state_shardings: ts.TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: ts.TrainState     # ShapeDtypeStructs with the target shardings

  def init_state(self) -> ts.TrainState:
    """The initial train state, created directly with its shardings."""
    init = jax.jit(lambda rng: ts.init_train_state(self.model, self.tx, self.config, rng),
                   out_shardings=self.state_shardings)
    with self.context():
      return init(jax.random.key(self.config.seed))

  def context(self):
    """`jax.set_mesh` + Linen logical rules: needed while tracing model code."""
    return _Context(self.mesh, self.rules)

  def make_step(self) -> Callable:
    """The jitted train step: in/out shardings, state donated."""
    step = ts.make_train_step(self.model, self.tx, self.schedule, self.config,
                              batch_sharding=self.batch_sharding)
    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))


class _Context:
  def __init__(self, mesh, rules):
    self._mesh_cm = jax.set_mesh(mesh)
    self._rules_cm = nn.logical_axis_rules(rules)

  def __enter__(self):
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    return self._mesh_cm.__exit__(*exc)


def make_setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Mesh, model, optimizer and the shardings of the train state, from the config."""
  validate_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config)
  model = build_model(config.model)
  images, text = ts.dummy_inputs(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           images, text))["params"]
  param_shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  param_shardings = jax.tree.map(lambda _, s: s, abstract_params, param_shardings)
  tx, schedule = optim.make_optimizer(config, abstract_params)
  replicated = sharding.replicated_sharding(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Moments are sharded like their params; counters etc. replicated.
  # Frozen params (multi_transform) have an empty MaskedNode instead of moments.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shardings = optax.tree_map_params(
      tx, lambda x, s: x if masked(x) else s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  state_shardings = ts.TrainState(
      step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
      nonfinite_total=replicated, nonfinite_streak=replicated)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda: ts.init_train_state(model, tx, config, jax.random.key(0)))
  abstract = ckpt_lib.abstract_with_shardings(abstract, state_shardings)
  return Setup(config=config, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule,
               state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh),
               abstract_state=abstract)


def validate_config(config: ml_collections.ConfigDict):
  """Cheap consistency checks with messages that name the field."""
  n = jax.device_count()
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")
  k = config.grad_accum_steps
  if k < 1 or config.batch_size % k:
    raise ValueError(f"grad_accum_steps={k} must be >= 1 and divide batch_size="
                     f"{config.batch_size}")
  data_devices = n // max(int(config.mesh.tensor), 1) if config.mesh.tensor != -1 else 1
  if (config.batch_size // k) % max(data_devices, 1):
    raise ValueError(f"batch_size/grad_accum_steps = {config.batch_size // k} must be divisible "
                     f"by the {data_devices} data-parallel devices (mesh.data * mesh.fsdp)")
  if config.total_steps < 1:
    raise ValueError(f"total_steps={config.total_steps} must be >= 1")


# ------------------------------------------------------------------------------------------------
# Data and tokenizer.


TOKENIZER_TRAIN_EXAMPLES = 20_000   # captions of this many training examples train a tokenizer


def prepare_data(config):
  """Builds the embedded `shapes` dataset if the config uses it (no download; a no-op when
  prepared). Other TFDS datasets must be prepared beforehand (`tfds build`)."""
  d = config.data
  if d.source == "tfds" and d.name.split(":")[0].startswith("shapes/"):
    from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
    shapes.prepare(d.name.split("/")[1].split(":")[0], d.data_dir)


def _training_captions(config):
  """Captions to train a tokenizer on: the shapes generator's (fast, no images) or those of the
  first TOKENIZER_TRAIN_EXAMPLES records of a random-access training source."""
  d = config.data
  if d.source == "tfds" and d.name.startswith("shapes/"):
    from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.caption_corpus(d.name.split("/")[1].split(":")[0], d.train_split)
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.make_source(d, "train")
  if not getattr(source, "random_access", False):
    raise ValueError(f"tokenizer.model_path: data.source={d.source!r} cannot be sampled to "
                     "train a tokenizer; give a SentencePiece model file")
  texts = []
  for i in range(min(len(source), TOKENIZER_TRAIN_EXAMPLES)):
    texts.extend(source[i].get("captions") or [])
  return texts


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """The run's tokenizer: `tokenizer.model_path` if set, else DIR/tokenizer.model (trained on
  the training captions the first time; a file lock makes concurrent processes agree)."""
  from vlm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  t = config.tokenizer
  if t.kind == "bpe":   # OpenAI CLIP byte-level BPE (vocabulary file)
    if not t.model_path:
      raise ValueError("tokenizer.model_path: tokenizer.kind='bpe' needs the BPE vocabulary file")
    from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
    tok = bpe.load(t.model_path)
  elif t.kind != "sentencepiece":
    raise ValueError(f"tokenizer.kind: unknown tokenizer {t.kind!r}; expected sentencepiece or bpe")
  elif t.model_path:
    tok = tok_lib.Tokenizer.load(t.model_path)
  else:
    tok = tok_lib.get_or_train(os.path.join(workdir, "tokenizer.model"),
                               lambda: _training_captions(config), t.vocab_size)
  if tok.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({tok.vocab_size})")
  if t.context_length != config.model.text.context_length:
    raise ValueError(f"tokenizer.context_length={t.context_length} != "
                     f"model.text.context_length={config.model.text.context_length}")
  return tok


def tokenizer_bytes(tokenizer, config) -> bytes:
  """The serialized tokenizer (SentencePiece proto, or the BPE vocabulary file's bytes)."""
  proto = getattr(tokenizer, "model_proto", None)
  if proto:
    return bytes(proto)
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(config.tokenizer.model_path).read_bytes()


def make_train_data(config, tokenizer, mesh, data_state=None):
  """This process's training batches, as global arrays prefetched onto the devices."""
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(config, tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count())
  if data_state is not None:
    it.set_state(data_state)
  put = lambda b: sharding.make_global_batch({"image": b["image"], "text": b["text"]}, mesh)
  return pipeline.DevicePrefetcher(it, put, size=config.data.prefetch)


def _data_stats(data_iter) -> dict:
  """Skipped-sample counters etc. the pipeline exposes (if any)."""
  out = {f"data/skipped_{k}": float(v) for k, v in data_iter.skipped_counts().items()}
  out["data/skipped"] = float(sum(data_iter.skipped_counts().values()))
  out["data/wait_seconds"] = float(data_iter.pop_wait_seconds())
  return out


# ------------------------------------------------------------------------------------------------
# Preemption.


class _Preemption:
  """SIGTERM -> save at the current step and exit. Single process: our own signal handler;
  multi-process: Orbax / JAX's preemption sync point, so every process stops at the same step."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer):
    self._ckpt = checkpointer
    self._flag = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self._flag.is_set()

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------------
# The loop.


def _run_evals(config, setup: Setup, params, tokenizer) -> dict:
  """Calls `vlm_jax.evals.run_evals` when the evaluation package provides it."""
  try:
    evals = importlib.import_module("vlm_jax.evals")
  except ImportError:
    return {}
  run = getattr(evals, "run_evals", None)
  if run is None:
    return {}
  with setup.context():
    results = run(config, setup.model, params, setup.mesh, tokenizer)
  return {f"eval/{k}" if not str(k).startswith("eval/") else k: v
          for k, v in (results or {}).items()}


def init_params_from(config, setup: Setup, state: ts.TrainState) -> ts.TrainState:
  """Replaces params by those of `config.init_from` (fine-tuning), logging what was not taken."""
  path = os.path.abspath(config.init_from)
  step = None
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit():                              # a step directory .../checkpoints/<step>
    step, path = int(base), os.path.dirname(path)
  elif os.path.isdir(os.path.join(path, "checkpoints")):   # a workdir
    path = os.path.join(path, "checkpoints")
  source = ckpt_lib.Checkpointer(path, read_only=True, async_save=False)
  abstract_params = setup.abstract_state.params
  loaded, messages = source.restore_params(step, abstract_params, skip=config.init_from_skip)
  source.close()
  for m in messages:
    logging.warning("%s", m)
  if not loaded:
    raise ValueError(f"init_from={config.init_from}: no parameter of the model was found in the "
                     "checkpoint")
  flat = ckpt_lib._flatten(state.params)  # pylint: disable=protected-access
  flat.update(loaded)
  params = ckpt_lib._unflatten(flat)  # pylint: disable=protected-access
  params = jax.tree.map(lambda _, v: v, state.params, params)  # original container order
  logging.info("init_from: loaded %d of %d params from %s", len(loaded), len(flat), path)
  return state.replace(params=params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it has a checkpoint) and returns the last metrics."""
  workdir = os.path.abspath(workdir)
  setup = make_setup(config)
  prepare_data(config)
  tokenizer = load_tokenizer(config, workdir)
  config_json = config_utils.config_to_json(config)
  tok_bytes = tokenizer_bytes(tokenizer, config)
  ckpt_lib.write_workdir_files(workdir, config_json, tok_bytes)
  # Checkpoints are self-contained: config and tokenizer travel with them.
  meta = {"config": config_json, "tokenizer_kind": config.tokenizer.kind,
          "tokenizer_model_b64": base64.b64encode(tok_bytes).decode("ascii")}

  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints, async_save=config.async_checkpointing)
  latest = checkpointer.latest_step()
  data_state = None
  if latest is not None:
    state, data_state, _ = checkpointer.restore(latest, setup.abstract_state)
    logging.info("resumed from %s/checkpoints/%d", workdir, latest)
  else:
    state = setup.init_state()
    if config.init_from:
      state = init_params_from(config, setup, state)
  data_iter = make_train_data(config, tokenizer, setup.mesh, data_state)

  step_fn = setup.make_step()
  start = int(jax.device_get(state.step))
  total = int(config.total_steps)
  writer = metrics_lib.MetricWriter(workdir, total_steps=total, initial_step=start,
                                    progress_bar=config.progress_bar)
  flops = metrics_lib.train_flops_per_example(config)
  peak = metrics_lib.device_peak_flops()
  preemption = _Preemption(checkpointer)
  last_metrics: dict = {}
  t0, t0_step = time.time(), start
  step = start

  def save(step_now):
    if jax.device_get(state.nonfinite_streak) >= config.max_consecutive_nonfinite:
      return  # never checkpoint a run that is about to stop on NaNs
    checkpointer.save(step_now, state, data_iter.get_state(), meta)

  try:
    with setup.context():
      while step < total:
        if preemption.reached(step):
          logging.warning("preemption: saving at step %d and exiting", step)
          if checkpointer.latest_step() != step:
            save(step)
          break
        batch = next(data_iter)
        state, step_metrics = step_fn(state, batch)
        step += 1
        writer.advance(step)

        log_now = step % config.log_every_steps == 0 or step == total
        ckpt_now = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        if log_now or ckpt_now:
          streak = int(jax.device_get(state.nonfinite_streak))
          if streak >= config.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{streak} consecutive steps with non-finite loss or gradients (up to step "
                f"{step}; max_consecutive_nonfinite={config.max_consecutive_nonfinite}); "
                f"stopping. The last good checkpoint is step {checkpointer.latest_step()}.")
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
          writer.write(step, m)
          last_metrics = m
          t0, t0_step = time.time(), step
        if ckpt_now:
          save(step)
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total:
          ev = _run_evals(config, setup, state.params, tokenizer)
          if ev:
            writer.write(step, ev)
            last_metrics.update(ev)
      if step >= total:
        if checkpointer.latest_step() != step:
          save(step)
        checkpointer.wait()
        ev = _run_evals(config, setup, state.params, tokenizer)
        if ev:
          writer.write(step, ev)
          last_metrics.update(ev)
  finally:
    preemption.restore()
    data_iter.close()
    checkpointer.close()
    writer.close()
  last_metrics["step"] = step
  return last_metrics


# ------------------------------------------------------------------------------------------------
# Command line.

def define_flags():
  """--config (path.py[:arg], locked, with --config.field=value overrides) and --workdir.
  Defined only when run as a program, so importing this module defines no flags."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file: path.py[:arg]", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, logs.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if sharding.multiprocess_environment() and os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Cross-process collectives on CPU (tests, local multi-process runs) go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  sharding.maybe_initialize_distributed()
  # Data loading must not grab accelerators through TensorFlow.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pylint: disable=broad-except
    pass
  logging.info("JAX: %d processes, %d devices (%s)", jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    final = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except NonFiniteError as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  logging.info("final metrics: %s", final)


if __name__ == "__main__":
  define_flags()
  app.run(main)
