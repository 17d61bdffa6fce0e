"""Zero-shot classification: a text-embedding classifier from class names x prompt templates.

The classifier row of a class is the mean of the L2-normalised text embeddings of its prompts
("a photo of a {}." for every template), renormalised to unit length (CLIP, section 3.1.4). An
image is assigned the class with the highest dot product with its embedding.

`classification_metrics` and `classifier_from_embeddings` are pure; `evaluate` runs the model on
an eval split (sharded over the mesh) and returns `zeroshot/<name>/{top1,top5,mean_per_class}`.
"""
from typing import Dict, Sequence

import numpy as np

from vlm_jax.data import ops
from vlm_jax.evals import common
from vlm_jax.evals import templates as templates_lib

PROMPT_BATCH_SIZE = 512


PREDICT_FNS = ("encode_images", "encode_texts")


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  del tokenizer
  return [(common.eval_data_config(config, entry), [ops.Label()])]


def check_data(config, entry, tag) -> None:
  """Raises when only the data can show a problem: zero-shot needs class names (`DataLacks`
  when the data has none)."""
  (data, field_ops), = splits(config, entry)
  class_list(data, tag, common.eval_source(data, field_ops))


def default_config(**fields):
  c = common.entry_config("zeroshot")
  c.templates = "auto"             # 'auto' (shapes -> its prompts, else clip80) | 'clip80' |
                                   # 'clip7' | 'photo' | 'shapes' | 'a {}.|a photo of a {}.'
  c.ks = (1, 5)
  c.update(fields)
  return c


def classifier_from_embeddings(prompt_embeds) -> np.ndarray:
  """float [C, T, D] (class x template embeddings) -> unit-norm classifier [C, D]."""
  e = np.asarray(prompt_embeds, np.float32)
  if e.ndim != 3:
    raise ValueError(f"prompt_embeds: expected [classes, templates, dim], got shape {e.shape}")
  e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  mean = e.mean(axis=1)
  return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list:
  """All prompts, class-major: [c0 t0, c0 t1, ..., c1 t0, ...] (C * T strings)."""
  return [t.format(c) for c in classnames for t in templates]


def classification_metrics(logits, labels, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
  """Top-k accuracy ('top<k>') and mean per-class recall ('mean_per_class') in [0, 1].

  Args:
    logits: float [N, C] class scores.
    labels: int [N] true classes.
    ks: top-k values; k >= C counts every example as a hit.

  An example's rank is the number of classes scored strictly higher than its true class (ties
  resolved in its favour); top-k counts rank < k. Mean per-class recall averages top-1 recall
  over the classes that occur in `labels` (balanced accuracy).
  """
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels, np.int64)
  n, c = logits.shape
  if labels.shape != (n,):
    raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
  if n and (labels.min() < 0 or labels.max() >= c):
    raise ValueError(f"labels: values must be in [0, {c}) (examples without a label cannot be "
                     f"scored), got [{labels.min()}, {labels.max()}]")
  true_score = logits[np.arange(n), labels]
  rank = np.sum(logits > true_score[:, None], axis=1)
  out = {f"top{k}": float(np.mean(rank < k)) if n else float("nan") for k in ks}
  present = np.unique(labels)
  recalls = [np.mean(rank[labels == cls] < 1) for cls in present]
  out["mean_per_class"] = float(np.mean(recalls)) if recalls else float("nan")
  return out


def build_classifier(ctx: "common.EvalContext", classnames: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """Embeds every class x template prompt with the model's text tower -> classifier [C, D]."""
  texts = prompts(classnames, templates)
  # Prompts are many (ImageNet: 80k) and short: embed them in larger batches than images.
  embeds = ctx.embed_texts(ctx.tokenize(texts), batch_size=PROMPT_BATCH_SIZE)
  return classifier_from_embeddings(embeds.reshape(len(classnames), len(templates), -1))


def class_list(data, tag: str, source=None) -> tuple:
  """The class names of an eval split: the entry's / data's classnames, the source's (TFDS
  ClassLabel, ImageFolder), else the built-in list for the dataset's name."""
  if data.get("classnames"):
    return tuple(common.class_names(data))
  dataset = data.name if data.source == "tfds" else tag
  return tuple(templates_lib.classnames_for(dataset, common.class_names(data, source)))


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  """Zero-shot classification of the split described by `eval_config` (see `default_config`)."""
  who = f"evals: zero-shot on {tag!r}"
  encode = ctx.predict_fn("encode_images", who)
  ctx.predict_fn("encode_texts", who)
  (data, field_ops), = splits(ctx.config, eval_config)
  source = common.eval_source(data, field_ops, who)
  classnames = class_list(data, tag, source)
  dataset = data.name if data.source == "tfds" else tag
  spec = eval_config.get("templates") or "auto"
  if spec == "auto":
    spec = "shapes" if dataset.split("/")[0] == "shapes" else "clip80"
  templates = templates_lib.get_templates(spec)
  classifier = build_classifier(ctx, classnames, templates)

  fn = lambda p, b: (encode(p, b), b["label"], b["mask"])
  image_embeds, labels = [], []
  batches = common.iterate_batches(ctx, data, field_ops,
                                   common.entry_batch_size(ctx.config, eval_config), who=who,
                                   source=source)
  for batch in batches:
    embeds, label, mask = ctx.call("zeroshot/embed", fn, batch)
    image_embeds.append(embeds[mask])
    labels.append(label[mask])
  dim = classifier.shape[1]
  image_embeds = np.concatenate(image_embeds) if image_embeds else np.zeros((0, dim), np.float32)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  if labels.size and labels.min() < 0:
    raise ValueError(f"evals: dataset {dataset!r} has examples without a label (-1); "
                     "zero-shot classification needs the label_key field")
  if labels.size and labels.max() >= len(classnames):
    raise ValueError(f"evals: dataset {dataset!r} has label {labels.max()} but only "
                     f"{len(classnames)} class names")
  logits = image_embeds @ classifier.T
  metrics = classification_metrics(logits, labels, ks=tuple(eval_config.ks))
  metrics["num_examples"] = float(labels.size)
  return {f"zeroshot/{tag}/{k}": v for k, v in metrics.items()}
