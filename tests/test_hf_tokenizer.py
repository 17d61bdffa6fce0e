"""Hugging Face tokenizer files (tokenizer.kind='hf'): the ids of GPT-2's and BERT's own Python
tokenizers in transformers (an independent implementation) on files the tests train here."""
import numpy as np
import pytest

from vlm_jax.data import hf_tokenizer
from vlm_jax.data import shapes
from vlm_jax.data import tokenizers as tokenizers_lib

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXTS = ["a small red circle in the top left.", "Two BLUE squares!", "  spaces   and\ttabs ",
         "naïve café, déjà vu — 100% ok?", "emoji 🙂 and 日本語", ""]


def corpus():
  return shapes.caption_corpus("tiny") + TEXTS * 5


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
  """vocab.json + merges.txt of a byte-level BPE (GPT-2's scheme) trained on the captions."""
  folder = tmp_path_factory.mktemp("gpt2")
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(corpus(), vocab_size=400, min_frequency=1,
                          special_tokens=["<|endoftext|>"])
  tok.save_model(str(folder))
  return folder


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bert")
  tok = tokenizers.BertWordPieceTokenizer(lowercase=True)
  tok.train_from_iterator(corpus(), vocab_size=300, min_frequency=1)
  tok.save_model(str(folder))
  return folder


def test_gpt2_vocab_and_merges_give_transformers_ids(gpt2_files):
  ours = hf_tokenizer.HFTokenizer.load(str(gpt2_files))
  ref = transformers.GPT2Tokenizer(str(gpt2_files / "vocab.json"), str(gpt2_files / "merges.txt"))
  for text in TEXTS:
    assert ours.tokenize([text])[0] == ref.encode(text), text
  eos = ref.convert_tokens_to_ids("<|endoftext|>")
  assert (ours.eos_id, ours.bos_id, ours.pad_id) == (eos, -1, 0)   # GPT-2: no bos, no pad token
  ids = ours.encode(TEXTS, 12)
  for text, row in zip(TEXTS, ids):
    body = ref.encode(text)[:11]
    np.testing.assert_array_equal(row[:len(body) + 1], body + [eos])
    assert not row[len(body) + 1:].any()
  # Decoding reads up to the eos and gives the text back.
  assert ours.decode(ours.encode(TEXTS[:2], 32)) == [t.strip() for t in TEXTS[:2]]


def test_bert_vocab_txt_gives_transformers_input_ids(bert_files):
  ours = hf_tokenizer.HFTokenizer.load(str(bert_files))
  ref = transformers.BertTokenizer(str(bert_files / "vocab.txt"), do_lower_case=True)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.cls_token_id, ref.sep_token_id,
                                                     ref.pad_token_id)
  want = ref(TEXTS, padding="max_length", truncation=True, max_length=10)["input_ids"]
  np.testing.assert_array_equal(ours.encode(TEXTS, 10), np.asarray(want, np.int32))


def test_tokenizer_json_round_trips_through_a_run(gpt2_files, tmp_path):
  folder_tok = hf_tokenizer.HFTokenizer.load(str(gpt2_files))
  path = tmp_path / "tokenizer.json"
  tokenizers.ByteLevelBPETokenizer(str(gpt2_files / "vocab.json"),
                                   str(gpt2_files / "merges.txt")).save(str(path))
  for source in (path, tmp_path):              # the file, or a folder holding it
    tok = tokenizers_lib.read("hf", str(source))
    np.testing.assert_array_equal(tok.encode(TEXTS, 16), folder_tok.encode(TEXTS, 16))
  # A run stores the tokenizer as bytes (WORKDIR/tokenizer.model, checkpoint metadata).
  again = tokenizers_lib.from_bytes("hf", tokenizers_lib.to_bytes(folder_tok))
  np.testing.assert_array_equal(again.encode(TEXTS, 16), folder_tok.encode(TEXTS, 16))
  assert again.vocab_size == folder_tok.vocab_size


def test_unusable_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_tokenizer.HFTokenizer.load(str(tmp_path / "absent.json"))
  with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
    hf_tokenizer.HFTokenizer.load(str(tmp_path))
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match="broken.json is not a readable Hugging Face tokenizer"):
    hf_tokenizer.HFTokenizer.load(str(tmp_path / "broken.json"))
  no_eos = tokenizers.ByteLevelBPETokenizer()
  no_eos.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1)
  no_eos.save(str(tmp_path / "no_eos.json"))
  with pytest.raises(ValueError, match="no_eos.json has no end-of-sequence token"):
    hf_tokenizer.HFTokenizer.load(str(tmp_path / "no_eos.json"))
