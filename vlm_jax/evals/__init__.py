"""Evaluations: zero-shot classification, image-text retrieval, captioning.

`run_evals(config, model, params, mesh, tokenizer, step=None)` runs the entries named in
`config.evals.run` (see `configs.common.evals_config`) and returns one flat dict of metrics:

  zeroshot/<dataset>/{top1, top5, mean_per_class, num_examples}
  retrieval/<dataset>/{i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, num_images, num_captions}
  caption/<dataset>/{bleu1..bleu4, cider, rouge_l, meteor, nll, perplexity, num_images}

It is what the trainer calls at eval steps and what `python -m vlm_jax.evaluate` prints. Every
eval runs sharded over `mesh` (the batch split like training), on the whole split (the last batch
padded and masked), deterministically.
"""
import time
from typing import Dict, Optional

from absl import logging

from vlm_jax.evals import captioning
from vlm_jax.evals import common
from vlm_jax.evals import retrieval
from vlm_jax.evals import zeroshot

EVALUATORS = {
    "zeroshot": zeroshot.evaluate,
    "retrieval": retrieval.evaluate,
    "caption": captioning.evaluate,
}


def entries(config):
  """[(entry name, entry config)] of `config.evals.run`, validated (clear errors for unknown
  names and kinds)."""
  evals = config.get("evals")
  if evals is None:
    return []
  names = [n.strip() for n in str(evals.run or "").split(",") if n.strip()]
  known = sorted(k for k, v in evals.items() if hasattr(v, "get") and "kind" in v)
  out = []
  for name in names:
    if name not in known:
      raise ValueError(f"evals.run: unknown eval {name!r}; expected one of {', '.join(known)}")
    entry = evals[name]
    if entry.kind not in EVALUATORS:
      raise ValueError(f"evals.{name}.kind: unknown eval kind {entry.kind!r}; expected one of "
                       f"{', '.join(EVALUATORS)}")
    out.append((name, entry))
  return out


def run_evals(config, model, params, mesh, tokenizer, step: Optional[int] = None,
              context: Optional[common.EvalContext] = None) -> Dict[str, float]:
  """Runs every eval in `config.evals.run`; returns {metric name: float}.

  Args:
    config: the experiment config (model, data, evals, sharding_rules).
    model: the Linen module (`vlm_jax.models.build_model(config.model)`).
    params: its 'params' collection (unboxed; sharded over `mesh` or not).
    mesh: the device mesh; batches are split over its data-parallel axes.
    tokenizer: the run's `Tokenizer`.
    step: only used in log lines.
    context: an existing EvalContext to reuse (keeps compiled functions across calls; its
      `artifacts` receive the generated captions).
  """
  todo = entries(config)
  ctx = context or _context(config, model, mesh, tokenizer)
  ctx.config, ctx.params, ctx.tokenizer = config, params, tokenizer
  results = {}
  try:
    results = _run(ctx, config, todo, step)
  finally:
    if context is None:
      ctx.params = None   # the cached context must not keep the caller's params alive
  return results


def _run(ctx, config, todo, step):
  results = {}
  for name, entry in todo:
    tag = common.dataset_tag(config, entry)
    t0 = time.time()
    metrics = EVALUATORS[entry.kind](ctx, tag, entry)
    logging.info("eval %s (%s/%s) at step %s took %.1fs: %s", name, entry.kind, tag, step,
                 time.time() - t0, metrics)
    clash = set(metrics) & set(results)
    if clash:
      raise ValueError(f"evals.{name}: metric names {sorted(clash)} are produced twice; give the "
                       "entries different evals.<name>.tag values")
    results.update(metrics)
  return results


# EvalContexts (and so their compiled functions) of recent (model, mesh) pairs: the trainer calls
# run_evals every eval_every_steps with the same model, which must not recompile every time.
_CONTEXTS = []
_MAX_CONTEXTS = 4


def _context(config, model, mesh, tokenizer) -> common.EvalContext:
  for ctx in _CONTEXTS:
    if ctx.model is model and ctx.mesh is mesh:
      ctx.rules = common.sharding.logical_rules(config)
      return ctx
  ctx = common.EvalContext.create(config, model, None, mesh, tokenizer)
  _CONTEXTS.insert(0, ctx)
  del _CONTEXTS[_MAX_CONTEXTS:]
  return ctx


__all__ = ["run_evals", "entries", "EVALUATORS", "captioning", "common", "retrieval", "zeroshot"]
