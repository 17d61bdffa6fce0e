"""SentencePiece tokenizer: train from captions, load, encode to fixed-length ids, decode.

Every text the models see is `bos tok tok ... eos pad pad` (int32, padding at the end, pad id 0),
as the contract of the text towers and the caption decoder requires. A model trained here always
uses pad=0, unk=1, bos=2, eos=3. Existing `.model` files are accepted when their pad id is 0 and
they have an eos (e.g. T5's, which has no bos: its sequences then start with the first token).

The serialized model (`Tokenizer.model_proto`, a few kB for caption vocabularies) is what
checkpoints store, so a trained run never depends on a tokenizer file that may have moved.
"""
import fcntl
import io
import json
import os
import sys
import tempfile

from etils import epath
import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _as_text(text, index):
  if isinstance(text, (bytes, np.bytes_)):
    try:
      return bytes(text).decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"tokenizer: text {index} is not valid UTF-8: {bytes(text)[:60]!r}") from e
  if not isinstance(text, str):
    raise TypeError(f"tokenizer: text {index} is a {type(text).__name__}, expected str or bytes")
  return text


def _as_texts(texts):
  if isinstance(texts, (str, bytes)):
    raise TypeError("tokenizer: pass a list of texts, not a single string")
  return [_as_text(t, i) for i, t in enumerate(texts)]


def pack(pieces, length: int, bos_id: int, eos_id: int, pad_id: int) -> np.ndarray:
  """Ragged ids -> int32 [N, length]: `bos ids eos pad...` (no bos when bos_id < 0). A row too
  long is cut before its eos, so every row keeps it."""
  if length < 2:
    raise ValueError(f"tokenizer: length {length} leaves no room for bos and eos "
                     "(model.text.context_length must be >= 2)")
  prefix = [bos_id] if bos_id >= 0 else []
  room = length - len(prefix) - 1
  out = np.full((len(pieces), length), pad_id, np.int32)
  for i, ids in enumerate(pieces):
    row = prefix + list(ids[:room]) + [eos_id]
    out[i, :len(row)] = row
  return out


class Tokenizer:
  """A loaded SentencePiece model with fixed-length encoding.

  Attributes:
    vocab_size: number of pieces (ids are in [0, vocab_size)).
    pad_id, bos_id, eos_id, unk_id: special ids; bos_id is -1 for models without one.
    model_proto: the serialized model (bytes); `Tokenizer(model_proto)` rebuilds it.
  """

  def __init__(self, model_proto):
    if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
      raise ValueError("tokenizer: expected the serialized SentencePiece model as non-empty "
                       f"bytes, got {type(model_proto).__name__}")
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
      raise ValueError(f"tokenizer: not a valid SentencePiece model ({e})") from e
    if self._sp.pad_id() != 0:
      raise ValueError(f"tokenizer: the model's pad id is {self._sp.pad_id()}, but vlm_jax pads "
                       "with id 0 (model.text.pad_id); train one with train_sentencepiece")
    if self._sp.eos_id() < 0:
      raise ValueError("tokenizer: the model has no eos piece; sequences must end with eos")

  # Pickled as the serialized model, so a Tokenizer can cross into data-loading worker processes.
  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  @classmethod
  def load(cls, path):
    """Loads a `.model` file (any path etils.epath can read, e.g. local or gs://)."""
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"tokenizer: no SentencePiece model at {path}")
    try:
      return cls(path.read_bytes())
    except ValueError as e:
      raise ValueError(f"tokenizer: {path} is not a usable SentencePiece model: {e}") from e

  def save(self, path):
    _atomic_write(path, self._proto)

  @property
  def model_proto(self):
    return self._proto

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  @property
  def pad_id(self):
    return self._sp.pad_id()

  @property
  def bos_id(self):
    return self._sp.bos_id()

  @property
  def eos_id(self):
    return self._sp.eos_id()

  @property
  def unk_id(self):
    return self._sp.unk_id()

  def __repr__(self):
    return (f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
            f"eos={self.eos_id}, unk={self.unk_id})")

  def token_to_id(self, token: str):
    """The id of the piece `token`, or None when the model has no such piece."""
    i = int(self._sp.piece_to_id(token))
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

  def tokenize(self, texts):
    """Ragged ids without special tokens (a list of lists of int)."""
    return self._sp.encode(_as_texts(texts), out_type=int)

  def encode(self, texts, length):
    """Texts -> int32 [N, length]: `bos ids eos pad...`; too long texts are cut before the eos,
    so every row keeps its eos (the text towers pool at it and the decoder learns to stop)."""
    return pack(self.tokenize(texts), length, self.bos_id, self.eos_id, self.pad_id)

  def decode(self, ids):
    """int ids [N, L] (or a list of id lists; 1-D = one sequence) -> N texts.

    Each row is read up to its first eos; bos and pad are dropped; ids outside the vocabulary
    (a model's vocabulary can be padded beyond the tokenizer's) decode as unk, visibly.
    """
    if isinstance(ids, np.ndarray) or hasattr(ids, "__array__"):
      ids = np.asarray(ids)
      if ids.ndim == 1:
        ids = ids[None]
      if ids.ndim != 2:
        raise ValueError(f"tokenizer: decode expects ids of rank 1 or 2, got shape {ids.shape}")
      ids = ids.tolist()
    elif ids and not isinstance(ids[0], (list, tuple, np.ndarray)):
      ids = [ids]
    skip = {self.pad_id, self.bos_id}
    texts = []
    for row in ids:
      kept = []
      for t in row:
        t = int(t)
        if t == self.eos_id:
          break
        if t in skip:
          continue
        kept.append(t if 0 <= t < self.vocab_size else self.unk_id)
      texts.append(self._sp.decode(kept))
    return texts


