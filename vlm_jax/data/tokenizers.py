"""The one place tokenizers are found, read, trained and stored for a run.

Kinds (`config.tokenizer.kind`):
  sentencepiece  a SentencePiece `.model` (`vlm_jax.data.tokenizer`); trained on the training
                 captions when no `tokenizer.model_path` is given
  bpe            OpenAI CLIP's byte-level BPE merges file (`vlm_jax.data.bpe`)
  hf             Hugging Face tokenizer files through the `tokenizers` library: tokenizer.json,
                 GPT-2's vocab.json + merges.txt, BERT's vocab.txt (`vlm_jax.data.hf_tokenizer`)

A run keeps its tokenizer's bytes in WORKDIR/tokenizer.model and in every checkpoint's metadata,
so evaluating it never depends on a file that may have moved.

Two text rules sit on top of any kind (`with_rules`): `tokenizer.pad='eos'` pads with the eos id
(big_vision's "sticky" eos, which SigLIP was trained with: its text tower reads the last
position, padding included) and `tokenizer.canonicalize=True` lower-cases, drops ASCII
punctuation and collapses whitespace before tokenizing (SigLIP's text normalisation).
"""
from __future__ import annotations

import base64
import os
import re
import string
import tempfile
from typing import Callable, Optional

from etils import epath

KINDS = ("sentencepiece", "bpe", "hf")
FILENAME = "tokenizer.model"          # WORKDIR/tokenizer.model
# What a kind that is not trained here needs in tokenizer.model_path.
NEEDS_FILE = {
    "bpe": "OpenAI CLIP's merges file bpe_simple_vocab_16e6.txt.gz (it ships inside the "
           "open_clip_torch and openai-clip packages)",
    "hf": "a tokenizer.json, or a folder with one (or vocab.json + merges.txt, or vocab.txt)",
}


PADS = ("pad", "eos")


def canonicalize(text: str) -> str:
  """Lower-case, ASCII punctuation removed, whitespace collapsed (SigLIP's text rule)."""
  text = text.lower().translate(str.maketrans("", "", string.punctuation))
  return re.sub(r"\s+", " ", text).strip()


class WithRules:
  """A tokenizer of any kind with the text rules of `config.tokenizer` (see the module
  docstring); everything else is the wrapped tokenizer's."""

  def __init__(self, tok, pad: str = "pad", canonicalize_text: bool = False):
    self.tok, self.pad, self.canonicalize_text = tok, pad, canonicalize_text

  def __getattr__(self, name):      # vocab_size, eos_id, decode, to_bytes, model_proto, ...
    if name == "tok":               # not set yet (unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.tok, name)

  @property
  def pad_id(self) -> int:
    return self.tok.eos_id if self.pad == "eos" else self.tok.pad_id

  def __repr__(self):
    return f"{self.tok!r} with pad={self.pad!r}, canonicalize={self.canonicalize_text}"

  def tokenize(self, texts) -> list:
    if self.canonicalize_text:
      texts = [canonicalize(t.decode("utf-8") if isinstance(t, bytes) else str(t))
               for t in ([texts] if isinstance(texts, (str, bytes)) else texts)]
    return self.tok.tokenize(texts)

  def encode(self, texts, length: int):
    from vlm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    return tokenizer.pack(self.tokenize(texts), length, self.tok.bos_id, self.tok.eos_id,
                          self.pad_id)


def with_rules(tok, tok_config):
  """`tok` with the text rules `tokenizer.pad` / `tokenizer.canonicalize` ask for (unchanged
  when they are the defaults)."""
  pad = tok_config.get("pad") or "pad"
  if pad not in PADS:
    raise ValueError(f"tokenizer.pad: unknown padding {pad!r}; expected one of {', '.join(PADS)}")
  canon = bool(tok_config.get("canonicalize"))
  if pad == "pad" and not canon:
    return tok
  return WithRules(tok, pad, canon)


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"tokenizer.kind: unknown tokenizer {kind!r}; expected one of "
                     f"{', '.join(KINDS)}")
  return kind


