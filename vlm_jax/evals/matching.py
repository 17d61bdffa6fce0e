"""Image-text matching accuracy: every eval image with its own first caption (a positive) and
with the first caption of the image half a batch away (a negative, unless it is the very same
text), scored by the task's 'match_logits' predict function. Deterministic: the pairs depend on
the split's order and the batch size only.

    matching/<ds>/accuracy    (logit > 0) == label, over all pairs
    matching/<ds>/auc         ROC AUC of the logits (ties count one half)
    matching/<ds>/num_pairs
"""
from typing import Dict

import numpy as np

from vlm_jax.data import ops
from vlm_jax.evals import common

PREDICT_FNS = ("match_logits",)


def default_config(**fields):
  c = common.entry_config("matching")
  c.update(fields)
  return c


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  return [(common.eval_data_config(config, entry),
           [ops.Caption(tokenizer, common.text_length(config))])]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """The probability that a random positive scores above a random negative (ties: 1/2)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a dependency of jax)
  pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
  if not len(pos) or not len(neg):
    return float("nan")
  # Mann-Whitney: the positives' rank sum (ties share the average rank), normalised.
  ranks = stats.rankdata(np.concatenate([pos, neg]))
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(ctx: "common.EvalContext", tag: str, entry) -> Dict[str, float]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  who = f"evals: matching on {tag!r}"
  match_logits = ctx.predict_fn("match_logits", who)

  def fn(params, batch):
    text, mask = batch["text"], batch["mask"]
    n = jnp.maximum(jnp.sum(mask), 1)
    other = text[(jnp.arange(text.shape[0]) + n // 2) % n]
    positive = match_logits(params, batch)
    negative = match_logits(params, dict(batch, text=other))
    same = jnp.all(other == text, axis=-1)
    return positive, negative, same, mask

  (data, field_ops), = splits(ctx.config, entry, ctx.tokenizer)
  scores, labels = [], []
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      common.entry_batch_size(ctx.config, entry), who=who):
    positive, negative, same, mask = ctx.call("matching/logits", fn, batch)
    scores += [positive[mask], negative[mask]]
    labels += [np.ones(int(mask.sum())), same[mask].astype(np.float64)]
  if not scores:
    raise ValueError(f"{who}: the split has no example")
  scores, labels = np.concatenate(scores), np.concatenate(labels)
  accuracy = float(np.mean((scores > 0) == (labels > 0.5)))
  return {f"matching/{tag}/accuracy": accuracy, f"matching/{tag}/auc": roc_auc(scores, labels),
          f"matching/{tag}/num_pairs": float(len(scores))}
