"""The pure train step: the task's loss as a parameter, gradient accumulation, the NaN guard.

`make_train_step(objective, tx, schedule, ...)` returns `train_step(state, batch) ->
(state, metrics)` for any task's `Objective` (`vlm_jax.tasks.base`); `vlm_jax.runtime` jits it
with the mesh's shardings. Batches are dicts of named global arrays, split over the batch.

Gradient accumulation (k = grad_accum_steps micro-batches), GradCache (Gao et al. 2021), written
once for every objective. The loss is L = sum_t w_t * term_t, where a global term (a contrastive
loss) is a function of per-example outputs E of the WHOLE batch, and a local term is
S_t / N_t, a sum over examples divided by a count that does not depend on the params. Summing
micro-batch gradients of micro-batch losses would give another objective (every image is
contrasted with every text of the big batch, and a temperature's gradient would count k times,
open_clip's accumulation has both problems). Instead:
  1. run the k micro-batches without gradients: E (per-example outputs concatenated, shared
     scalars from the first) and the counts N_t;
  2. differentiate the global terms w.r.t. E: G = dL/dE (cheap: e.g. the B x B logits);
     dL/dS_t = w_t / N_t;
  3. per micro-batch j, recompute the forward pass with gradients and back-propagate the
     surrogate <E_j, G_j> + <shared_j, G_shared> / k + sum_t (w_t / N_t) * S_t,j; the sum over j
     is exactly dL/dparams of the big batch.
Memory: one micro-batch of activations plus the per-example outputs E; compute: one extra
forward pass. The logged loss and metrics come from `Objective.combine`, as with k = 1. Exact up
to floating point when the forward pass is deterministic (dropout draws other masks per
micro-batch than over the whole batch).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from vlm_jax.train_state import TrainState, ema_decay_at

# The output key under which a forward pass reports new running statistics
# (`tasks.base.apply_train`).
STATS_KEY = "_stat_updates"

PyTree = Any


GUARDS = ("cond", "select")


def merge_stats(params: PyTree, stats: PyTree) -> PyTree:
  """`params` with the leaves that `stats` (a sub-tree with the same nesting: the new running
  statistics of BatchNorm layers, `base.STATS_KEY`) names replaced by its values."""
  if isinstance(stats, Mapping):
    return {k: merge_stats(v, stats[k]) if k in stats else v for k, v in params.items()}
  return jnp.asarray(stats, params.dtype)


def loss_and_grads_fn(objective, grad_accum_steps: int = 1, batch_sharding=None) -> Callable:
  """(params, batch, rng) -> (loss, metrics, grads, stats) of `objective` on the whole batch,
  computed in one pass (k = 1) or by GradCache accumulation over k micro-batches (see the module
  docstring). `stats`: the new running statistics the forward pass reported (BatchNorm; `{}`
  for a model without); under accumulation, their mean over the micro-batches (each micro-batch
  is normalised with its own statistics). `batch_sharding`: NamedSharding of the batch
  dimension, used to keep each micro-batch spread over all devices."""
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f"grad_accum_steps={k} must be >= 1")

  def single(params, batch, rng):
    def loss_fn(p):
      out = objective.forward(p, batch, rng)
      loss, metrics = objective.loss(out, batch)
      return loss, (metrics, out.get(STATS_KEY, {}))
    (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads, stats

  def split(x):
    # Micro-batch j = examples j, j+k, j+2k, ...: with the batch sharded in contiguous blocks,
    # each micro-batch stays spread over every device.
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    if batch_sharding is not None:
      spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
      x = jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
    return x

  def merge(x):  # inverse of split, for [k, m, ...] -> [B, ...]
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])

  def accumulated(params, batch, rng):
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % k:
      raise ValueError(f"grad_accum_steps={k} does not divide the batch of {size}")
    micro = jax.tree.map(split, batch)
    rngs = lambda j: jax.random.fold_in(rng, j)
    js = jnp.arange(k)

    # 1. Per-example outputs of the whole batch and the local terms' counts, no gradients.
    def pre(_, inputs):
      mb, j = inputs
      out = objective.forward(params, mb, rngs(j))
      counts = {n: c for n, (_, c) in objective.local_values(out, mb).items()}
      return None, ({key: out[key] for key in objective.global_keys}, counts,
                    out.get(STATS_KEY, {}))
    _, (outputs, counts, stats) = jax.lax.scan(pre, None, (micro, js))
    stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    shared = {key: v[0] for key, v in outputs.items() if v.ndim == 1}   # [k] scalars
    per_example = {key: merge(v) for key, v in outputs.items() if v.ndim > 1}
    everything = {**per_example, **shared}
    counts = {n: jnp.sum(c) for n, c in counts.items()}

    # 2. The global terms and their gradient w.r.t. the outputs they read (the local terms
    # enter linearly, so their sums can stand at zero here).
    zero_sums = {n: jnp.float32(0.0) for n in counts}

    def global_loss(e):
      values = objective.global_values(e, batch)
      return objective.combine(values, zero_sums, counts, e)[0], values
    if objective.global_terms is not None:
      (_, global_values), g = jax.value_and_grad(global_loss, has_aux=True)(everything)
    else:
      global_values, g = {}, {}
    g_example = {key: split(g[key]) for key in per_example}
    local_weight = {n: objective.weights[n] / jnp.maximum(c, 1.0)
                    for n, c in counts.items() if n in objective.weights}

    # 3. Per micro-batch: recompute with gradients against the cached gradients.
    def micro_grads(grads_acc, inputs):
      mb, j, g_mb = inputs

      def surrogate(p):
        out = objective.forward(p, mb, rngs(j))
        total = jnp.float32(0.0)
        for key in per_example:
          total += jnp.vdot(out[key], g_mb[key])
        if shared:
          total += sum(out[key] * g[key] for key in shared) / k
        local = objective.local_values(out, mb)
        for name, weight in local_weight.items():
          total += weight * local[name][0]
        return total, {n: s for n, (s, _) in local.items()}

      (_, sums), grads = jax.value_and_grad(surrogate, has_aux=True)(params)
      return jax.tree.map(jnp.add, grads_acc, grads), sums

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, sums = jax.lax.scan(micro_grads, zeros, (micro, js, g_example))
    sums = {n: jnp.sum(s) for n, s in sums.items()}
    loss, metrics = objective.combine(global_values, sums, counts, shared)
    return loss, metrics, grads, stats

  return single if k == 1 else accumulated


def make_train_step(objective, tx: optax.GradientTransformation, schedule: Callable, *,
                    grad_accum_steps: int = 1, batch_sharding=None,
                    ema_decay: float | None = None, ema_warmup: bool = True,
                    guard: str = "cond"
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  objective: the task's `Objective` (forward pass and loss terms).
  ema_decay: with a state holding `ema_params`, their decay (`train_state.ema_decay_at`); a
    skipped (non-finite) step leaves them untouched like the params.
  guard: how a non-finite step is skipped. 'cond' (default): the optimizer update runs inside
    `lax.cond`, only when the loss and gradients are finite, and writes params, moments and EMA
    in place of the donated ones. 'select' (the reference): the update always runs and
    `jnp.where` keeps the old values, which makes XLA copy every moment each step (the select
    reads the old moments while the new ones are written into the donated buffers).
  metrics: float32 scalars: the loss and its terms, the objective's logged outputs, grad and
  param norms, the learning rate, and the non-finite counters.
  """
  loss_and_grads = loss_and_grads_fn(objective, grad_accum_steps, batch_sharding)
  tx = optax.with_extra_args_support(tx)     # any optax transform takes (and may ignore) grad_norm
  if guard not in GUARDS:
    raise ValueError(f"guard {guard!r}: expected one of {', '.join(GUARDS)}")

  def update(params, opt_state, ema, grads, grad_norm, stats, updates_before):
    """(new params, new optimizer state, new EMA) of one applied update; `stats` (new running
    statistics, kept out of the optimizer) replace theirs."""
    # The global norm goes to the clip (`optim.clip_by_given_global_norm`); other transforms
    # ignore it.
    updates, new_opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
    new_params = merge_stats(optax.apply_updates(params, updates), stats)
    if ema is not None:
      if ema_decay is None:
        raise ValueError("the train state holds EMA params but no ema_decay was given")
      d = ema_decay_at(ema_decay, updates_before, ema_warmup)
      ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, new_params)
    return new_params, new_opt_state, ema

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, grads, stats = loss_and_grads(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves params, optimizer state and EMA untouched (and is counted).
    old = (state.params, state.opt_state, state.ema_params)
    updates_before = state.step - state.nonfinite_total   # steps taken minus steps skipped
    if guard == "cond":
      new_params, new_opt_state, ema = jax.lax.cond(
          finite, lambda o, g: update(*o, *g, updates_before), lambda o, g: o, old,
          (grads, grad_norm, stats))
    else:
      new = update(*old, grads, grad_norm, stats, updates_before)
      new_params, new_opt_state, ema = jax.tree.map(
          lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = 1 - finite.astype(jnp.int32)
    new_state = state.replace(
        ema_params=ema,
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        nonfinite_total=state.nonfinite_total + skipped,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    # The optimizer's schedule counts the updates it applied: a skipped step keeps its state,
    # count included. So the rate this step used is at (steps taken - steps skipped).
    lr = schedule(state.step - state.nonfinite_total)
    metrics.update(grad_norm=grad_norm, lr=jnp.asarray(lr, jnp.float32),
                   param_norm=optax.tree.norm(new_state.params),
                   nonfinite_total=new_state.nonfinite_total.astype(jnp.float32),
                   nonfinite_streak=new_state.nonfinite_streak.astype(jnp.float32))
    return new_state, metrics

  return train_step
