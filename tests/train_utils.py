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
TINY = {
    "model.embed_dim": 32,
    "model.image.width": 32, "model.image.depth": 1, "model.image.num_heads": 2,
    "model.image.mlp_dim": 64,
    "model.text.width": 32, "model.text.depth": 1, "model.text.num_heads": 2,
    "model.text.mlp_dim": 64,
    "model.decoder.width": 32, "model.decoder.depth": 1, "model.decoder.num_heads": 2,
    "model.decoder.mlp_dim": 64,
    "batch_size": 16,
    "evals.run": "",
    "progress_bar": False,
    "async_checkpointing": False,
}


def tiny_overrides(data_dir, tokenizer_path=None, **extra):
  o = dict(TINY)
  o["data.data_dir"] = data_dir
  if tokenizer_path:
    o["tokenizer.model_path"] = tokenizer_path
  o.update({k.replace("__", "."): v for k, v in extra.items()})
  return o


def tiny_config(kind, data_dir, tokenizer_path=None, **extra):
  return config_utils.load_config(os.path.join(REPO, f"configs/shapes_{kind}.py:tiny"),
                                  tiny_overrides(data_dir, tokenizer_path, **extra))


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
  setup)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import sharding, train  # pylint: disable=g-import-not-at-top
  setup = train.make_setup(config, devices)
  state = setup.init_state()
  step = setup.make_step()
  history = []
  with setup.context():
    for b in batches:
      state, m = step(state, sharding.make_global_batch(b, setup.mesh))
      history.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, history, setup
