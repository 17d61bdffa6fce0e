"""A plain text corpus: one document a line, no images (`data.source = 'text'`).

For tasks that read text alone (masked-LM, causal-LM). Every non-blank line is an example
`{"image": None, "captions": [line], "key": "<file>@<byte offset>"}`. Random access: the byte
offset of every line is indexed once when the source opens, the lines are read lazily, so a
corpus larger than memory is fine. A line that is not valid UTF-8 becomes an error example
(skipped and counted as `bad_text`), not a crash.
"""
import os

import numpy as np

from vlm_jax.data.sources import common


class TextSource:
  """The lines of a UTF-8 text file (see the module docstring)."""
  random_access = True
  provides = frozenset({common.CAPTIONS})
  has_images = False

  def __init__(self, path, field: str = "data.train_text"):
    if not path:
      raise ValueError(f"{field}: no text file given (data.source='text' reads it)")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{field}: text file {path!r} does not exist")
    self.path = path
    starts, ends = [], []
    offset = 0
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          starts.append(offset)
          ends.append(offset + len(line))
        offset += len(line)
    if not starts:
      raise ValueError(f"{field}: {path} holds no text (expected one document a line)")
    self._starts, self._ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    self._name = os.path.basename(path)

  def describe(self):
    return f"text file {self.path}"

  def class_names(self):
    return None

  def __len__(self):
    return len(self._starts)

  def __getitem__(self, index):
    start, end = int(self._starts[index]), int(self._ends[index])
    with open(self.path, "rb") as f:
      f.seek(start)
      data = f.read(end - start)
    key = f"{self._name}@{start}"
    try:
      text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
      return common.error("bad_text", key)
    return {"image": None, "captions": [text], "label": -1, "key": key}
