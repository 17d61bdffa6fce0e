"""The OpenAI CLIP byte-level BPE tokenizer (for imported OpenAI / OpenCLIP / HF CLIP weights).

A checkpoint imported with `vlm_jax.convert` must see text tokenised exactly as its original
did. This module re-implements OpenAI's tokenizer from its vocabulary file (the
`bpe_simple_vocab_16e6.txt.gz` format: a header line, then one merge `a b` per line):

  text -> clean -> lowercase -> pre-tokenise -> bytes as printable characters -> BPE merges
       -> ids, framed as `<start_of_text> ids <end_of_text> 0 0 ...` (context 77 by default).

Ids: the 256 byte symbols, the same 256 with the end-of-word marker `</w>`, one id per merge
(in file order), then `<start_of_text>` and `<end_of_text>`; with the full OpenAI file that is
49408 ids, bos 49406, eos 49407. Padding is id 0, as in the original (which is also the '!'
byte symbol; OpenAI CLIP pools at the eos, the largest id, and never masks padding).

Cleaning is the reference's: `ftfy.fix_text` (mojibake repair, curly quotes to straight ones,
ligatures and full-width forms to plain ones, NFC), HTML unescaping twice, whitespace collapsing,
lowercasing. Without ftfy, text such as `“x”`, `ﬁ`, `ｆｕｌｌ` or `cafÃ©` would get other ids
than the ones the imported weights were trained on. The pre-tokeniser is the reference's
regular expression (`'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`, plus the two
special-token strings) written as a scanner over Unicode categories, so no third-party regex
module is needed.
"""
from __future__ import annotations

import collections
import gzip
import html
import json
import os
import unicodedata

import ftfy
import numpy as np

BOS_TOKEN = "<start_of_text>"
EOS_TOKEN = "<end_of_text>"
PAD_ID = 0
CONTEXT_LENGTH = 77
# The reference reads exactly this many merges from the 16e6 vocabulary file (which holds more):
# 49152 ids = 256 bytes + 256 bytes with '</w>' + merges, then 2 special tokens -> 49408.
MAX_MERGES = 49152 - 256 - 2
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_SPECIALS = (BOS_TOKEN, EOS_TOKEN)
_CACHE_LIMIT = 100_000


def bytes_to_unicode() -> dict[int, str]:
  """Maps each byte 0..255 to a printable character, as OpenAI's GPT-2/CLIP BPE does.

  Printable Latin-1 bytes map to themselves; the remaining 68 (controls, space, ...) map to
  chr(256), chr(257), ... in byte order. The dict's insertion order (printable bytes first) is
  the order of the first 256 vocabulary ids.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def clean_text(text: str) -> str:
  """ftfy (which also NFC-normalises), HTML-unescape (twice: captions are often double-escaped),
  collapse whitespace, lowercase -- the reference's order."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  return " ".join(text.split()).lower()


def _kind(ch: str) -> str:
  """'L' letter, 'N' number, 'S' whitespace, 'O' anything else (the reference regex's classes)."""
  if ch.isspace():
    return "S"
  cat = unicodedata.category(ch)[0]
  return cat if cat in ("L", "N") else "O"