def _has_fileno(stream):
  try:
    stream.fileno()
    return True
  except (AttributeError, ValueError, io.UnsupportedOperation):
    return False


def train_sentencepiece(texts, model_path, vocab_size, *, model_type="bpe",
                        lowercase=False, character_coverage=1.0, max_sentences=0, seed=0):
  """Trains a SentencePiece model on `texts` and returns its Tokenizer (also written to
  `model_path` unless that is None).

  Args:
    texts: iterable of str/bytes; empty ones are skipped.
    model_path: where to write the `.model` (atomically), or None to keep it in memory.
    vocab_size: the largest vocabulary wanted. For a small corpus (a caption generator's few
      dozen words) SentencePiece may find fewer pieces; the result is then smaller, never an
      error. Must not exceed model.text.vocab_size.
    model_type: 'bpe' (default: on a small caption corpus it learns whole words) | 'unigram'
      (the usual choice for large corpora) | 'word' | 'char'.
    lowercase: case-fold while normalising (also at encode time: it is stored in the model).
    character_coverage: fraction of characters covered by the vocabulary (1.0 for small
      alphabets; 0.9995 is usual for large multilingual corpora).
    max_sentences: train on a seeded sample of this many texts (0 = all).
    seed: seed of that sampling. Training is single-threaded so the result is deterministic.
  """
  if vocab_size < 5:
    raise ValueError(f"tokenizer: vocab_size {vocab_size} is too small (4 special ids + pieces)")
  sentences = [t.replace("\n", " ").strip() for t in _as_texts(texts)]
  sentences = [t for t in sentences if t]
  if not sentences:
    raise ValueError("tokenizer: no non-empty texts to train on")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  with open(os.devnull, "w") as devnull:
    # sentencepiece redirects its log through sys.stderr's file descriptor; some notebook kernels
    # give sys.stderr no descriptor, and there the log simply stays on.
    quiet = {"logstream": devnull} if _has_fileno(sys.stderr) else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        **quiet,
        vocab_size=vocab_size,
        hard_vocab_limit=False,   # a small corpus gives a smaller vocabulary instead of failing
        model_type=model_type,
        character_coverage=character_coverage,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
    )
  tokenizer = Tokenizer(model.getvalue())
  if model_path is not None:
    tokenizer.save(model_path)
  return tokenizer


