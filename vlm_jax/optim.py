"""Optimizer: AdamW with a weight-decay mask, LR schedules, clipping and freezing (optax).

Parameters are addressed by their '/'-joined path inside the params tree (e.g.
'img/encoder/block_0/mlp/fc1/kernel'); the config's regexes (`optim.no_decay`, `freeze`) are
matched with `re.search` against these paths.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any


def path_str(path) -> str:
  """'/'-joined key path of a pytree leaf ('params/img/.../kernel')."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_paths(tree: PyTree) -> PyTree:
  """Same structure as `tree`, each leaf replaced by its path string (leading 'params/' dropped)."""
  def name(path, _):
    s = path_str(path)
    return s[len("params/"):] if s.startswith("params/") else s
  return jax.tree_util.tree_map_with_path(name, tree)


def regex_mask(params: PyTree, pattern: str | None) -> PyTree:
  """Boolean tree: True where the param path matches `pattern` (all False for '' / None)."""
  if not pattern:
    return jax.tree.map(lambda _: False, params)
  rx = re.compile(pattern)
  return jax.tree.map(lambda p: bool(rx.search(p)), tree_paths(params))


def decay_mask(params: PyTree, no_decay: str | None = "") -> PyTree:
  """True for params that get weight decay: matrices/kernels (ndim >= 2) not matching `no_decay`.

  ndim < 2 covers LayerNorm scales/biases, all biases and the scalar logit scale / bias.
  """
  excluded = regex_mask(params, no_decay)
  return jax.tree.map(lambda p, ex: (jnp.ndim(p) >= 2) and not ex, params, excluded)


SCHEDULES = ("cosine", "rsqrt", "constant")


# A warm-up asked for longer than the run is cut to this fraction of it.
CLAMPED_WARMUP_FRACTION = 0.1


def warmup_steps(config: ml_collections.ConfigDict) -> tuple[int, str | None]:
  """(warm-up steps, a warning or None) of `config.schedule` for `config.total_steps`.

  `schedule.warmup_fraction`, when set, is a fraction of total_steps and wins over
  `schedule.warmup_steps`, so the schedule follows `--config.total_steps=N` alone. A warm-up in
  steps that is longer than the run is clamped to a tenth of it (with the warning): a short
  trial run of a long recipe still reaches its peak learning rate and decays.
  """
  s, total = config.schedule, int(config.total_steps)
  fraction = s.get("warmup_fraction")
  if fraction is not None:
    return int(round(float(fraction) * total)), None
  warmup = int(s.warmup_steps)
  if warmup <= total:
    return warmup, None
  clamped = int(total * CLAMPED_WARMUP_FRACTION)
  return clamped, (f"schedule.warmup_steps={warmup} is longer than total_steps={total}; using "
                   f"{clamped} warm-up steps (a tenth of the run). Set schedule.warmup_steps or "
                   "schedule.warmup_fraction to choose")


def make_schedule(config: ml_collections.ConfigDict) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Learning-rate schedule from `config.optim.lr`, `config.schedule`, `config.total_steps`."""
  s, lr, total = config.schedule, config.optim.lr, config.total_steps
  warmup, _ = warmup_steps(config)
  if s.kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total, warmup + 1),
        end_value=lr * s.end_lr_factor)
  if s.kind == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
        [warmup])
  if s.kind == "rsqrt":
    timescale = s.timescale or max(warmup, 1)
    cooldown = int(s.cooldown_steps)

    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      lr_t = lr * jnp.sqrt(timescale / jnp.maximum(step, timescale))
      lr_t = jnp.where(step < warmup, lr * step / max(warmup, 1), lr_t)
      if cooldown:
        lr_t *= jnp.clip((total - step) / cooldown, 0.0, 1.0)
      return lr_t
    return rsqrt
  raise ValueError(f"schedule.kind: unknown schedule {s.kind!r}; expected one of "
                   f"{', '.join(SCHEDULES)}")


STATISTICS = r"(^|/)(running_mean|running_var)$"     # BatchNorm statistics (models/resnet.py)


def clip_by_given_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping (as `optax.clip_by_global_norm`: updates scaled by max_norm / norm when
  the norm exceeds max_norm) with the norm passed in as the extra argument `grad_norm`.

  The train step computes the gradients' global norm anyway (the non-finite check, the
  `grad_norm` metric); optax's clip would read every gradient again to compute it a second time,
  inside the guarded update where XLA cannot share the two. Without `grad_norm` the norm is
  computed here. No state (like optax's), so checkpoints are the same with either clip.
  """
  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    within = jnp.squeeze(norm < max_norm)
    clip = lambda g: jax.lax.select(within, g, (g / norm.astype(g.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(config: ml_collections.ConfigDict, params: PyTree
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (optimizer, schedule).

  Chain: [global-norm clip] -> AdamW(schedule, masked decay); frozen params (config.freeze) are
  routed to `set_to_zero` by `multi_transform`, so they carry no Adam moments. The clip takes
  the train step's `grad_norm` (`optim.clip_with_step_norm`), except with `freeze`: the step's
  norm covers the frozen gradients too, the clip's only the trained ones.
  """
  o = config.optim
  schedule = make_schedule(config)
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=lambda p: decay_mask(p, o.no_decay))
  parts = []
  if o.grad_clip_norm:
    if o.get("clip_with_step_norm", True) and not config.freeze:
      parts.append(clip_by_given_global_norm(o.grad_clip_norm))
    else:
      parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts.append(adamw)
  tx = optax.chain(*parts)
  # BatchNorm's running statistics are params that no gradient moves (the train step writes
  # them): they take no update, no decay and no moments.
  statistics = regex_mask(params, STATISTICS)
  if config.freeze:
    frozen = regex_mask(params, config.freeze)
    if not any(jax.tree.leaves(frozen)):
      raise ValueError(f"freeze: regex {config.freeze!r} matches no parameter; param paths look "
                       f"like {jax.tree.leaves(tree_paths(params))[:3]}")
    frozen = jax.tree.map(lambda f, s: f or s, frozen, statistics)
  else:
    frozen = statistics
  if any(jax.tree.leaves(frozen)):
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
