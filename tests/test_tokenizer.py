"""Tests of the SentencePiece tokenizer: training on the shapes captions, fixed-length encoding
with bos/eos/pad, decoding, loading from files and bytes, caching across processes."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from data_fixtures import shapes_tokenizer  # pylint: disable=unused-import
from vlm_jax.data import shapes
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.data.tokenizer import Tokenizer

CORPUS = shapes.caption_corpus("tiny")


def test_special_ids(shapes_tokenizer):
  tok = shapes_tokenizer
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  # The captions' vocabulary is small: whole words, far fewer pieces than the bound asked for.
  assert 20 < tok.vocab_size < 1024


def test_round_trip_of_every_caption(shapes_tokenizer):
  tok = shapes_tokenizer
  ids = tok.encode(CORPUS, 32)
  assert ids.dtype == np.int32 and ids.shape == (len(CORPUS), 32)
  assert (ids[:, 0] == tok.bos_id).all()
  assert ((ids == tok.eos_id).sum(axis=1) == 1).all()
  assert not (ids == tok.unk_id).any()
  assert ids.min() >= 0 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == CORPUS
  # Caption words are single pieces, so captions stay short.
  assert (ids != tok.pad_id).sum(axis=1).max() <= 24


def test_prompts_have_no_unknown_pieces(shapes_tokenizer):
  prompts = [t.format(c) for t in shapes.PROMPT_TEMPLATES for c in shapes.class_names()]
  assert not (shapes_tokenizer.encode(prompts, 16) == shapes_tokenizer.unk_id).any()


def test_layout_bos_text_eos_then_padding(shapes_tokenizer):
  tok = shapes_tokenizer
  pieces = tok.tokenize(["a red circle."])[0]
  row = tok.encode(["a red circle."], 16)[0]
  n = len(pieces) + 2
  assert row.tolist() == [tok.bos_id] + pieces + [tok.eos_id] + [tok.pad_id] * (16 - n)
  # An empty text is just bos eos.
  assert tok.encode([""], 4)[0].tolist() == [tok.bos_id, tok.eos_id, 0, 0]


def test_truncation_keeps_eos(shapes_tokenizer):
  tok = shapes_tokenizer
  text = "a large red circle in the top left and a small blue square in the bottom right."
  pieces = tok.tokenize([text])[0]
  assert len(pieces) > 6
  row = tok.encode([text], 8)[0]
  assert row.tolist() == [tok.bos_id] + pieces[:6] + [tok.eos_id]
  assert tok.decode(row[None])[0] == "a large red circle in the"
  with pytest.raises(ValueError, match="context_length must be >= 2"):
    tok.encode([text], 1)


def test_decode_stops_at_eos_and_drops_specials(shapes_tokenizer):
  tok = shapes_tokenizer
  red, circle = tok.tokenize(["red circle"])[0]
  ids = np.array([[tok.bos_id, red, circle, tok.eos_id, red, 0],
                  [tok.bos_id, red, 0, circle, 0, 0]])   # no eos: read to the end
  assert tok.decode(ids) == ["red circle", "red circle"]
  assert tok.decode(ids[0]) == ["red circle"]              # 1-D: one sequence
  assert tok.decode([[red], [circle, tok.eos_id, red]]) == ["red", "circle"]  # ragged lists
  # Ids beyond the tokenizer's vocabulary (a model's padded vocabulary) show up as unknown.
  assert "⁇" in tok.decode([[red, tok.vocab_size + 5]])[0]


def test_bytes_input_and_input_errors(shapes_tokenizer):
  tok = shapes_tokenizer
  np.testing.assert_array_equal(tok.encode([b"a red circle."], 12),
                                tok.encode(["a red circle."], 12))
  with pytest.raises(ValueError, match="not valid UTF-8"):
    tok.encode([b"\xff\xfe"], 8)
  with pytest.raises(TypeError, match="list of texts"):
    tok.encode("a red circle.", 8)


def test_model_travels_as_bytes_and_files(shapes_tokenizer, tmp_path):
  proto = shapes_tokenizer.model_proto
  assert isinstance(proto, bytes)
  from_bytes = Tokenizer(proto)
  path = tmp_path / "sub" / "tok.model"
  from_bytes.save(path)
  from_file = Tokenizer.load(path)
  expected = shapes_tokenizer.encode(CORPUS[:50], 24)
  np.testing.assert_array_equal(from_bytes.encode(CORPUS[:50], 24), expected)
  np.testing.assert_array_equal(from_file.encode(CORPUS[:50], 24), expected)
  assert from_file.model_proto == proto
  unpickled = pickle.loads(pickle.dumps(shapes_tokenizer))
  np.testing.assert_array_equal(unpickled.encode(CORPUS[:50], 24), expected)


def test_missing_corrupt_and_incompatible_models(tmp_path):
  with pytest.raises(FileNotFoundError, match="no SentencePiece model at"):
    Tokenizer.load(tmp_path / "missing.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"this is not a sentencepiece model" * 10)
  with pytest.raises(ValueError, match="bad.model is not a usable SentencePiece model"):
    Tokenizer.load(bad)
  with pytest.raises(ValueError, match="non-empty bytes"):
    Tokenizer(b"")
  # SentencePiece's own defaults (unk=0, no pad) clash with padding by id 0.
  prefix = str(tmp_path / "default")
  with open(os.devnull, "w") as devnull:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix,
                                   vocab_size=60, hard_vocab_limit=False, logstream=devnull)
  with pytest.raises(ValueError, match="pad id is -1"):
    Tokenizer.load(prefix + ".model")


def test_training_is_deterministic_and_validated(tmp_path):
  a = tokenizer_lib.train_sentencepiece(CORPUS, None, 1024)
  b = tokenizer_lib.train_sentencepiece(iter(CORPUS), tmp_path / "b.model", 1024)
  assert a.model_proto == b.model_proto
  assert (tmp_path / "b.model").read_bytes() == a.model_proto
  with pytest.raises(ValueError, match="no non-empty texts"):
    tokenizer_lib.train_sentencepiece(["", "  "], None, 100)
  with pytest.raises(ValueError, match="too small"):
    tokenizer_lib.train_sentencepiece(CORPUS, None, 3)


def test_lowercase_option():
  folded = tokenizer_lib.train_sentencepiece(CORPUS, None, 1024, lowercase=True)
  np.testing.assert_array_equal(folded.encode(["A RED Circle."], 10),
                                folded.encode(["a red circle."], 10))
  plain = tokenizer_lib.train_sentencepiece(CORPUS, None, 1024)
  assert (plain.encode(["A RED Circle."], 10) == plain.unk_id).any()


def test_get_or_train_trains_once_then_loads(tmp_path):
  path = tmp_path / "cache" / "shapes.model"
  calls = []

  def texts():
    calls.append(1)
    return CORPUS

  first = tokenizer_lib.get_or_train(path, texts, 512)
  second = tokenizer_lib.get_or_train(path, texts, 512)
  assert len(calls) == 1 and path.exists()
  assert first.model_proto == second.model_proto
  with pytest.raises(ValueError, match="trained with {'vocab_size': 512}"):
    tokenizer_lib.get_or_train(path, texts, 1024)
  with pytest.raises(ValueError, match="not {'lowercase': True, 'vocab_size': 512}"):
    tokenizer_lib.get_or_train(path, texts, 512, lowercase=True)
  assert len(calls) == 1


def test_get_or_train_from_two_processes_at_once(tmp_path):
  """Two processes race for the same cache: one trains, the other waits and loads the result."""
  script = textwrap.dedent(f"""
      import hashlib, os, sys, time
      from vlm_jax.data import tokenizer
      def texts():
        with open({str(tmp_path / "trainings")!r}, "a") as f:
          f.write("x")
        time.sleep(1.5)  # hold the lock while the other process arrives
        return ["a red circle.", "two blue squares.", "a small green triangle."] * 50
      tok = tokenizer.get_or_train({str(tmp_path / "tok.model")!r}, texts, 200)
      print(hashlib.sha256(tok.model_proto).hexdigest())
  """)
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=60) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert outs[0][0] == outs[1][0] and len(outs[0][0].strip()) == 64
  assert (tmp_path / "trainings").read_text() == "x"
  assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


def test_training_works_when_stderr_has_no_file_descriptor(monkeypatch):
  """Notebook kernels may replace sys.stderr by a stream without fileno()."""
  import io
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  tok = tokenizer_lib.train_sentencepiece(["a red circle", "two blue squares"] * 20, None,
                                      vocab_size=40)
  assert tok.decode(tok.encode(["a red circle"], 8)) == ["a red circle"]