def read(kind: str, path: str):
  """The tokenizer of `kind` stored at `path` (local or any etils.epath location)."""
  check_kind(kind)
  if kind == "bpe":
    from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
    return bpe.load(path)
  if kind == "hf":
    from vlm_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.HFTokenizer.load(path)
  from vlm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.Tokenizer.load(path)


def from_bytes(kind: str, data: bytes):
  """The tokenizer of `kind` from its serialized bytes (`to_bytes`)."""
  check_kind(kind)
  if kind == "sentencepiece":
    from vlm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    return tokenizer.Tokenizer(data)
  if kind == "hf":
    from vlm_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.HFTokenizer.from_bytes(data)
  with tempfile.TemporaryDirectory() as tmp:   # the BPE reader takes a file
    path = os.path.join(tmp, FILENAME)
    with open(path, "wb") as f:
      f.write(data)
    return read(kind, path)


def to_bytes(tok) -> bytes:
  """The serialized tokenizer: a SentencePiece model proto, a tokenizer.json, or the BPE merges
  file's bytes."""
  if hasattr(tok, "to_bytes"):
    return tok.to_bytes()
  proto = getattr(tok, "model_proto", None)
  if proto:
    return bytes(proto)
  path = getattr(tok, "path", None)
  if not path:
    raise ValueError(f"tokenizer: {tok!r} was not loaded from a file and cannot be stored")
  return epath.Path(path).read_bytes()


def for_training(config, workdir: str, training_texts: Callable[[], list]):
  """The tokenizer a training run uses: `tokenizer.model_path` if set, else WORKDIR/
  tokenizer.model, trained on `training_texts()` the first time (a file lock makes concurrent
  processes agree)."""
  t = config.tokenizer
  kind = check_kind(t.kind)
  if t.model_path:
    return with_rules(read(kind, t.model_path), t)
  if kind != "sentencepiece":
    raise ValueError(f"tokenizer.model_path: tokenizer.kind={kind!r} needs {NEEDS_FILE[kind]}")
  from vlm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  return with_rules(tokenizer.get_or_train(os.path.join(workdir, FILENAME), training_texts,
                                           t.vocab_size), t)


def for_checkpoint(config, workdir: Optional[str], meta: Optional[dict] = None):
  """The tokenizer of a saved run (with its text rules), from (first found): WORKDIR/
  tokenizer.model, the copy in the checkpoint's metadata, or the config's `tokenizer.model_path`."""
  return with_rules(_stored(config, workdir, meta), config.get("tokenizer") or {})


def _stored(config, workdir: Optional[str], meta: Optional[dict]):
  tok_cfg = config.get("tokenizer") or {}
  kind = check_kind((meta or {}).get("tokenizer_kind") or tok_cfg.get("kind", "sentencepiece"))
  looked = []
  if workdir:
    path = os.path.join(workdir, FILENAME)
    looked.append(path)
    if os.path.isfile(path):
      return read(kind, path)
  if meta and meta.get("tokenizer_model_b64"):
    return from_bytes(kind, base64.b64decode(meta["tokenizer_model_b64"]))
  model_path = tok_cfg.get("model_path")
  if model_path:
    looked.append(model_path)
    if epath.Path(model_path).exists():
      return read(kind, model_path)
  raise FileNotFoundError(f"tokenizer: none found; looked for {looked or ['(no path)']} and in "
                          f"the checkpoint metadata (tokenizer.kind={kind!r})")


def check_fits(tok, spec, config) -> None:
  """The tokenizer must fit the model's text: ids below its vocabulary, the configured length."""
  if tok.vocab_size > spec.vocab_size:
    raise ValueError(f"tokenizer: its vocabulary ({tok.vocab_size} ids) is larger than the "
                     f"model's ({spec.vocab_size})")
  length = config.tokenizer.context_length
  if length != spec.context_length:
    raise ValueError(f"tokenizer.context_length={length} != the model's context length "
                     f"{spec.context_length}")
