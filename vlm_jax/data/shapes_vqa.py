"""Visual questions about a `shapes` scene, with ten human-style answers each (VQAv2 layout).

Questions are generated from the scene's own ground truth (the objects the renderer drew), so
every answer is true of the pixels. Kinds (the VQAv2 `answer_type` in brackets):

  colour    "what colour is the circle?"              -> "red"          (other)
  shape     "what shape is the red object?"           -> "circle"       (other)
  count     "how many circles are there?"             -> "2"            (number)
  position  "where is the red circle?"                -> "top left"     (other)
  exists    "is there a blue square?"                 -> "yes" / "no"   (yes/no)

A question is only asked when its answer is unambiguous in the scene (the colour of a shape is
asked only when that shape occurs once, and so on). Each kind has several phrasings. Every
question gets ten answers, as VQAv2 collects from ten annotators: the true answer, with up to
two annotators giving another answer of the same kind (noise that the official metric tolerates:
an answer given by at least 3 of the other 9 annotators scores 1).

Generation is deterministic and independent of the image's own random stream: the questions of
example i come from a generator seeded with (config seed, split, i, QUESTION_STREAM), so adding
them changed no image or caption.
"""
from __future__ import annotations

import numpy as np

QUESTIONS_PER_IMAGE = 3
ANSWERS_PER_QUESTION = 10
QUESTION_STREAM = 7          # a seed component no other stream of the generator uses
NUMBER_ANSWERS = ("1", "2", "3")

_COLOUR_Q = ("what colour is the {shape}?", "what is the colour of the {shape}?",
             "which colour does the {shape} have?")
_SHAPE_Q = ("what shape is the {colour} object?", "what is the {colour} shape?",
            "which shape is {colour}?")
_COUNT_Q = ("how many {plural} are there?", "how many {plural} can you see?",
            "what is the number of {plural}?")
_COUNT_ALL_Q = ("how many objects are there?", "how many shapes are in the picture?")
_POSITION_Q = ("where is the {colour} {shape}?", "in which part of the image is the {colour} "
               "{shape}?")
_EXISTS_Q = ("is there a {colour} {shape}?", "is there a {colour} {shape} in the picture?",
             "can you see a {colour} {shape}?")


def question_rng(seed: int, split_index: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, split_index, index, QUESTION_STREAM])


def _choice(rng, options):
  return options[int(rng.integers(len(options)))]


def _candidates(objects, rng, colours, shapes, plurals, positions):
  """(question_type, question, answer, answer_type, wrong answers) for every question the scene
  answers unambiguously."""
  out = []
  shape_count = {}
  colour_count = {}
  for o in objects:
    shape_count[o["shape"]] = shape_count.get(o["shape"], 0) + 1
    colour_count[o["colour"]] = colour_count.get(o["colour"], 0) + 1
  classes = {(o["colour"], o["shape"]) for o in objects}
  for o in objects:
    c, s = o["colour"], o["shape"]
    if shape_count[s] == 1:
      out.append(("what colour", _choice(rng, _COLOUR_Q).format(shape=s), c, "other",
                  [x for x in colours if x != c]))
    if colour_count[c] == 1:
      out.append(("what shape", _choice(rng, _SHAPE_Q).format(colour=c), s, "other",
                  [x for x in shapes if x != s]))
    if sum(1 for x in objects if (x["colour"], x["shape"]) == (c, s)) == 1:
      out.append(("where is", _choice(rng, _POSITION_Q).format(colour=c, shape=s),
                  o["position"], "other", [x for x in positions if x != o["position"]]))
  for s, n in shape_count.items():
    out.append(("how many", _choice(rng, _COUNT_Q).format(plural=plurals[s]), str(n), "number",
                [x for x in NUMBER_ANSWERS if x != str(n)]))
  n = len(objects)
  out.append(("how many", _choice(rng, _COUNT_ALL_Q), str(n), "number",
              [x for x in NUMBER_ANSWERS if x != str(n)]))
  # Yes/no: half about a class in the scene, half about one that is not.
  present = sorted(classes)
  if rng.random() < 0.5:
    c, s = present[int(rng.integers(len(present)))]
    answer = "yes"
  else:
    absent = [(c, s) for c in colours for s in shapes if (c, s) not in classes]
    c, s = absent[int(rng.integers(len(absent)))]
    answer = "no"
  out.append(("is there", _choice(rng, _EXISTS_Q).format(colour=c, shape=s), answer, "yes/no",
              ["no" if answer == "yes" else "yes"]))
  return out


def questions(objects, rng: np.random.Generator, *, first_question_id: int, colours, shapes,
              plurals, positions, count: int = QUESTIONS_PER_IMAGE) -> list:
  """Up to `count` questions about `objects` (distinct kinds first), as VQAv2 annotation dicts:
  {question_id, question, question_type, answer_type, multiple_choice_answer, answers: [10 x
  {answer, answer_confidence, answer_id}]}."""
  cands = _candidates(objects, rng, colours, shapes, plurals, positions)
  order = rng.permutation(len(cands))
  # Prefer one question per kind, then fill up with the rest.
  picked, kinds = [], set()
  for i in order:
    if cands[i][0] not in kinds:
      picked.append(i)
      kinds.add(cands[i][0])
  picked += [i for i in order if i not in picked]
  out = []
  for q, i in enumerate(picked[:count]):
    qtype, text, answer, atype, wrong = cands[i]
    answers = [answer] * ANSWERS_PER_QUESTION
    for slot in rng.choice(ANSWERS_PER_QUESTION, size=int(rng.integers(0, 3)), replace=False):
      answers[int(slot)] = _choice(rng, wrong)
    out.append({
        "question_id": int(first_question_id + q),
        "question": text,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": answer,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, a in enumerate(answers)],
    })
  return out
