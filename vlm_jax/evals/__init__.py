"""Evaluations: zero-shot classification, retrieval, captioning, classification, linear probe.

Each evaluator is a module with `default_config()` (its entry's fields) and
`evaluate(ctx, tag, entry) -> {metric: float}`; it reads the model only through the task's
predict functions (`ctx.predict_fn(name)`, see `vlm_jax.evals.common.EvalContext`):

  kind            predict functions              metrics
  zeroshot        encode_images, encode_texts    zeroshot/<ds>/{top1, top5, mean_per_class}
  retrieval       encode_images, encode_texts    retrieval/<ds>/{i2t,t2i}_r{1,5,10}
  caption         generate, caption_nll          caption/<ds>/{bleu1..4, cider, rouge_l, ...}
  classification  classify                       classification/<ds>/{top1, top5, ...}
  linear_probe    image_features                 linear_probe/<ds>/{top1, l2}
  vqa             answer                         vqa/<ds>/{accuracy, accuracy_<answer type>}
  masked_lm       mlm_logits                     masked_lm/<ds>/{accuracy, loss, num_masked}
  matching        match_logits                   matching/<ds>/{accuracy, auc, num_pairs}

`config.evals` holds named entries (`evals_config`); `evals.run` picks which run
(comma-separated), or is 'auto' (the default): the task's own evaluations (`Task.default_evals`)
that the data supports. Before training, an 'auto' evaluation whose data lacks what it reads
(class names for zero-shot, captions for retrieval) is skipped with a warning and `evals.run`
becomes the list that runs; an evaluation named in `evals.run` fails instead. The trainer runs them every `eval_every_steps` and at the end;
`python -m vlm_jax.evaluate` runs them on a checkpoint. A new evaluator is a module here plus one
line in `EVALUATORS`.
"""
import time
from typing import Dict, Optional

from absl import logging
import ml_collections

from vlm_jax.evals import captioning
from vlm_jax.evals import classification
from vlm_jax.evals import common
from vlm_jax.evals import linear_probe
from vlm_jax.evals import masked_lm
from vlm_jax.evals import matching
from vlm_jax.evals import retrieval
from vlm_jax.evals import vqa
from vlm_jax.evals import zeroshot

EVALUATORS = {
    "zeroshot": zeroshot,
    "retrieval": retrieval,
    "caption": captioning,
    "classification": classification,
    "linear_probe": linear_probe,
    "vqa": vqa,
    "masked_lm": masked_lm,
    "matching": matching,
}


def entry_config(kind: str) -> ml_collections.ConfigDict:
  """Default fields of an eval entry of `kind`."""
  if kind not in EVALUATORS:
    raise ValueError(f"unknown eval kind {kind!r}; expected one of {', '.join(EVALUATORS)}")
  return EVALUATORS[kind].default_config()


AUTO = "auto"


def evals_config(run: str = AUTO, batch_size: int = 64) -> ml_collections.ConfigDict:
  """`config.evals`: the entries below, `run` = which of them run (comma-separated, or 'auto').

  Each entry evaluates the eval split of `config.data` unless its dataset fields point
  elsewhere. Off unless named in `run` (datasets prepared locally): zeroshot_cifar10,
  zeroshot_imagenet. A config adds its own entries as dicts with a `kind`.
  """
  c = ml_collections.ConfigDict()
  c.run = run                      # entries to run, comma-separated; 'auto': the task's own
  c.batch_size = batch_size        # global eval batch, padded to the data-parallel device count
  c.use_ema = False                # evaluate the EMA weights (a run with ema_decay)
  for kind in EVALUATORS:
    c[kind] = entry_config(kind)
  # These have no captions: zero-shot reads only images and labels.
  c.zeroshot_cifar10 = zeroshot.default_config(dataset="cifar10", split="test", tag="cifar10",
                                               templates="clip80", label_key="label")
  c.zeroshot_imagenet = zeroshot.default_config(dataset="imagenet2012", split="validation",
                                                tag="imagenet", templates="clip80",
                                                label_key="label", id_key="file_name")
  return c


def is_auto(config) -> bool:
  return str(config.evals.run or "").strip() == AUTO


def selected(config) -> list:
  """The names in `evals.run`; 'auto' stands for the task's own evaluations."""
  run = str(config.evals.run or "")
  if is_auto(config):
    from vlm_jax import tasks  # pylint: disable=g-import-not-at-top  (tasks import evals)
    run = tasks.get(config.task).default_evals
  return [n.strip() for n in run.split(",") if n.strip()]


def entries(config, problems=None):
  """[(entry name, entry config)] of `config.evals.run`. An unknown name or kind raises a
  ValueError naming it, or, when a `problems` list is given, is added to it and left out."""
  evals = config.get("evals")
  if evals is None:
    return []
  names = selected(config)
  known = sorted(k for k, v in evals.items() if hasattr(v, "get") and "kind" in v)
  out, found = [], []
  for name in names:
    if name not in known:
      found.append(f"evals.run: unknown eval {name!r}; expected one of {', '.join(known)}")
    elif evals[name].kind not in EVALUATORS:
      found.append(f"evals.{name}.kind: unknown eval kind {evals[name].kind!r}; expected one of "
                   f"{', '.join(EVALUATORS)}")
    else:
      out.append((name, evals[name]))
  if found and problems is None:
    raise ValueError("; ".join(found))
  if problems is not None:
    problems.extend(found)
  return out


def run_evals(ctx: common.EvalContext, step: Optional[int] = None) -> Dict[str, float]:
  """Runs every eval in `ctx.config.evals.run` with `ctx.params`; returns {metric: float}."""
  config = ctx.config
  results = {}
  for name, entry in entries(config):
    tag = common.dataset_tag(config, entry)
    t0 = time.time()
    metrics = EVALUATORS[entry.kind].evaluate(ctx, tag, entry)
    logging.info("eval %s (%s/%s) at step %s took %.1fs: %s", name, entry.kind, tag, step,
                 time.time() - t0, metrics)
    clash = set(metrics) & set(results)
    if clash:
      raise ValueError(f"evals.{name}: metric names {sorted(clash)} are produced twice; give the "
                       "entries different evals.<name>.tag values")
    results.update(metrics)
  return results


EvalContext = common.EvalContext

__all__ = ["run_evals", "entries", "entry_config", "evals_config", "EVALUATORS", "EvalContext",
           "captioning", "classification", "common", "linear_probe", "masked_lm", "matching", "retrieval", "vqa", "zeroshot"]