def get_or_train(cache_path, texts_fn, vocab_size, **train_kwargs):
  """Loads the tokenizer cached at `cache_path`, or trains it on `texts_fn()` and caches it.

  Several processes may call this at once (e.g. all hosts of a run on a shared disk): a file
  lock lets one train while the others wait, and the model is written to a temporary file and
  renamed, so a reader never sees a partial file. `texts_fn` is only called when training.
  The training arguments are kept next to the model (`<cache_path>.json`); a cache trained with
  other arguments is an error, not a silent reuse.
  """
  cache_path = os.fspath(cache_path)
  args_path = cache_path + ".json"
  args = json.loads(json.dumps(dict(train_kwargs, vocab_size=vocab_size), sort_keys=True))

  def load():
    if os.path.exists(args_path):
      with open(args_path) as f:
        cached = json.load(f)
      if cached != args:
        raise ValueError(
            f"tokenizer: {cache_path} was trained with {cached}, not {args}; delete it (and "
            f"{os.path.basename(args_path)}) or choose another cache path")
    return Tokenizer.load(cache_path)

  if os.path.exists(cache_path):
    return load()
  os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
  with open(cache_path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if os.path.exists(cache_path):  # another process trained it while we waited
        return load()
      tok = train_sentencepiece(texts_fn(), None, vocab_size, **train_kwargs)
      _atomic_write(args_path, json.dumps(args, sort_keys=True).encode())
      tok.save(cache_path)  # last: its presence marks a complete cache
      return tok
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write(path, data):
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---- command line: train a SentencePiece model on the captions of any source -------------------

_CLI_USAGE = r"""Trains a SentencePiece tokenizer on the captions of a data source.

  python -m vlm_jax.data.tokenizer train --source wds --shards 'shards/{00000..00099}.tar' \
      --vocab 32000 --out tok.model
  python -m vlm_jax.data.tokenizer train --source jsonl --jsonl data/captions.jsonl --vocab 8000 \
      --out tok.model
  python -m vlm_jax.data.tokenizer train --source tfds --tfds coco_captions \
      --text_key captions/text --vocab 32000 --out tok.model

Reads the captions of the first --max_records records (storage order), trains with the ids every
vlm_jax model expects (pad 0, unk 1, bos 2, eos 3), and writes --out atomically. Then train with
--config.tokenizer.model_path=tok.model (and model.text.vocab_size >= the printed size).
"""


def _define_cli_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("source", None, ["tfds", "wds", "jsonl"], "Kind of source.")
  flags.DEFINE_string("shards", None, "wds: brace / glob pattern of tar shards.")
  flags.DEFINE_string("jsonl", None, "jsonl: the captions.jsonl file.")
  flags.DEFINE_string("tfds", None, "tfds: dataset name, e.g. coco_captions.")
  flags.DEFINE_string("data_dir", None, "tfds: data_dir.")
  flags.DEFINE_string("split", "train", "tfds: split.")
  flags.DEFINE_string("text_key", "captions", "tfds: feature path of the captions.")
  flags.DEFINE_integer("vocab", 32000, "Largest vocabulary wanted (a small corpus gives fewer).")
  flags.DEFINE_string("out", None, "Where to write the .model file.")
  flags.DEFINE_integer("max_records", 1_000_000, "Read the captions of this many records.")
  flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "word", "char"],
                    "SentencePiece model type.")
  flags.DEFINE_bool("lowercase", False, "Case-fold texts (stored in the model).")
  flags.mark_flags_as_required(["source", "out"])


def _cli_main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vlm_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if argv[1:] != ["train"]:
    raise SystemExit("usage: python -m vlm_jax.data.tokenizer train --source ... --out tok.model"
                     " (see --help)")
  data = config_defaults.data_config()
  data.source = f.source
  if f.source == "wds":
    data.train_shards = f.shards
  elif f.source == "jsonl":
    data.train_jsonl = f.jsonl
  else:
    data.name, data.data_dir, data.train_split = f.tfds, f.data_dir, f.split
    data.text_key, data.label_key, data.id_key = f.text_key, "", ""
  needed = {"wds": ("shards", f.shards), "jsonl": ("jsonl", f.jsonl), "tfds": ("tfds", f.tfds)}
  flag, value = needed[f.source]
  try:
    if not value:
      raise ValueError(f"--{flag}: --source={f.source} reads it")
    source = sources.make_source(data, "train")
    texts = sources.captions(source, f.max_records)
    if not any(texts):
      raise ValueError(f"{source.describe()} holds no captions in its first {f.max_records} "
                       "records")
    print(f"training a {f.model_type} SentencePiece model on {len(texts)} captions of "
          f"{source.describe()} ...", flush=True)
    tok = train_sentencepiece(texts, f.out, f.vocab, model_type=f.model_type,
                              lowercase=f.lowercase)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {f.out}: vocab_size {tok.vocab_size} (set model.text.vocab_size >= "
        f"{tok.vocab_size}, tokenizer.model_path={f.out})")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  __doc__ = _CLI_USAGE   # what --help prints
  _define_cli_flags()
  app.run(_cli_main)
