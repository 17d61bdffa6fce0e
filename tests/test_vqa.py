"""The official VQA accuracy (normalisation, leave-one-out matching, refusals) and its CLI."""
import json
import subprocess
import sys

import pytest

from vlm_jax.evals import vqa
from vlm_jax.evals import vqa_accuracy as va
from train_utils import REPO, subprocess_env


@pytest.mark.parametrize("answer,want", [
    ("Two dogs.", "2 dogs"),                 # number word, article-free, final period dropped
    ("the red ball", "red ball"),            # articles dropped
    ("yes!", "yes"),                         # '!' next to nothing: replaced by a space, stripped
    ("black-and-white", "black and white"),  # '-' inside a word becomes a space
    ("10,000", "10000"),                     # a digit-comma-digit group: punctuation deleted
    ("dont know", "don't know"),             # contraction restored
    ("3.5", "3.5"),                          # a period before a digit stays
    ("  What?\tNone  ", "what 0"),           # whitespace, '?', 'none' -> 0
])
def test_prediction_normalisation(answer, want):
  assert va.normalize_prediction(answer) == want


def test_leave_one_out_accuracy():
  # k of 10 humans gave the prediction: each matching human sees k-1 others, the rest see k.
  def acc(k):
    return va.question_accuracy("cat", ["cat"] * k + ["dog"] * (10 - k))
  assert acc(0) == 0.0
  assert acc(1) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)
  assert acc(2) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)     # 0.6
  assert acc(3) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)       # 0.9
  assert acc(4) == 1.0
  assert va.question_accuracy("Cat.", ["cat"] * 10) == 1.0


def test_human_answers_get_punctuation_only_when_they_disagree():
  # The official tool normalises the human answers only when they differ, and then only their
  # punctuation: number words in the human answers are never mapped to digits.
  assert va.question_accuracy("two", ["two"] * 10) == 0.0         # 'two' -> '2' != 'two'
  assert va.question_accuracy("two", ["2"] * 10) == 1.0
  assert va.question_accuracy("2", ["two"] * 5 + ["2"] * 5) == 1.0
  # The '!' of a disagreeing human answer becomes a space ('yes '), and human answers are not
  # stripped afterwards, so they no longer equal the prediction 'yes'.
  assert va.question_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0
  assert va.question_accuracy("yes", ["yes!"] * 10) == 0.0   # all equal: left as they are


def test_score_per_answer_type_and_refusals():
  anns = [{"question_id": 1, "answer_type": "yes/no", "question_type": "is there",
           "answers": [{"answer": "yes"}] * 10},
          {"question_id": 2, "answer_type": "number", "question_type": "how many",
           "answers": [{"answer": "2"}] * 10}]
  out = va.score({1: "yes", 2: "three"}, anns)
  assert out["overall"] == 50.0
  assert out["perAnswerType"] == {"yes/no": 100.0, "number": 0.0}
  with pytest.raises(ValueError, match=r"1 annotated questions have no answer \(e.g. \[2\]\)"):
    va.score({1: "yes"}, anns)
  with pytest.raises(ValueError, match=r"not in the annotations \(e.g. \[9\]\)"):
    va.score({1: "yes", 2: "2", 9: "x"}, anns)


def _write_vqa_files(tmp_path, answers):
  questions = {"questions": [{"question_id": 11, "image_id": 1, "question": "how many?"},
                             {"question_id": 12, "image_id": 1, "question": "is it red?"}]}
  anns = {"annotations": [
      {"question_id": 11, "image_id": 1, "answer_type": "number", "question_type": "how many",
       "multiple_choice_answer": "2",
       "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1}
                   for i in range(10)]},
      {"question_id": 12, "image_id": 1, "answer_type": "yes/no", "question_type": "is it",
       "multiple_choice_answer": "no",
       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                   for i, a in enumerate(["no"] * 8 + ["yes"] * 2)]}]}
  paths = {k: tmp_path / f"{k}.json" for k in ("questions", "annotations", "results")}
  paths["questions"].write_text(json.dumps(questions))
  paths["annotations"].write_text(json.dumps(anns))
  paths["results"].write_text(json.dumps(answers))
  return paths


def test_scorer_cli_prints_one_json_line(tmp_path):
  paths = _write_vqa_files(tmp_path, [{"question_id": 11, "answer": "two"},
                                      {"question_id": 12, "answer": "yes"}])
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.evals.vqa",
                         *[f"--{k}={v}" for k, v in paths.items()]],
                        capture_output=True, text=True, env=subprocess_env(1), cwd=REPO,
                        check=True)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # 'two' -> '2' matches every human; 'yes' matches 2 of 10 humans: 0.6.
  assert out["overall"] == pytest.approx(80.0)
  assert out["perAnswerType"] == {"number": 100.0, "yes/no": 60.0}


def test_scorer_refuses_incomplete_results(tmp_path):
  paths = _write_vqa_files(tmp_path, [{"question_id": 11, "answer": "2"}])
  with pytest.raises(SystemExit, match="annotated questions have no answer"):
    vqa.score_files(str(paths["questions"]), str(paths["annotations"]), str(paths["results"]))
  paths["results"].write_text("[{\"question_id\": 11}]")
  with pytest.raises(SystemExit, match="entry 0 .* lacks question_id / answer"):
    vqa.score_files(str(paths["questions"]), str(paths["annotations"]), str(paths["results"]))
