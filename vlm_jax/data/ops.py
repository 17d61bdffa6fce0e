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

import zlib
from typing import Mapping, Optional, Sequence

import numpy as np

from vlm_jax.data import retrieval
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


def majority_answer(answers) -> str:
  """The answer most annotators gave (ties: the one given first): the training target of a
  VQA question, as the VQAv2 `multiple_choice_answer`."""
  counts = {}
  for a in answers:
    counts[a] = counts.get(a, 0) + 1
  return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def layout_prompt_answer(prompt_ids, answer_ids, length: int, bos_id: int, eos_id: int,
                         pad_id: int):
  """One prefix-LM text row `prompt, bos, answer, eos, pad...` of `length` ids.

  Returns (row int32 [length], prompt_len, truncated). The answer (and its eos) is kept whole
  when it fits; the prompt gives way first, cut at its end (`truncated` = True), then an answer
  longer than the whole row is cut before its eos.
  """
  answer = list(answer_ids)[:max(length - 2, 0)]
  room = length - 2 - len(answer)
  prompt = list(prompt_ids)
  truncated = len(prompt) > room
  prompt = prompt[:max(room, 0)]
  row = np.full((length,), pad_id, np.int32)
  ids = prompt + [bos_id] + answer + [eos_id]
  row[:len(ids)] = ids
  return row, len(prompt), truncated


class PrefixLMText:
  """The prefix-LM batch fields of a caption or a visual question, mixed per example.

    text         int32 [L]  `prompt, bos, answer, eos, pad...` (a caption: empty prompt)
    prompt_len   int32      prompt tokens (seen bidirectionally with the image tokens)
    target_mask  bool [L]   the tokens the loss predicts: answer and eos
    is_vqa       bool       a question (True) or a caption (False)
    truncated    bool       the question was cut to fit the row (counted in the metrics)

  Training draws the kind per example with probabilities proportional to `caption_weight` /
  `vqa_weight` (from the example's own rng, so a resumed run repeats it), then one of the
  example's captions or questions; a question's target is its majority answer. An example drawn
  for VQA whose question has no answer is skipped and counted as `no_answer` (one without any
  question as `no_question`). Evaluation takes the first caption (or, with caption_weight 0,
  the first question).

  neighbours: {image key: its neighbours' captions} (`retrieval.load_neighbours`): a caption's
  prompt is then one caption of each neighbour (`retrieval.prompt_text`): the retrieved one, or
  with `same_phrasing` the one at the target caption's own index (for datastores whose captions
  come in parallel phrasings, as shapes' four: the captioner learns to follow the prompt's
  phrasing). An image without neighbours is skipped and counted as `no_neighbours`.
  """
  provides = ("text", "prompt_len", "target_mask", "is_vqa", "truncated")

  def __init__(self, tokenizer, length: int, caption_weight: float = 1.0,
               vqa_weight: float = 1.0, neighbours: Optional[Mapping[str, Sequence]] = None,
               same_phrasing: bool = False):
    from vlm_jax.data.sources.common import QUESTIONS  # pylint: disable=g-import-not-at-top
    self.tokenizer, self.length = tokenizer, int(length)
    total = float(caption_weight) + float(vqa_weight)
    if caption_weight < 0 or vqa_weight < 0 or total <= 0:
      raise ValueError(f"loss.caption_weight / loss.vqa_weight: must be >= 0 with a positive "
                       f"sum, got {caption_weight} / {vqa_weight}")
    self.p_vqa = float(vqa_weight) / total
    self.neighbours, self.same_phrasing = neighbours, bool(same_phrasing)
    self.requires = tuple(f for f, w in ((CAPTIONS, caption_weight), (QUESTIONS, vqa_weight))
                          if w > 0)

  def __call__(self, raw, rng, train):
    vqa = (rng.random() < self.p_vqa) if train else self.p_vqa >= 1.0
    if not vqa:
      captions = clean_captions(raw.get("captions"))
      index = int(rng.integers(len(captions))) if train else 0
      return {"_prompt": self._retrieved_prompt(raw, index, len(captions)),
              "_answer": captions[index],
              "is_vqa": np.bool_(False)}
    questions = raw.get("questions") or []
    if not questions:
      raise BadExample("no_question")
    q = questions[int(rng.integers(len(questions)))] if train else questions[0]
    answers = [str(a).strip() for a in q.get("answers") or [] if str(a).strip()]
    if not answers:
      raise BadExample("no_answer")
    return {"_prompt": str(q["question"]), "_answer": majority_answer(answers),
            "is_vqa": np.bool_(True)}

  def _retrieved_prompt(self, raw, caption_index: int, num_captions: int) -> str:
    if self.neighbours is None:
      return ""
    hits = self.neighbours.get(str(raw.get("key")))
    if not hits:
      raise BadExample("no_neighbours")
    if self.same_phrasing and any(len(h) != num_captions for h in hits):
      # Parallel phrasings line up only when every image has all of them; a datastore embedded
      # with fewer captions per image would pair the wrong phrasings without a word.
      raise ValueError(
          f"data.neighbours_same_phrasing: image {raw.get('key')} has {num_captions} captions "
          f"but its neighbours have {sorted({len(h) for h in hits})}; embed the datastore with "
          f"all of them (`vlm_jax.embed --max_captions {num_captions}`) or turn it off")
    return retrieval.prompt_text(
        retrieval.phrasing(hits, caption_index if self.same_phrasing else 0))

  def padding(self):
    return {"_prompt": None, "_answer": None, "is_vqa": np.bool_(False)}

  def collate(self, examples):
    tok = self.tokenizer
    n = len(examples)
    text = np.full((n, self.length), tok.pad_id, np.int32)
    prompt_len = np.zeros((n,), np.int32)
    target = np.zeros((n, self.length), bool)
    truncated = np.zeros((n,), bool)
    rows = [i for i, e in enumerate(examples) if e["_answer"] is not None]
    if rows:
      prompts = tok.tokenize([examples[i]["_prompt"] for i in rows])
      answers = tok.tokenize([examples[i]["_answer"] for i in rows])
      for i, p, a in zip(rows, prompts, answers):
        text[i], prompt_len[i], truncated[i] = layout_prompt_answer(
            p, a, self.length, tok.bos_id, tok.eos_id, tok.pad_id)
        end = prompt_len[i] + 1 + min(len(a), self.length - 2) + 1
        target[i, prompt_len[i] + 1:end] = True
    return {"text": text, "prompt_len": prompt_len, "target_mask": target,
            "is_vqa": np.stack([e["is_vqa"] for e in examples]), "truncated": truncated}


