"""VQAv2 files: the official questions JSON, (optionally) the annotations JSON, and an image
folder with COCO naming (`COCO_val2014_000000123456.jpg`).

    questions.json    {"questions": [{"image_id", "question", "question_id"}, ...], ...}
    annotations.json  {"annotations": [{"question_id", "image_id", "answers": [{"answer",
                       "answer_confidence", "answer_id"}] * 10, "answer_type",
                       "question_type", "multiple_choice_answer"}, ...], ...}
    images/           one file per image; the image id is the trailing number of its name

One record per image that has questions (in image-id order), with every question about it and,
when the annotations are given, their ten human answers (test splits have no annotations: their
questions can be answered, not trained on or scored). Random access; images are read lazily, so
an image id without a file, or an unreadable file, becomes an error example (counted and
skipped), while a missing folder, a broken JSON file, or annotations that do not cover the
questions fail at construction, naming the file.
"""
from __future__ import annotations

import json
import os
import re

from vlm_jax.data.sources import common

_TRAILING_ID = re.compile(r"(\d+)\.(?:jpe?g|png|webp|bmp|gif)$", re.IGNORECASE)


def _load(path: str, what: str, key: str) -> list:
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"data.{what}: VQA {key} file {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"data.{what}: {path} is not a readable JSON file: {e}") from e
  if not isinstance(d, dict) or not isinstance(d.get(key), list):
    raise ValueError(f"data.{what}: {path} has no {key!r} list (the VQAv2 {key} format)")
  return d[key]


def image_files(folder: str) -> dict:
  """{image id: path} of the images in `folder` (the id is the trailing number of the name)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"data: VQA image folder {folder!r} does not exist")
  out = {}
  for name in os.listdir(folder):
    m = _TRAILING_ID.search(name)
    if m:
      out[int(m.group(1))] = os.path.join(folder, name)
  return out


class Vqav2Source:
  """See the module docstring. `field` names the config fields in messages ('train' / 'eval')."""

  def __init__(self, questions: str, annotations: str | None, images: str, *,
               field: str = "train"):
    self.path = questions
    qs = _load(questions, f"{field}_vqa_questions", "questions")
    answers = {}
    if annotations:
      for a in _load(annotations, f"{field}_vqa_annotations", "annotations"):
        answers[int(a["question_id"])] = a
      missing = [q["question_id"] for q in qs if int(q["question_id"]) not in answers]
      if missing:
        raise ValueError(f"data.{field}_vqa_annotations: {annotations} has no annotation for "
                         f"{len(missing)} questions of {questions} (e.g. {missing[:5]}); "
                         "they are not the same split")
    self.files = image_files(images)
    by_image = {}
    for q in qs:
      try:
        qid, image_id, text = int(q["question_id"]), int(q["image_id"]), str(q["question"])
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"data.{field}_vqa_questions: {questions}: a question lacks "
                         f"question_id / image_id / question: {q!r}") from e
      a = answers.get(qid, {})
      by_image.setdefault(image_id, []).append({
          "question_id": qid, "question": text,
          "answers": [str(x["answer"]) for x in a.get("answers", [])],
          "answer_type": str(a.get("answer_type", "")),
          "question_type": str(a.get("question_type", ""))})
    if not by_image:
      raise ValueError(f"data.{field}_vqa_questions: {questions} holds no question")
    self._records = sorted(by_image.items())
    self.random_access = True
    self.provides = frozenset({common.QUESTIONS})
    self.annotated = bool(annotations)

  def describe(self):
    return f"VQA questions {self.path}"

  def class_names(self):
    return None

  def __len__(self):
    return len(self._records)

  def all_questions(self) -> list:
    """Every question with its answers, in record order, without reading an image."""
    return [q for _, questions in self._records for q in questions]

  def __getitem__(self, index):
    image_id, questions = self._records[index]
    path = self.files.get(image_id)
    key = f"{os.path.basename(self.path)}:image {image_id}"
    if path is None:
      return common.error("missing_image", key)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      return common.error("unreadable_image", f"{key} ({path})")
    return {"image": data, "captions": None, "label": -1, "questions": questions,
            "key": f"{key} ({os.path.basename(path)})"}
