"""Classification accuracy of a model that predicts labels (the classification task's head).

The task's 'classify' predict function gives logits [B, C] for every image of the eval split;
`classification/<dataset>/{top1, top5, mean_per_class, num_examples}` are computed with the
same metric as zero-shot classification (`zeroshot.classification_metrics`).
"""
from typing import Dict

import numpy as np

from vlm_jax.data import ops
from vlm_jax.evals import common
from vlm_jax.evals import zeroshot


PREDICT_FNS = ("classify",)


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  del tokenizer
  return [(common.eval_data_config(config, entry), [ops.Label()])]


def default_config(**fields):
  c = common.entry_config("classification")
  c.ks = (1, 5)
  c.update(fields)
  return c


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  who = f"evals: classification on {tag!r}"
  classify = ctx.predict_fn("classify", who)
  fn = lambda p, b: (classify(p, b), b["label"], b["mask"])
  (data, field_ops), = splits(ctx.config, eval_config)
  all_logits, all_labels = [], []
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      common.entry_batch_size(ctx.config, eval_config), who=who):
    logits, labels, mask = ctx.call("classification/logits", fn, batch)
    all_logits.append(logits[mask])
    all_labels.append(labels[mask])
  logits = np.concatenate(all_logits) if all_logits else np.zeros((0, 1), np.float32)
  labels = np.concatenate(all_labels) if all_labels else np.zeros((0,), np.int64)
  if labels.size and labels.min() < 0:
    raise ValueError(f"{who}: the split has examples without a label (-1); set the entry's "
                     "label_key")
  metrics = zeroshot.classification_metrics(logits, labels, ks=tuple(eval_config.ks))
  metrics["num_examples"] = float(labels.size)
  return {f"classification/{tag}/{k}": v for k, v in metrics.items()}