def left_padded(pieces, length: int, pad_id: int):
  """Ragged ids -> (int32 [N, length] rows aligned at their end, padded on the left with pad_id;
  bool [N] True where a row was longer than `length` and lost its end)."""
  out = np.full((len(pieces), length), pad_id, np.int32)
  cut = np.zeros((len(pieces),), bool)
  for i, row in enumerate(pieces):
    row = list(row)
    cut[i] = len(row) > length
    row = row[:length]
    if row:
      out[i, length - len(row):] = row
  return out, cut


class RetrievalPrompt:
  """An image's retrieved captions as a left-padded prompt for generation (retrieval-augmented
  caption evaluation; see `vlm_jax.data.retrieval`).

    prompt            int32 [P]  `retrieval.prompt_text` ids, left-padded with pad
    prompt_truncated  bool       the prompt was longer than P and lost its start

  An image without retrieved captions is skipped and counted as `no_neighbours`.
  """
  provides = ("prompt", "prompt_truncated")
  requires = ()

  def __init__(self, tokenizer, length: int, neighbours: Mapping[str, Sequence]):
    self.tokenizer, self.length, self.neighbours = tokenizer, int(length), neighbours

  def __call__(self, raw, rng, train):
    hits = self.neighbours.get(str(raw.get("key")))
    if not hits:
      raise BadExample("no_neighbours")
    return {"_retrieval_prompt": retrieval.prompt_text(retrieval.phrasing(hits))}

  def padding(self):
    return {"_retrieval_prompt": None}

  def collate(self, examples):
    tok = self.tokenizer
    texts = [e["_retrieval_prompt"] for e in examples]
    rows = [list(r) if t is not None else [] for t, r in zip(texts, tok.tokenize(
        [t or "" for t in texts]))]
    cut = np.array([len(r) > self.length for r in rows], bool)
    # A prompt too long keeps its end ("... caption:", where generation continues).
    prompt, _ = left_padded([r[-self.length:] for r in rows], self.length, tok.pad_id)
    return {"prompt": prompt, "prompt_truncated": cut}


