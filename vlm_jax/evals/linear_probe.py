"""Linear probe: a regularised linear classifier on frozen image features.

The task's 'image_features' predict function (the image tower's pooled output, before any
projection or head) embeds the first `max_train_examples` images of the training split and
every image of the eval split. A ridge classifier (least squares onto one-hot targets, features
standardised with the training statistics, an intercept) is fitted in closed form, in the manner
of big_vision's few-shot evaluator: one eigendecomposition of the feature covariance gives the
solution for every L2 strength at once. The strength is chosen on a held-out `holdout_fraction`
of the training features (a seeded split), then the classifier is refitted on all of them and
scored on the eval split. Metrics: `linear_probe/<dataset>/{top1, l2, num_train, num_test}`.

`fit_ridge` / `ridge_predict` are pure numpy (float64) and tested against a direct solve.
"""
from typing import Dict, Sequence

import numpy as np

from vlm_jax.data import ops
from vlm_jax.evals import common

DEFAULT_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


PREDICT_FNS = ("image_features",)


def splits(config, entry, tokenizer=None):
  """[(training-side data config, field ops), (eval-side data config, field ops)]."""
  del tokenizer
  train = _train_side(common.eval_data_config(
      config, entry, split=entry.train_split or config.data.train_split))
  return [(train, [ops.Label()]), (common.eval_data_config(config, entry), [ops.Label()])]


def check(config, entry) -> list:
  """Problems with the entry's own fields."""
  del config
  problems = []
  if not 0.0 <= entry.holdout_fraction < 1.0:
    problems.append(f"holdout_fraction: {entry.holdout_fraction} must be in [0, 1)")
  if not entry.l2_regs or any(l2 < 0 for l2 in entry.l2_regs):
    problems.append(f"l2_regs: {tuple(entry.l2_regs)} must be non-empty and >= 0")
  return problems


def default_config(**fields):
  c = common.entry_config("linear_probe")
  c.train_split = common.placeholder(str)   # TFDS split to fit on (None: data.train_split)
  c.max_train_examples = 10_000    # the first N of the training split (None: all of it)
  c.holdout_fraction = 0.2         # of the training features, to choose the L2 strength
  c.l2_regs = DEFAULT_L2           # L2 strengths tried (on standardised features)
  c.seed = 0                       # of the held-out split
  c.update(fields)
  return c


def fit_ridge(features, labels, num_classes: int, l2_regs: Sequence[float]):
  """Ridge classifiers for every strength in `l2_regs`.

  Minimises (1/N) ||X W + b - Y||^2 + l2 ||W||^2 with X the standardised features [N, D] and Y
  the one-hot labels [N, C]. Returns (mean, scale, [W per l2], b) for `ridge_predict`.
  """
  x = np.asarray(features, np.float64)
  y = np.eye(num_classes)[np.asarray(labels)]
  mean = x.mean(axis=0)
  scale = x.std(axis=0) + 1e-8
  x = (x - mean) / scale
  n = x.shape[0]
  y_mean = y.mean(axis=0)
  cov = x.T @ x / n
  xty = x.T @ (y - y_mean) / n
  evals, evecs = np.linalg.eigh(cov)
  projected = evecs.T @ xty
  weights = [evecs @ (projected / (np.maximum(evals, 0.0) + l2)[:, None]) for l2 in l2_regs]
  return mean, scale, weights, y_mean


def ridge_predict(features, mean, scale, weight, bias) -> np.ndarray:
  """Class scores [N, C] of a classifier from `fit_ridge`."""
  x = (np.asarray(features, np.float64) - mean) / scale
  return x @ weight + bias


def linear_probe_top1(train_x, train_y, test_x, test_y, num_classes: int,
                      l2_regs: Sequence[float], holdout_fraction: float, seed: int = 0
                      ) -> Dict[str, float]:
  """Chooses the L2 strength on held-out training features, refits on all, scores the test set."""
  n = len(train_y)
  order = np.random.default_rng(seed).permutation(n)
  held = int(round(n * holdout_fraction))
  best_l2 = l2_regs[0]
  if held and n - held >= 2 and len(l2_regs) > 1:
    fit_idx, val_idx = order[held:], order[:held]
    mean, scale, weights, bias = fit_ridge(train_x[fit_idx], train_y[fit_idx], num_classes,
                                           l2_regs)
    accs = [np.mean(np.argmax(ridge_predict(train_x[val_idx], mean, scale, w, bias), 1)
                    == train_y[val_idx]) for w in weights]
    best_l2 = l2_regs[int(np.argmax(accs))]   # ties: the weakest regularisation listed first
  mean, scale, (weight,), bias = fit_ridge(train_x, train_y, num_classes, [best_l2])
  pred = np.argmax(ridge_predict(test_x, mean, scale, weight, bias), axis=1)
  return {"top1": float(np.mean(pred == test_y)) if len(test_y) else float("nan"),
          "l2": float(best_l2)}


def _train_side(data):
  """The data config reading the training split's files as the split to evaluate."""
  field = {"wds": "shards", "jsonl": "jsonl", "imagefolder": "folder"}.get(data.source)
  if field:
    data[f"eval_{field}"] = data.get(f"train_{field}")
  return data


def _features(ctx, data, limit, who, batch_size):
  features = ctx.predict_fn("image_features", who)
  fn = lambda p, b: (features(p, b), b["label"], b["mask"])
  xs, ys, count = [], [], 0
  for batch in common.iterate_batches(ctx, data, [ops.Label()], batch_size, who=who):
    x, y, mask = ctx.call("linear_probe/features", fn, batch)
    xs.append(x[mask])
    ys.append(y[mask])
    count += int(mask.sum())
    if limit and count >= limit:
      break
  x = np.concatenate(xs)[:limit or None] if xs else np.zeros((0, 1), np.float32)
  y = np.concatenate(ys)[:limit or None] if ys else np.zeros((0,), np.int64)
  if y.size and y.min() < 0:
    raise ValueError(f"{who}: split {data.eval_split!r} has examples without a label (-1); set "
                     "the entry's label_key")
  return x, y


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  who = f"evals: linear probe on {tag!r}"
  batch_size = common.entry_batch_size(ctx.config, eval_config)
  (train_data, _), (test_data, _) = splits(ctx.config, eval_config)
  train_x, train_y = _features(ctx, train_data, eval_config.max_train_examples, who, batch_size)
  test_x, test_y = _features(ctx, test_data, None, who, batch_size)
  if len(train_y) < 2:
    raise ValueError(f"{who}: only {len(train_y)} labelled training examples")
  num_classes = int(max(train_y.max(), test_y.max() if test_y.size else 0)) + 1
  metrics = linear_probe_top1(train_x, train_y, test_x, test_y, num_classes,
                              tuple(eval_config.l2_regs), float(eval_config.holdout_fraction),
                              int(eval_config.seed))
  metrics["num_train"] = float(len(train_y))
  metrics["num_test"] = float(len(test_y))
  return {f"linear_probe/{tag}/{k}": v for k, v in metrics.items()}
