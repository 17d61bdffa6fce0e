"""Hugging Face tokenizer files through the `tokenizers` library (`tokenizer.kind='hf'`).

`tokenizer.model_path` may be
  * a `tokenizer.json` (any model the library reads: byte-level BPE of GPT-2 / Llama 3, the
    SentencePiece-derived ones of T5 / Llama 2, WordPiece of BERT, CLIP's BPE), or a folder
    holding one;
  * a folder with GPT-2's `vocab.json` + `merges.txt` (byte-level BPE);
  * a folder with BERT's `vocab.txt` (WordPiece; lower-cased unless its
    `tokenizer_config.json` says `"do_lower_case": false`).

Encoding is the same as for every vlm_jax tokenizer: `bos ids eos pad...` at a fixed length, a
long text cut before its eos. The special tokens are found by their usual names (below); a
tokenizer without an end-of-sequence token is refused, one without a padding token pads with
id 0 (the model masks `model.text.pad_id`, 0 by default). The run stores the tokenizer as its
`tokenizer.json` text, so a checkpoint never depends on the original files.
"""
from __future__ import annotations

import json
import os

import numpy as np
from etils import epath

BOS_NAMES = ("<|startoftext|>", "<s>", "[CLS]", "<bos>", "<|begin_of_text|>")
EOS_NAMES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|end_of_text|>", "<|eot_id|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _first_id(tok, names):
  for name in names:
    i = tok.token_to_id(name)
    if i is not None:
      return int(i)
  return None


def read_files(path):
  """The `tokenizers.Tokenizer` of a tokenizer.json, or of a folder (see the module doc)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"tokenizer.model_path: {path} does not exist")
  if p.is_dir() and (p / "tokenizer.json").exists():
    p = p / "tokenizer.json"
  try:
    if not p.is_dir():
      return tokenizers.Tokenizer.from_str(p.read_text())
    if (p / "vocab.json").exists() and (p / "merges.txt").exists():
      bpe = tokenizers.models.BPE.from_file(os.fspath(p / "vocab.json"),
                                            os.fspath(p / "merges.txt"))
      tok = tokenizers.Tokenizer(bpe)
      tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = tokenizers.decoders.ByteLevel()
      return tok
    if (p / "vocab.txt").exists():
      lower = True
      if (p / "tokenizer_config.json").exists():
        lower = bool(json.loads((p / "tokenizer_config.json").read_text()).get("do_lower_case",
                                                                                 True))
      return tokenizers.BertWordPieceTokenizer(os.fspath(p / "vocab.txt"),
                                               lowercase=lower)._tokenizer  # pylint: disable=protected-access
  except Exception as e:  # the library raises plain Exceptions for unreadable files
    raise ValueError(f"tokenizer.model_path: {path} is not a readable Hugging Face tokenizer "
                     f"({e})") from e
  raise FileNotFoundError(f"tokenizer.model_path: {path} holds no tokenizer.json, vocab.json + "
                          "merges.txt or vocab.txt")


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the vlm_jax tokenizer interface (see `tokenizer.Tokenizer`)."""

  kind = "hf"

  def __init__(self, tok, source: str = "tokenizer"):
    self._tok = tok
    self._tok.no_padding()
    self._tok.no_truncation()
    self._eos = _first_id(tok, EOS_NAMES)
    if self._eos is None:
      raise ValueError(f"tokenizer: {source} has no end-of-sequence token (looked for "
                       f"{', '.join(EOS_NAMES)}); sequences must end with one")
    bos = _first_id(tok, BOS_NAMES)
    self._bos = -1 if bos is None or bos == self._eos else bos
    pad = _first_id(tok, PAD_NAMES)
    self._pad = 0 if pad is None else pad

  @classmethod
  def load(cls, path) -> "HFTokenizer":
    return cls(read_files(path), source=str(path))

  @classmethod
  def from_bytes(cls, data: bytes) -> "HFTokenizer":
    import tokenizers  # pylint: disable=g-import-not-at-top
    return cls(tokenizers.Tokenizer.from_str(data.decode("utf-8")))

  def to_bytes(self) -> bytes:
    return self._tok.to_str().encode("utf-8")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  def __repr__(self):
    return (f"HFTokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
            f"eos={self.eos_id})")

  def token_to_id(self, token: str):
    """The id of the special token or piece `token`, or None."""
    i = self._tok.token_to_id(token)
    return None if i is None else int(i)

  def tokenize(self, texts) -> list:
    """Ragged ids without special tokens."""
    texts = [texts] if isinstance(texts, (str, bytes)) else list(texts)
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def encode(self, texts, length: int) -> np.ndarray:
    """Texts -> int32 [N, length]: `bos ids eos pad...`, cut before the eos when too long."""
    from vlm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    return tokenizer.pack(self.tokenize(texts), length, self._bos, self._eos, self._pad)

  def decode(self, ids) -> list:
    """int ids [N, L] (or one sequence) -> N texts, each read up to its first eos; bos and pad
    are dropped."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"tokenizer: decode expects ids of rank 1 or 2, got shape {ids.shape}")
    skip = {self._pad, self._bos}
    rows = []
    for row in ids.tolist():
      kept = []
      for t in row:
        if t == self._eos:
          break
        if t not in skip and 0 <= t < self.vocab_size:
          kept.append(int(t))
      rows.append(kept)
    return [text.strip() for text in self._tok.decode_batch(rows, skip_special_tokens=True)]
