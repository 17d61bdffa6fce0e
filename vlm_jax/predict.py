r"""Caption and / or zero-shot classify image files with a trained checkpoint.

  python -m vlm_jax.predict --workdir runs/shapes_coca --image a.png [--image b.png ...] \
      [--labels "red circle,blue square"] [--templates photo] [--beam 3] [--max_len 12] [--json]
  python -m vlm_jax.predict --workdir runs/shapes_prefixlm --image a.png \
      --question "how many circles are there?" [--question "what colour is the square?"]

For each image prints its caption (models that generate: CoCa, captioners, prefix-LMs), with
--question (a prefix-LM) the answer to every question, and, with --labels,
the zero-shot probability of each label (softmax over the labels; a model trained with the
sigmoid loss: independent sigmoids). A classifier prints its top classes. Images are preprocessed
exactly as in evaluation (config.data: resize, centre crop, normalise).
Without --config the saved config is used, with any --config.<field>=<value> overrides.
Every config field, with its value and help: python -m vlm_jax.config show configs/x.py[:arg]
"""
from __future__ import annotations

import json

import numpy as np

from absl import app
from absl import flags

from vlm_jax import cli
from vlm_jax import inference

TOP_CLASSES = 5

_FLAGS = {}


def define_flags():
  """Command-line flags (defined only when run as a program; see vlm_jax.evaluate)."""
  f = _FLAGS
  f["workdir"] = flags.DEFINE_string("workdir", None, "Run directory or checkpoint directory.")
  f["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  f["image"] = flags.DEFINE_multi_string("image", None, "Image file(s) to predict on.")
  f["labels"] = flags.DEFINE_string("labels", None, "Comma-separated class names for zero-shot.")
  f["templates"] = flags.DEFINE_string(
      "templates", "photo", "Prompt templates: a set name (photo, clip80, clip7, shapes, "
      "identity) or '|'-separated templates with '{}'.")
  f["beam"] = flags.DEFINE_integer("beam", 1, "Beam size for captioning (1 = greedy).")
  f["max_len"] = flags.DEFINE_integer("max_len", None,
                                      "Maximum caption tokens (default: context - 1).")
  f["caption"] = flags.DEFINE_bool("caption", True, "Caption the images (decoder models).")
  f["json"] = flags.DEFINE_bool("json", False, "Print one JSON object per image instead of text.")
  f["question"] = flags.DEFINE_multi_string(
      "question", None, "Visual question(s) asked about every image (prefix-LM models).")
  flags.mark_flags_as_required(["workdir", "image"])


def predict(model: inference.Model, paths, labels=None, templates="photo", beam=1, max_len=None,
            caption=True, questions=None) -> list:
  """[{'image': path, 'caption'?: str, 'answers'?: {question: answer}, 'probs'?: {label: p}}]
  for image files `paths`: the caption (models that generate), the answers to `questions`
  (prefix-LM models), zero-shot probabilities of `labels`, or a classifier's top classes."""
  images = model.load_images(paths)
  results = [{"image": str(p)} for p in paths]
  if caption and model.can_generate:
    for r, c in zip(results, model.generate(images, max_len=max_len, beam=beam)):
      r["caption"] = c
  if questions:
    if not model.can_answer:
      raise ValueError(f"--question: task {model.task.name!r} does not answer questions (a "
                       "prefix_lm model does)")
    asked = [q for _ in paths for q in questions]
    answers = model.answer(np.repeat(images, len(questions), axis=0), asked,
                           max_len=max_len or 8, beam=beam)
    for i, r in enumerate(results):
      r["answers"] = dict(zip(questions, answers[i * len(questions):(i + 1) * len(questions)]))
  if labels:
    probs = model.classify(images, labels, templates=templates)
    for r, row in zip(results, probs):
      r["probs"] = {label: float(p) for label, p in zip(labels, row)}
  elif model.has_classifier:
    probs = model.classify(images)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    for r, row in zip(results, probs):
      top = np.argsort(-row)[:TOP_CLASSES]
      r["probs"] = {names[i]: float(row[i]) for i in top}
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  labels = [l.strip() for l in (f["labels"] or "").split(",") if l.strip()]
  try:
    loc = inference.locate(f["workdir"], f["step"])
    config = cli.load_config(saved=None if cli.config_spec() else inference.load_config(loc))
    model = inference.load(f["workdir"], loc.step, config=config)
    if not labels and not model.can_generate and not model.has_classifier:
      raise ValueError(f"task {model.task.name!r} cannot caption or classify on its own; pass "
                       "--labels for zero-shot classification")
    results = predict(model, f["image"], labels, f["templates"], f["beam"], f["max_len"],
                      f["caption"], f["question"])
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e)
  for r in results:
    if f["json"]:
      print(json.dumps(r), flush=True)
      continue
    print(r["image"])
    if "caption" in r:
      print(f"  caption: {r['caption']}")
    for q, a in r.get("answers", {}).items():
      print(f"  Q: {q}  A: {a}")
    for label, p in sorted(r.get("probs", {}).items(), key=lambda kv: -kv[1]):
      print(f"  {p:.4f}  {label}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
