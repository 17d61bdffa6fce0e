r"""Visual question answering: answer every question of the eval split by generation and score the
answers with the official VQA accuracy (`vlm_jax.evals.vqa_accuracy`).

In training / `vlm_jax.evaluate`: metrics vqa/<ds>/{accuracy, accuracy_<answer type>,
num_questions, truncated} (accuracy as a fraction in [0, 1]); the answers are kept in the
official results format ([{"question_id", "answer"}]) as the artifact 'vqa/<ds>'.

As a scorer of results files in the official formats:

    python -m vlm_jax.evals.vqa --questions Q.json --annotations A.json --results R.json

prints one JSON line {"overall": <percent>, "perAnswerType": {...}, "perQuestionType": {...},
"num_questions": n}. Like the official tool it refuses results that do not answer exactly the
annotated questions.
"""
from __future__ import annotations

import json
import sys
from typing import Dict

from absl import logging
import numpy as np

from vlm_jax.data import ops
from vlm_jax.evals import common
from vlm_jax.evals import vqa_accuracy

# A generative model answers by generation ('answer'); a classifier picks one of its answer
# classes ('answer_class', with the task's `answer_vocabulary`).
PREDICT_FNS = ("answer|answer_class",)


def _by_class(config) -> bool:
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top  (tasks import evals)
  return "answer_class" in tasks.get(config.task).predict_fns(config, None)


def default_config(**fields):
  c = common.entry_config("vqa")
  c.max_questions = 3              # questions per image answered (the first ones)
  c.prompt_length = 16             # question tokens (longer ones are cut at the end, counted)
  c.max_len = 8                    # answer tokens incl. eos
  c.beam_size = 1                  # 1 = greedy
  c.log_examples = 3
  c.update(fields)
  return c


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  if _by_class(config):     # the question as a text encoder reads it: bos ... eos, at the start
    op = ops.Questions(tokenizer, common.text_length(config), entry.max_questions, encoded=True)
  else:
    op = ops.Questions(tokenizer, entry.prompt_length, entry.max_questions)
  return [(common.eval_data_config(config, entry), [op])]


def check(config, entry) -> list:
  problems = []
  for field in ("max_questions", "prompt_length", "max_len", "beam_size"):
    if int(entry.get(field) or 0) < 1:
      problems.append(f"{field}: {entry.get(field)} must be >= 1")
  length = common.text_length(config)
  if length and int(entry.max_len) > length - 1 and not _by_class(config):
    problems.append(f"max_len: {entry.max_len} exceeds the model's context length - 1 = "
                    f"{length - 1}")
  return problems


def annotations(source) -> list:
  """Every question of `source` (any kind), as VQAv2 annotation dicts, in storage order."""
  if hasattr(source, "all_questions"):      # the VQAv2 files: no image needs reading
    return source.all_questions()
  if getattr(source, "random_access", False):
    records = (source[i] for i in range(len(source)))
  else:
    records = (raw for raw, _ in source.iterate({"epoch": 0, "group": 0, "offset": 0},
                                                process_index=0, process_count=1, seed=0,
                                                shuffle=False, num_epochs=1))
  out = []
  for raw in records:
    out.extend(raw.get("questions") or [])
  return out


def _answer_fn(ctx, entry, who):
  """(fn(params, batch) -> {'answers': ..., ...}, texts(answers) -> strings, static key)."""
  tok = ctx.tokenizer
  if ctx.has_predict_fn("answer_class"):
    answer_class = ctx.predict_fn("answer_class", who)
    vocabulary = ctx.task.answer_vocabulary(ctx.config)
    return (lambda p, b: answer_class(p, b), lambda ids: [vocabulary[int(i)] for i in ids],
            "vqa/class")
  answer = ctx.predict_fn("answer", who)
  if tok is None or tok.bos_id < 0:
    raise ValueError(f"{who}: needs a tokenizer with a bos token to start the answers")
  static = dict(max_len=int(entry.max_len), beam_size=int(entry.beam_size or 1),
                bos_id=int(tok.bos_id), eos_id=int(tok.eos_id), pad_id=int(tok.pad_id))
  return (lambda p, b: answer(p, b, **static)[0], tok.decode,
          ("vqa", tuple(sorted(static.items()))))


