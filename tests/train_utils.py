"""Helpers shared by the trainer tests: tiny configs on the tiny `shapes` data, subprocess runs."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from vlm_jax import config_utils
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model that compiles and runs in a blink: 1-layer towers of width 32.
_TOWER = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
TOWERS = {"clip": ("image", "text"), "siglip": ("image", "text"),
          "coca": ("image", "text", "decoder"), "captioning": ("image", "decoder"),
          "classify": ("image",), "prefixlm": ("image", "lm"), "bert_mlm": ("text",)}
TRAINER = {"batch_size": 16, "evals.run": "", "progress_bar": False,
           "async_checkpointing": False}


def tiny_overrides(data_dir, tokenizer_path=None, kind="coca", **extra):
  """Overrides of configs/shapes_<kind>.py:tiny for a tiny model on `data_dir`."""
  o = {f"model.{tower}.{k}": v for tower in TOWERS[kind] for k, v in _TOWER.items()}
  if "text" in TOWERS[kind] and "image" in TOWERS[kind]:
    o["model.embed_dim"] = 32
  o.update(TRAINER)
  o["data.data_dir"] = data_dir
  if tokenizer_path:
    o["tokenizer.model_path"] = tokenizer_path
  o.update({k.replace("__", "."): v for k, v in extra.items()})
  return o


def tiny_config(kind, data_dir, tokenizer_path=None, **extra):
  return config_utils.load_config(os.path.join(REPO, f"configs/shapes_{kind}.py:tiny"),
                                  tiny_overrides(data_dir, tokenizer_path, kind, **extra))


def flag_args(overrides):
  return [f"--config.{k}={config_utils._to_flag_string(v)}" for k, v in overrides.items()]  # pylint: disable=protected-access


def train_command(kind, workdir, overrides):
  return [sys.executable, "-m", "vlm_jax.train", f"--config=configs/shapes_{kind}.py:tiny",
          f"--workdir={workdir}", *flag_args(overrides)]


def subprocess_env(num_devices=8, **extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags.cpu_devices(num_devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


def stop_all(procs, files=()):
  """Kills the subprocesses still running and closes their log files (a test's cleanup)."""
  for p in procs:
    if p.poll() is None:
      p.kill()
  for f in files:
    f.close()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def logged(workdir, keys=("loss", "contrastive_loss", "caption_loss")):
  """{step: {key: value}} from DIR/metrics.jsonl; the LAST record of a step wins (a resumed run
  re-logs the steps after its checkpoint)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        out[rec["step"]] = {k: rec[k] for k in keys if k in rec}
  return out


def tree_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  eq = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
  return all(jax.tree.leaves(eq))


def run_steps(config, batches, devices=None):
  """Trains in-process on the given (numpy) global batches; returns (state, metrics per step,
  runtime)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import runtime, sharding  # pylint: disable=g-import-not-at-top
  rt = runtime.Runtime.create(config, devices)
  state = rt.init_state()
  step = rt.make_step()
  history = []
  with rt.context():
    for b in batches:
      state, m = step(state, sharding.make_global_batch(b, rt.mesh))
      history.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, history, rt