def pre_tokenize(text: str) -> list[str]:
  """Splits cleaned text the way the reference's `regex.findall` does.

  At each position the first matching alternative wins: a special-token string, a contraction,
  a run of letters, ONE number character, or a run of other non-space characters (which may
  swallow apostrophes and the start of a special-token string, as in the reference).
  Whitespace matches nothing and is skipped.
  """
  pieces, i, n = [], 0, len(text)
  while i < n:
    kind = _kind(text[i])
    if kind == "S":
      i += 1
      continue
    match = next((s for s in _SPECIALS + _CONTRACTIONS if text.startswith(s, i)), None)
    if match is not None:
      j = i + len(match)
    elif kind == "N":
      j = i + 1
    else:
      j = i + 1
      while j < n and _kind(text[j]) == kind:
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
  """Reads a merges file (gzip or plain UTF-8): a header line, then `left right` per line."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer: no BPE vocabulary file at {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"tokenizer: {path} is not a BPE merges file (gzip or UTF-8 text): {e}") from e
  merges = []
  for lineno, line in enumerate(lines[1:], start=2):
    if len(merges) == MAX_MERGES:
      break
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"tokenizer: {path} line {lineno}: expected a merge 'left right', "
                       f"got {line[:80]!r}")
    merges.append((parts[0], parts[1]))
  if not merges:
    raise ValueError(f"tokenizer: {path} holds no merges (expected a header line, then one "
                     "'left right' merge per line)")
  return merges


class BPETokenizer:
  """OpenAI CLIP's tokenizer; same interface as `vlm_jax.data.tokenizer.Tokenizer`.

  Attributes:
    vocab_size: 512 + number of merges + 2 (49408 for the OpenAI file).
    pad_id (0), bos_id, eos_id: special ids; eos is the largest id.
    path: the merges file it was loaded from (None when built from a list).
  """

  kind = "bpe"

  def __init__(self, merges: list[tuple[str, str]], path: str | None = None):
    self.path = path
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    symbols = list(self._byte_encoder.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += list(_SPECIALS)
    # A merge may repeat an earlier string; the reference's dict then keeps the LAST id.
    self._encoder = {token: i for i, token in enumerate(vocab)}
    self._decoder = dict(enumerate(vocab))
    # As in the reference, a repeated merge keeps its last rank.
    self._ranks = {merge: rank for rank, merge in enumerate(merges)}
    self._vocab_size = len(vocab)
    self._cache: dict[str, list[int]] = {}

  @classmethod
  def load(cls, path: str | os.PathLike) -> "BPETokenizer":
    """Loads a `bpe_simple_vocab_16e6.txt.gz`-style merges file (gzip or plain text)."""
    return cls(read_merges(path), path=os.fspath(path))

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return self._vocab_size - 2

  @property
  def eos_id(self) -> int:
    return self._vocab_size - 1

  def __repr__(self):
    return (f"BPETokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
            f"eos={self.eos_id})")

  def _bpe(self, piece: str) -> list[int]:
    """Ids of one pre-tokenised piece: merge the lowest-ranked adjacent pair until none applies."""
    cached = self._cache.get(piece)
    if cached is not None:
      return cached
    if piece in _SPECIALS:
      ids = [self._encoder[piece]]
    else:
      chars = [self._byte_encoder[b] for b in piece.encode("utf-8")]
      word = chars[:-1] + [chars[-1] + "</w>"]
      while len(word) > 1:
        best = min(zip(word, word[1:]), key=lambda p: self._ranks.get(p, float("inf")))
        if best not in self._ranks:
          break
        merged, i = [], 0
        while i < len(word):   # merge every (left-to-right, non-overlapping) occurrence
          if i + 1 < len(word) and (word[i], word[i + 1]) == best:
            merged.append(word[i] + word[i + 1])
            i += 2
          else:
            merged.append(word[i])
            i += 1
        word = merged
      ids = [self._encoder[token] for token in word]
    if len(self._cache) < _CACHE_LIMIT:
      self._cache[piece] = ids
    return ids

  def tokenize(self, texts) -> list[list[int]]:
    """Ragged ids without special tokens (a list of lists of int)."""
    return [[i for piece in pre_tokenize(clean_text(t)) for i in self._bpe(piece)]
            for t in _as_texts(texts)]

  def encode(self, texts, length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Texts -> int32 [N, length]: `bos ids eos 0 0 ...`; a too long text is cut and its last
    kept position replaced by eos (so every row ends with eos, as the reference does)."""
    if length < 2:
      raise ValueError(f"tokenizer: length {length} leaves no room for bos and eos "
                       "(model.text.context_length must be >= 2)")
    pieces = self.tokenize(texts)
    out = np.full((len(pieces), length), self.pad_id, np.int32)
    for i, ids in enumerate(pieces):
      row = [self.bos_id] + ids[:length - 2] + [self.eos_id]
      out[i, :len(row)] = row
    return out

  def decode(self, ids) -> list[str]:
    """int ids [N, L] (or one sequence) -> N texts; each row is read up to its first eos, bos is
    dropped (padding follows the eos). Bytes that are not valid UTF-8 decode as U+FFFD."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"tokenizer: decode expects ids of rank 1 or 2, got shape {ids.shape}")
    texts = []
    for row in ids.tolist():
      data = bytearray()
      for t in row:
        if t == self.eos_id:
          break
        if t == self.bos_id:
          continue
        if not 0 <= t < self.vocab_size:
          raise ValueError(f"tokenizer: id {t} is outside the vocabulary [0, {self.vocab_size})")
        token = self._decoder[t]
        end_of_word = token.endswith("</w>")
        data.extend(self._byte_decoder[c] for c in (token[:-4] if end_of_word else token))
        if end_of_word:
          data.extend(b" ")
      texts.append(data.decode("utf-8", errors="replace").strip())
    return texts


def load(path: str | os.PathLike) -> BPETokenizer:
  return BPETokenizer.load(path)


# Hugging Face's names for the two special tokens (the ids are the same).
HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def hf_files(tokenizer: BPETokenizer, context_length: int = CONTEXT_LENGTH) -> dict[str, bytes]:
  """The tokenizer as transformers' `CLIPTokenizer` files: {filename: bytes} of vocab.json,
  merges.txt, tokenizer_config.json and special_tokens_map.json.

  `AutoTokenizer.from_pretrained(DIR)(texts, padding='max_length', max_length=context_length,
  truncation=True)` then gives `tokenizer.encode(texts, context_length)`'s ids up to and with
  the eos: the same vocabulary and merges, the special tokens under Hugging Face's names. It
  pads with `<|endoftext|>`, as OpenAI's CLIP tokenizers on the Hub do, not with id 0: a pad
  token is split out of the text before BPE, and id 0 is the real token '!'. A CLIP pools at the
  first eos and attends causally, so the padding changes no embedding. Hugging Face's text
  cleaning has no ftfy repair and no HTML unescaping, so only text those change gets other ids
  there."""
  # pylint: disable=protected-access
  tokens = [tokenizer._decoder[i] for i in range(tokenizer.vocab_size)]
  if len(set(tokens)) != len(tokens):
    repeated = sorted(t for t, n in collections.Counter(tokens).items() if n > 1)[:5]
    raise ValueError(f"tokenizer: its merges make some tokens twice ({', '.join(repeated)}): "
                     "a vocab.json (one id per token) cannot hold every id")
  tokens[-2:] = HF_SPECIALS
  merges = sorted(tokenizer._ranks, key=tokenizer._ranks.get)
  bos, eos = HF_SPECIALS
  specials = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
  config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(context_length),
            "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, **specials}
  as_json = lambda obj: json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")
  return {"vocab.json": as_json({t: i for i, t in enumerate(tokens)}),
          "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
          "tokenizer_config.json": as_json(config),
          "special_tokens_map.json": as_json(specials)}


def _as_texts(texts) -> list[str]:
  if isinstance(texts, (str, bytes)):
    raise TypeError("tokenizer: pass a list of texts, not a single string")
  out = []
  for i, t in enumerate(texts):
    if isinstance(t, (bytes, np.bytes_)):
      try:
        t = bytes(t).decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer: text {i} is not valid UTF-8: {bytes(t)[:60]!r}") from e
    if not isinstance(t, str):
      raise TypeError(f"tokenizer: text {i} is a {type(t).__name__}, expected str or bytes")
    out.append(t)
  return out