class Questions:
  """An image's visual questions, as left-padded prompts for generation (VQA evaluation).

    questions        int32 [Q, P]  question ids, left-padded with pad (the end of the prompt
                                   is aligned, so generation continues every row at once)
    questions_mask   bool [Q]      real questions
    question_ids     int32 [Q]     their ids (-1 for none), to match the annotations
    questions_truncated  bool [Q]  the question was longer than P and its end was cut
                                   (counted by the evaluator)

  With `encoded`, the questions are instead encoded as every text a text encoder reads
  (`bos ... eos pad`, right-padded): for models that classify the question, not continue it.
  """
  provides = ("questions", "questions_mask", "question_ids", "questions_truncated")

  def __init__(self, tokenizer, length: int, max_questions: int, encoded: bool = False):
    from vlm_jax.data.sources.common import QUESTIONS  # pylint: disable=g-import-not-at-top
    self.tokenizer, self.length, self.max_questions = tokenizer, int(length), int(max_questions)
    self.encoded = encoded
    self.requires = (QUESTIONS,)

  def __call__(self, raw, rng, train):
    del rng, train
    qs = list(raw.get("questions") or [])[:self.max_questions]
    return {"_questions": [(int(q["question_id"]), str(q["question"])) for q in qs]}

  def padding(self):
    return {"_questions": []}

  def collate(self, examples):
    tok = self.tokenizer
    n, q, p = len(examples), self.max_questions, self.length
    out = np.full((n, q, p), tok.pad_id, np.int32)
    mask = np.zeros((n, q), bool)
    ids = np.full((n, q), -1, np.int32)
    cut = np.zeros((n, q), bool)
    flat = [(i, j, qid, text) for i, e in enumerate(examples)
            for j, (qid, text) in enumerate(e["_questions"])]
    if flat and self.encoded:
      texts = [t for _, _, _, t in flat]
      rows = tok.encode(texts, p)
      cuts = [len(ids) > p - 1 - (tok.bos_id >= 0) for ids in tok.tokenize(texts)]
    elif flat:
      rows, cuts = left_padded(tok.tokenize([t for _, _, _, t in flat]), p, tok.pad_id)
    if flat:
      for (i, j, qid, _), row, c in zip(flat, rows, cuts):
        out[i, j], cut[i, j], mask[i, j], ids[i, j] = row, c, True, qid
    return {"questions": out, "questions_mask": mask, "question_ids": ids,
            "questions_truncated": cut}


MASK_TOKENS = ("[MASK]", "<mask>")


def mask_token_id(tokenizer, model_vocab_size: int, field: str = "model.text.vocab_size") -> int:
  """The id that stands for a masked token: the tokenizer's own [MASK] / <mask> token, else the
  first id past the tokenizer's vocabulary (a tokenizer trained here has none), which the
  model's vocabulary must then include."""
  lookup = getattr(tokenizer, "token_to_id", None)
  for name in MASK_TOKENS:
    i = lookup(name) if lookup is not None else None
    if i is not None:
      return int(i)
  mask_id = int(tokenizer.vocab_size)
  if mask_id >= int(model_vocab_size):
    raise ValueError(f"{field}: the tokenizer has no mask token ({', '.join(MASK_TOKENS)}), so "
                     f"masked tokens take id {mask_id}, one past its {tokenizer.vocab_size} ids; "
                     f"the model's vocabulary ({model_vocab_size}) must be at least "
                     f"{mask_id + 1}")
  return mask_id


def mask_tokens(row: np.ndarray, rng: np.random.Generator, *, special, mask_id: int,
                random_ids: int, rate: float, mask_frac: float = 0.8, random_frac: float = 0.1):
  """BERT's corruption of one row of ids: each token that is not special is chosen with
  probability `rate` (at least one when the row has any); of the chosen, `mask_frac` become
  `mask_id`, `random_frac` a random id in [0, random_ids), the rest stay. Returns (corrupted row,
  bool [L] chosen)."""
  candidates = ~np.isin(row, list(special))
  chosen = candidates & (rng.random(row.shape) < rate)
  if candidates.any() and not chosen.any():
    chosen[rng.choice(np.flatnonzero(candidates))] = True
  how = rng.random(row.shape)
  out = row.copy()
  out[chosen & (how < mask_frac)] = mask_id
  swap = chosen & (how >= mask_frac) & (how < mask_frac + random_frac)
  out[swap] = rng.integers(0, random_ids, size=int(swap.sum()))
  return out, chosen


DOCUMENTS = ("caption", "all_captions")


