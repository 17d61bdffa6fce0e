"""VQA accuracy exactly as the official VQA evaluation computes it (VQAv2, `vqaEval.py` of the VQA
API by the dataset's authors), re-implemented here so that no research code is vendored.

For one question with ten human answers and a predicted answer:

1. the prediction is cleaned: newlines / tabs to spaces, stripped, then `process_punctuation`
   and `process_digit_article`;
2. when the humans did not all give the same answer, each human answer gets
   `process_punctuation` (only that: the official tool does not map number words or drop
   articles in the human answers);
3. for each of the ten humans, the prediction scores min(#other nine humans who gave it / 3, 1);
   the question's accuracy is the mean of those ten scores.

Overall accuracy and per-answer-type accuracy are means over questions, reported as percentages
rounded to 2 decimals, as the official tool prints them.

The normalisation keeps the official tool's quirks on purpose, so that numbers are comparable
with published ones: only the listed punctuation is handled (apostrophes and colons are kept),
the period-stripping substitution removes at most 32 periods (the official call passes
`re.UNICODE` where `re.sub` takes its count), a punctuation mark is deleted rather than replaced
by a space as soon as the answer contains a digit-comma-digit group, and the contraction table
is applied after lower-casing (so its capitalised entries never fire).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern: `(?!<=\d)` is a negative lookahead for the literal text "<=" and a digit
# (a typo for a lookbehind), so in effect: a period not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)   # see the module docstring


def _contractions() -> Dict[str, str]:
  """The official table: written-without-apostrophe forms -> the contraction.

  Most entries are a contraction with all of its apostrophes dropped, or (for two-part
  contractions like "couldn't've") with one of them dropped; the irregular entries of the
  official table are listed as they are there.
  """
  regular = (
      "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd "
      "he's how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't "
      "not've o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd "
      "someone'll someone's something'd something'll that's there'd there're there's they'd "
      "they'll they're they've wasn't we've weren't what'll what're what's what've when's "
      "where'd where's where've who'd who'll who's who've won't would've wouldn't y'all you'd "
      "you'll you're you've").split()
  two_part = ("couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've "
              "somebody'd've someone'd've something'd've there'd've they'd've we'd've "
              "who'd've wouldn't've you'd've").split()
  table = {w.replace("'", ""): w for w in regular}
  for w in two_part:
    first = w.index("'")
    second = w.index("'", first + 1)
    table[w[:first] + w[first + 1:]] = w          # first apostrophe dropped
    table[w[:second] + w[second + 1:]] = w        # second apostrophe dropped
  # Irregular entries of the official table.
  table.update({"twas": "'twas", "somebody'd": "somebodyd", "yall'll": "y'all'll",
                "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
                "y'all'dve": "y'all'd've", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
                "Ive": "I've", "she's": "she's"})
  # Regular forms the official table does not have ("she'd" is absent; "somebody'd" is mapped
  # the wrong way round, above).
  for missing in ("shed", "somebodyd"):
    table.pop(missing, None)
  return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`."""
  out = text
  delete = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in PUNCTUATION:
    if delete or (p + " " in text) or (" " + p in text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`: lower-case, number words to digits, articles dropped,
  contractions restored."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_prediction(answer: str) -> str:
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Accuracy in [0, 1] of one predicted answer against the human answers (normally ten)."""
  if not human_answers:
    raise ValueError("VQA accuracy: a question has no human answers")
  pred = normalize_prediction(prediction)
  humans = list(human_answers)
  if len(set(humans)) > 1:
    humans = [process_punctuation(a) for a in humans]
  total = 0.0
  for i in range(len(humans)):
    matches = sum(1 for j, a in enumerate(humans) if j != i and a == pred)
    total += min(1.0, matches / 3.0)
  return total / len(humans)


def score(predictions: Mapping[int, str], annotations: Iterable[Mapping]) -> dict:
  """Official accuracy of `predictions` {question_id: answer} over `annotations` (VQAv2
  annotation dicts: question_id, answers [{answer, ...}], answer_type, question_type).

  Like the official tool, every annotated question must have a prediction and no prediction may
  name another question. Returns {"overall": %, "perAnswerType": {type: %},
  "perQuestionType": {type: %}, "num_questions": n} (percentages rounded to 2 decimals).
  """
  annotations = list(annotations)
  ids = [int(a["question_id"]) for a in annotations]
  predicted = {int(k) for k in predictions}
  missing = sorted(set(ids) - predicted)
  extra = sorted(predicted - set(ids))
  if missing or extra:
    raise ValueError(
        "VQA results do not match the annotations: "
        + (f"{len(missing)} annotated questions have no answer (e.g. {missing[:5]})"
           if missing else "")
        + ("; " if missing and extra else "")
        + (f"{len(extra)} answers are for questions not in the annotations (e.g. {extra[:5]})"
           if extra else ""))
  if not annotations:
    raise ValueError("VQA results: the annotations hold no question")
  predictions = {int(k): v for k, v in predictions.items()}
  per_q: List[float] = []
  by_answer: Dict[str, List[float]] = {}
  by_question: Dict[str, List[float]] = {}
  for a in annotations:
    acc = question_accuracy(predictions[int(a["question_id"])],
                            [h["answer"] if isinstance(h, Mapping) else h for h in a["answers"]])
    per_q.append(acc)
    by_answer.setdefault(str(a.get("answer_type", "")), []).append(acc)
    by_question.setdefault(str(a.get("question_type", "")), []).append(acc)
  pct = lambda xs: round(100.0 * sum(xs) / len(xs), 2)
  return {"overall": pct(per_q), "perAnswerType": {k: pct(v) for k, v in by_answer.items()},
          "perQuestionType": {k: pct(v) for k, v in by_question.items()},
          "num_questions": len(per_q)}
