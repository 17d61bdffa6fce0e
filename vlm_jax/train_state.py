"""The train state: params, optimizer state, step, RNG, the non-finite counters and (with
`config.ema_decay`) an exponential moving average of the params."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: number of train steps taken (incl. skipped ones)
  params: PyTree                  # the model's 'params' collection (unboxed)
  opt_state: PyTree
  rng: jax.Array                  # uint32 [2]: raw key data (checkpoint-friendly)
  nonfinite_total: jax.Array      # int32: steps skipped because loss/grads were NaN/Inf
  nonfinite_streak: jax.Array     # int32: ... of which the most recent ones in a row
  ema_params: PyTree = None       # EMA of params (same tree and shardings), or None without EMA

  def as_dict(self) -> dict:
    return {f: getattr(self, f) for f in self.__dataclass_fields__}

  @classmethod
  def from_dict(cls, d: dict) -> "TrainState":
    return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def init_train_state(init_params, tx: optax.GradientTransformation, rng: jax.Array, *,
                     ema: bool = False) -> TrainState:
  """Initial state; `init_params(rng)` returns the model's (boxed) params; `ema`: keep an EMA of
  them, starting at the initial params. Jit it with `out_shardings` so that everything is
  created already sharded."""
  params_rng, state_rng = jax.random.split(rng)
  params = flax.linen.unbox(init_params(params_rng))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=jax.random.key_data(state_rng) if jnp.issubdtype(state_rng.dtype, jax.dtypes.prng_key)
      else state_rng,
      nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_streak=jnp.zeros((), jnp.int32),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_decay_at(decay: float, updates: jax.Array, warmup: bool) -> jax.Array:
  """The EMA decay after `updates` applied updates: `decay`, or with warm-up
  min(decay, (1 + n) / (10 + n)) (the schedule of TensorFlow's ExponentialMovingAverage with
  num_updates), so the average does not drag the random initialisation along for long."""
  decay = jnp.float32(decay)
  if not warmup:
    return decay
  n = updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