class MaskedTokens:
  """Masked-language-model fields of one caption (or one document of a text corpus):

    text        int32 [L]  the corrupted ids the encoder reads (`bos ... eos pad`)
    mlm_target  int32 [L]  the original ids
    mlm_mask    bool [L]   the positions the loss predicts

  `document` says what one row holds: 'caption' (training draws one of the example's captions,
  evaluation takes the first) or 'all_captions' (the example's captions joined into one
  document, in a random order in training, in stored order in evaluation: a masked word may then
  be read off another sentence about the same image, as BERT reads multi-sentence documents).
  The corruption comes from the example's own rng in training (a resumed run repeats it) and from
  an rng seeded by the text in evaluation, so every evaluation of a split masks the same
  positions.
  """
  requires = (CAPTIONS,)
  provides = ("text", "mlm_target", "mlm_mask")

  def __init__(self, tokenizer, length: int, mask_id: int, rate: float = 0.15,
               mask_frac: float = 0.8, random_frac: float = 0.1, document: str = "caption"):
    if document not in DOCUMENTS:
      raise ValueError(f"document: unknown {document!r}; expected one of {', '.join(DOCUMENTS)}")
    self.document = document
    if not 0 < rate <= 1 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
      raise ValueError(f"loss.mask_rate / mask_frac / random_frac: need 0 < rate <= 1 and "
                       f"fractions >= 0 summing to <= 1, got {rate} / {mask_frac} / "
                       f"{random_frac}")
    self.tokenizer, self.length, self.mask_id = tokenizer, int(length), int(mask_id)
    self.rate, self.mask_frac, self.random_frac = float(rate), float(mask_frac), float(random_frac)

  def __call__(self, raw, rng, train):
    captions = clean_captions(raw.get("captions"))
    if self.document == "all_captions":
      order = rng.permutation(len(captions)) if train else range(len(captions))
      caption = " ".join(captions[i] for i in order)
    else:
      caption = captions[int(rng.integers(len(captions)))] if train else captions[0]
    seed = int(rng.integers(2**63)) if train else zlib.crc32(caption.encode("utf-8"))
    return {"_mlm_text": caption, "_mlm_seed": seed}

  def padding(self):
    return {"_mlm_text": None, "_mlm_seed": 0}

  def collate(self, examples):
    tok = self.tokenizer
    n = len(examples)
    text = np.full((n, self.length), tok.pad_id, np.int32)
    target = text.copy()
    chosen = np.zeros((n, self.length), bool)
    rows = [i for i, e in enumerate(examples) if e["_mlm_text"] is not None]
    if rows:
      target[rows] = tok.encode([examples[i]["_mlm_text"] for i in rows], self.length)
    special = {tok.pad_id, tok.bos_id, tok.eos_id}
    for i in rows:
      text[i], chosen[i] = mask_tokens(
          target[i], np.random.default_rng(examples[i]["_mlm_seed"]), special=special,
          mask_id=self.mask_id, random_ids=int(tok.vocab_size), rate=self.rate,
          mask_frac=self.mask_frac, random_frac=self.random_frac)
    return {"text": text, "mlm_target": target, "mlm_mask": chosen}


def normalize_answer(answer) -> str:
  """An answer as the answer vocabulary stores it: stripped, lower-case, spaces collapsed."""
  return " ".join(str(answer).lower().split())


def answer_scores(human_answers, vocabulary_index: dict, num_classes: int) -> np.ndarray:
  """float32 [C] soft targets of one question: each vocabulary answer scores min(#humans who
  gave it / 3, 1) (the VQA accuracy of answering it, as the VQAv2 classifier baselines train);
  answers outside the vocabulary add nothing."""
  out = np.zeros((num_classes,), np.float32)
  for a in human_answers:
    i = vocabulary_index.get(normalize_answer(a))
    if i is not None:
      out[i] += 1.0 / 3.0
  return np.minimum(out, 1.0)


class QuestionAnswerScores:
  """One visual question of the image and its soft answer targets (a VQA classifier):

    text           int32 [L]  the question, tokenized (`bos ... eos pad`)
    answer_scores  float32 [C]  `answer_scores` over the answer vocabulary

  Training draws one of the image's questions (from the example's own rng); evaluation takes the
  first. An image without questions is skipped and counted (`no_question`).
  """
  provides = ("text", "answer_scores")

  def __init__(self, tokenizer, length: int, answers):
    from vlm_jax.data.sources.common import QUESTIONS  # pylint: disable=g-import-not-at-top
    self.tokenizer, self.length = tokenizer, int(length)
    self.index = {normalize_answer(a): i for i, a in enumerate(answers)}
    self.num_classes = len(answers)
    self.requires = (QUESTIONS,)

  def __call__(self, raw, rng, train):
    questions = raw.get("questions") or []
    if not questions:
      raise BadExample("no_question")
    q = questions[int(rng.integers(len(questions)))] if train else questions[0]
    return {"_question": str(q["question"]),
            "answer_scores": answer_scores(q.get("answers") or [], self.index, self.num_classes)}

  def padding(self):
    return {"_question": None, "answer_scores": np.zeros((self.num_classes,), np.float32)}

  def collate(self, examples):
    texts = [e["_question"] for e in examples]
    rows = [i for i, t in enumerate(texts) if t is not None]
    out = np.full((len(examples), self.length), self.tokenizer.pad_id, np.int32)
    if rows:
      out[rows] = self.tokenizer.encode([texts[i] for i in rows], self.length)
    return {"text": out, "answer_scores": np.stack([e["answer_scores"] for e in examples])}
