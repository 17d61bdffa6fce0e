"""What every source shares: the raw-example contract, error examples, per-process shares."""

# Raw fields a source can provide (besides the image and the key every example has).
# QUESTIONS: a list of VQAv2-style dicts {question_id, question, answers: [str], answer_type,
# question_type} about the image.
CAPTIONS, LABEL, QUESTIONS = "captions", "label", "questions"


class DataLacks(ValueError):
  """The data lacks what a consumer reads (a raw field, class names): not a broken file, but a
  dataset of another kind. Evaluations chosen automatically are skipped on it, not failed."""


def error(reason, key):
  """A raw example that stands for a record that could not be read."""
  return {"image": None, "captions": [], "label": -1, "questions": [], "key": key,
          "error": reason}


def _text(value) -> str:
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _flat_texts(value) -> list:
  if isinstance(value, (str, bytes)) or (hasattr(value, "ndim") and value.ndim == 0):
    return [_text(value)]
  out = []
  for v in value:
    out.extend(_flat_texts(v))
  return out


def questions_from_columns(columns) -> list:
  """VQAv2-style question dicts from a TFDS Sequence-of-dict value (a dict of per-question
  columns: question, question_id, answers, answer_type, question_type). The answers column may
  come back nested oddly (tfds decodes a Sequence inside a Sequence-of-dict raggedly), so it is
  flattened and shared out equally between the questions."""
  texts = [_text(q) for q in columns.get("question", [])]
  n = len(texts)
  if not n:
    return []
  answers = _flat_texts(columns.get("answers", []))
  per = len(answers) // n if len(answers) % n == 0 else 0
  ids = list(columns.get("question_id", range(n)))
  a_types = [_text(x) for x in columns.get("answer_type", [""] * n)]
  q_types = [_text(x) for x in columns.get("question_type", [""] * n)]
  return [{"question_id": int(ids[i]), "question": texts[i],
           "answers": answers[i * per:(i + 1) * per], "answer_type": a_types[i],
           "question_type": q_types[i]} for i in range(n)]


def even_share(num_examples, process_index, process_count, drop_remainder):
  """[start, end) of this process's contiguous share of `num_examples` records.

  With `drop_remainder` every process gets exactly `num_examples // process_count` records (so
  all processes see the same number of examples per epoch; at most `process_count - 1` records
  are never read); without it the shares differ by at most one and cover every record.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  start = process_index * num_examples // process_count
  if drop_remainder:
    return start, start + num_examples // process_count
  return start, (process_index + 1) * num_examples // process_count
