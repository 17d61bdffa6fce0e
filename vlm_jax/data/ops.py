"""Field ops: turn a raw example's fields (captions, label) into batch fields, one op per field.

The pipeline decodes and augments the image itself (every batch has `image` and `mask`); a task
lists the ops that make the rest of its training batch (`Task.train_ops`), and an evaluator lists
its own. An op

  requires  the raw fields it reads (a source that lacks one is refused before compiling,
            see `vlm_jax.data.sources.check_fields`);
  provides  the batch fields it writes;
  __call__(raw, rng, train) -> per-example values (raising BadExample skips the example, which
            the pipeline counts under the given reason);
  padding() -> the values of a padding example (mask=False) at the end of an eval split;
  collate(examples) -> {batch field: array}, e.g. tokenizing a whole batch in one call (a
            per-example call costs far more: SentencePiece starts a thread pool each time).

Ops are plain picklable objects (the tokenizers pickle themselves), so grain worker processes
can run them.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.data.sources.common import CAPTIONS, LABEL


class BadExample(Exception):
  """Raised while preprocessing an example; the pipeline skips it and counts `reason`."""

  def __init__(self, reason):
    super().__init__(reason)
    self.reason = reason


def clean_captions(captions):
  """UTF-8, stripped, non-empty captions; raises BadExample when none is left."""
  out, bad_encoding = [], False
  for c in captions or []:
    if isinstance(c, np.ndarray):
      c = c.item()
    if isinstance(c, bytes):
      try:
        c = c.decode("utf-8")
      except UnicodeDecodeError:
        bad_encoding = True
        continue
    c = str(c).strip()
    if c:
      out.append(c)
  if not out:
    raise BadExample("non_utf8_caption" if bad_encoding else "empty_caption")
  return out


class Caption:
  """`text` int32 [L]: one caption, tokenized (`bos ... eos pad`). Training draws one of the
  example's captions at random (from the example's own rng, so resumes repeat it); evaluation
  takes the first."""
  requires = (CAPTIONS,)

  def __init__(self, tokenizer, length: int, key: str = "text"):
    self.tokenizer, self.length, self.key = tokenizer, int(length), key
    self.provides = (key,)

  def __call__(self, raw, rng, train):
    captions = clean_captions(raw.get("captions"))
    caption = captions[int(rng.integers(len(captions)))] if train else captions[0]
    return {f"_{self.key}": caption}

  def padding(self):
    return {f"_{self.key}": None}

  def collate(self, examples):
    texts = [e[f"_{self.key}"] for e in examples]
    rows = [i for i, t in enumerate(texts) if t is not None]
    out = np.zeros((len(examples), self.length), np.int32)
    if rows:
      out[rows] = self.tokenizer.encode([texts[i] for i in rows], self.length)
    return {self.key: out}


class AllCaptions:
  """`captions` int32 [K, L] and `captions_mask` bool [K]: up to `max_captions` of the example's
  captions, in order (retrieval and captioning references)."""
  requires = (CAPTIONS,)
  provides = ("captions", "captions_mask")

  def __init__(self, tokenizer, length: int, max_captions: int):
    self.tokenizer, self.length, self.max_captions = tokenizer, int(length), int(max_captions)

  def __call__(self, raw, rng, train):
    del rng, train
    return {"_captions": clean_captions(raw.get("captions"))[:self.max_captions]}

  def padding(self):
    return {"_captions": []}

  def collate(self, examples):
    texts, where = [], []
    for i, e in enumerate(examples):
      for j, c in enumerate(e["_captions"]):
        texts.append(c)
        where.append((i, j))
    captions = np.zeros((len(examples), self.max_captions, self.length), np.int32)
    mask = np.zeros((len(examples), self.max_captions), bool)
    if texts:
      tokens = self.tokenizer.encode(texts, self.length)
      for (i, j), row in zip(where, tokens):
        captions[i, j] = row
        mask[i, j] = True
    return {"captions": captions, "captions_mask": mask}


class Label:
  """`label` int32: the example's class index (-1 when it has none). With `skip_missing`, an
  example without a label is skipped and counted as `missing_label` (training a classifier)."""
  requires = (LABEL,)
  provides = ("label",)

  def __init__(self, skip_missing: bool = False):
    self.skip_missing = bool(skip_missing)

  def __call__(self, raw, rng, train):
    del rng, train
    label = int(raw.get("label", -1))
    if label < 0 and self.skip_missing:
      raise BadExample("missing_label")
    return {"label": np.int32(label)}

  def padding(self):
    return {"label": np.int32(-1)}

  def collate(self, examples):
    return {"label": np.stack([e["label"] for e in examples]).astype(np.int32)}