def evaluate(ctx: "common.EvalContext", tag: str, entry) -> Dict[str, float]:
  who = f"evals: vqa on {tag!r}"
  answer, to_texts, key = _answer_fn(ctx, entry, who)

  def fn(params, batch):
    return dict(answers=answer(params, batch), mask=batch["mask"],
                qmask=batch["questions_mask"], ids=batch["question_ids"],
                cut=batch["questions_truncated"])

  (data, field_ops), = splits(ctx.config, entry, ctx.tokenizer)
  source = common.eval_source(data, field_ops, who)
  predictions, truncated = {}, 0
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      common.entry_batch_size(ctx.config, entry), who=who,
                                      source=source):
    out = ctx.call(key, fn, batch)
    keep = out["mask"][:, None] & out["qmask"]
    texts = to_texts(out["answers"][keep])
    for qid, text in zip(out["ids"][keep], texts):
      predictions[int(qid)] = text
    truncated += int(np.sum(out["cut"][keep]))
  asked = [a for a in annotations(source) if int(a["question_id"]) in predictions]
  if not asked:
    raise ValueError(f"{who}: the split has no question to answer")
  result = vqa_accuracy.score(predictions, asked)
  ctx.artifacts[f"vqa/{tag}"] = [{"question_id": k, "answer": v} for k, v in predictions.items()]
  by_id = {int(a["question_id"]): a for a in asked}
  for qid in list(predictions)[:int(entry.get("log_examples", 3))]:
    logging.info("vqa/%s: %r -> %r (humans: %r)", tag, by_id[qid]["question"], predictions[qid],
                 ops.majority_answer(list(by_id[qid]["answers"])))
  metrics = {"accuracy": result["overall"] / 100.0, "num_questions": float(len(asked)),
             "truncated": float(truncated)}
  for kind, acc in result["perAnswerType"].items():
    metrics[f"accuracy_{kind.replace('/', '_').replace(' ', '_')}"] = acc / 100.0
  return {f"vqa/{tag}/{k}": v for k, v in metrics.items()}


# ---- the scorer CLI ------------------------------------------------------------------------------


def _load_json(path, what):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise SystemExit(f"--{what}: {path} does not exist") from e
  except json.JSONDecodeError as e:
    raise SystemExit(f"--{what}: {path} is not valid JSON: {e}") from e


def score_files(questions_path: str, annotations_path: str, results_path: str) -> dict:
  """The official accuracy of a results file ([{"question_id", "answer"}]) against VQAv2
  questions + annotations files."""
  questions = _load_json(questions_path, "questions")
  anns = _load_json(annotations_path, "annotations")
  results = _load_json(results_path, "results")
  if not isinstance(anns, dict) or "annotations" not in anns:
    raise SystemExit(f"--annotations: {annotations_path} has no 'annotations' list (the VQAv2 "
                     "annotation format)")
  if not isinstance(questions, dict) or "questions" not in questions:
    raise SystemExit(f"--questions: {questions_path} has no 'questions' list (the VQAv2 "
                     "question format)")
  asked = {int(q["question_id"]) for q in questions["questions"]}
  annotated = {int(a["question_id"]) for a in anns["annotations"]}
  if asked != annotated:
    raise SystemExit(f"--questions / --annotations: they do not describe the same questions "
                     f"({len(asked - annotated)} asked but not annotated, "
                     f"{len(annotated - asked)} annotated but not asked)")
  if not isinstance(results, list):
    raise SystemExit(f"--results: {results_path} must be a list of {{question_id, answer}}")
  preds = {}
  for i, r in enumerate(results):
    if not isinstance(r, dict) or "question_id" not in r or "answer" not in r:
      raise SystemExit(f"--results: entry {i} of {results_path} lacks question_id / answer")
    if int(r["question_id"]) in preds:
      raise SystemExit(f"--results: question {r['question_id']} is answered twice")
    preds[int(r["question_id"])] = str(r["answer"])
  try:
    return vqa_accuracy.score(preds, anns["annotations"])
  except ValueError as e:
    raise SystemExit(f"--results: {e}") from e


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m vlm_jax.evals.vqa",
      description="Official VQA accuracy of a results file; prints one JSON line.")
  parser.add_argument("--questions", required=True, help="VQAv2 questions JSON")
  parser.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
  parser.add_argument("--results", required=True,
                      help='results JSON: [{"question_id": int, "answer": str}, ...]')
  args = parser.parse_args(argv)
  print(json.dumps(score_files(args.questions, args.annotations, args.results)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
