"""Tests of the OpenAI CLIP BPE tokenizer against reference implementations.

The real vocabulary file cannot be downloaded in tests, so a small merges file is learned here
from a corpus by a tiny BPE trainer (written independently of the code under test) and the ids
are compared with two references built from the same file:
  * Hugging Face `transformers.CLIPTokenizer` (tokenizers backend), and
  * OpenAI's original `SimpleTokenizer` as shipped in `open_clip` (uses ftfy), when installed.
open_clip's wheel also ships the real `bpe_simple_vocab_16e6.txt.gz`; when present, the full
49408-id vocabulary is checked too.
"""
import collections
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

from vlm_jax.data import bpe

CORPUS = """
a photo of a cat. a photo of a dog! two dogs playing in the snow; a red car on the street.
the quick brown fox jumps over the lazy dog. it's a sunny day, isn't it? we'll see, they've gone.
numbers 123 and 2024-05-01 appear too. café naïve résumé. photos photograph photographer
"""

# Strings on which the references agree with each other (no HTML entities, nothing ftfy alters).
TRICKY = [
    "a photo of a cat.",
    "A PHOTO OF A DOG!!!",
    "Hello, World... (really?) [yes] {no} <maybe> #tag @user $5 100% a/b\\c",
    "it's don't we'll they've I'm you'd 'quoted' ''s '",
    "numbers: 3.14159, 2024-05-01, 1,000,000",
    "naïve café résumé — façade",
    "e\u0301 (combining accent, NFC-normalised) \u00e9",
    "日本語のテキスト 中文 한국어 русский Ελληνικά",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧",
    "½ ² Ⅻ ٣ (non-decimal numbers)",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines",
    "",
    "a!?b!¿c ...!!! ???",
    "x.<start_of_text>y z<end_of_text>",
    "photographer photographs photos " * 30,   # long: truncated, eos kept
]


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
  """A minimal BPE trainer over byte symbols with an end-of-word marker (greedy, most frequent
  pair first, ties broken lexicographically)."""
  table = bpe.bytes_to_unicode()
  words = collections.Counter(text.lower().split())
  seqs = {}
  for w, c in words.items():
    chars = [table[b] for b in w.encode("utf-8")]
    seqs[tuple(chars[:-1] + [chars[-1] + "</w>"])] = c
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for seq, c in seqs.items():
      for p in zip(seq, seq[1:]):
        pairs[p] += c
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    new = {}
    for seq, c in seqs.items():
      out, i = [], 0
      while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
          out.append(seq[i] + seq[i + 1])
          i += 2
        else:
          out.append(seq[i])
          i += 1
      new[tuple(out)] = new.get(tuple(out), 0) + c
    seqs = new
  return merges


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
  merges = learn_merges(CORPUS, 300)   # stops early once every word is one symbol
  assert len(merges) > 100
  path = tmp_path_factory.mktemp("bpe") / "vocab.txt.gz"
  # Header line + merges, no trailing newline (the reference would read an empty last line as
  # an extra, empty merge).
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
  return str(path), merges


def hf_reference(merges, directory):
  transformers = pytest.importorskip("transformers")
  table = list(bpe.bytes_to_unicode().values())
  vocab = table + [c + "</w>" for c in table] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory,
                                                                                 "merges.txt")
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(merges_path, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  tok = transformers.CLIPTokenizer(vocab=vocab_path, merges=merges_path)

  def encode(texts, length):
    out = np.zeros((len(texts), length), np.int64)
    for i, t in enumerate(texts):
      ids = tok(t, truncation=True, max_length=length)["input_ids"]
      out[i, :len(ids)] = ids
    return out
  return encode


def openclip_reference(path):
  """OpenAI's SimpleTokenizer from the installed open_clip, loaded as a standalone module (the
  package itself needs torchvision, which this test does not)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open_clip_torch is not installed")
  for dep in ("ftfy", "regex", "torch"):
    pytest.importorskip(dep)
  directory = os.path.dirname(spec.origin)
  mod_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer",
                                                    os.path.join(directory, "tokenizer.py"))
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  ref = module.SimpleTokenizer(path)
  return lambda texts, length: ref(texts, context_length=length).numpy()


def test_bytes_to_unicode_is_a_printable_bijection():
  table = bpe.bytes_to_unicode()
  assert sorted(table) == list(range(256))
  assert len(set(table.values())) == 256
  assert all(c.isprintable() and not c.isspace() for c in table.values())
  assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)


def test_pre_tokenize_matches_reference_regex():
  regex = pytest.importorskip("regex")
  pat = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                      r"""[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
  rng = np.random.default_rng(0)
  alphabet = list("ab1 '!.-_<>sdtlmrve") + ["é", "ß", "日", "½", "٣", "\u0301", "😀", "\t", "Σ"]
  texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 30))) for _ in range(300)]
  texts += [bpe.clean_text(t) for t in TRICKY]
  for t in texts:
    assert bpe.pre_tokenize(t) == pat.findall(t), repr(t)


def test_small_vocab_matches_transformers(vocab_file, tmp_path):
  path, merges = vocab_file
  tok = bpe.load(path)
  assert tok.vocab_size == 512 + len(merges) + 2
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, tok.vocab_size - 2, tok.vocab_size - 1)
  ref = hf_reference(merges, str(tmp_path))
  # HF's tokenizer does not unescape HTML and does not special-case our marker strings.
  texts = [t for t in TRICKY if "_of_text>" not in t]
  for length in (77, 12):
    np.testing.assert_array_equal(tok.encode(texts, length), ref(texts, length))


def test_small_vocab_matches_openai_reference(vocab_file):
  path, _ = vocab_file
  tok = bpe.load(path)
  ref = openclip_reference(path)
  texts = TRICKY + ["&amp; &lt;b&gt; double &amp;amp; escaped"]
  for length in (77, 12, 2):
    np.testing.assert_array_equal(tok.encode(texts, length), ref(texts, length))


@pytest.mark.parametrize("broken, fixed", [
    ("“a photo” of a ‘dog’", '"a photo" of a \'dog\''),    # curly quotes
    ("a cafÃ© on the street", "a café on the street"),        # UTF-8 read as Latin-1
    ("ﬁne ﬂowers", "fine flowers"),                           # ligatures
    ("ＡＢＣ ｐｈｏｔｏ １２３", "ABC photo 123"),                 # full-width forms
    ("&amp;amp; &lt;b&gt;", "& <b>"),                         # HTML, double-escaped
])
def test_cleaning_repairs_text_as_the_reference_does(vocab_file, broken, fixed):
  """ftfy + HTML unescaping: the broken text tokenises exactly as its repaired form."""
  path, _ = vocab_file
  tok = bpe.load(path)
  assert bpe.clean_text(broken) == bpe.clean_text(fixed) == " ".join(fixed.split()).lower()
  np.testing.assert_array_equal(tok.encode([broken], 32), tok.encode([fixed], 32))


def test_truncation_keeps_eos_and_pads_with_zero(vocab_file):
  tok = bpe.load(vocab_file[0])
  ids = tok.encode(["photo " * 100, "cat"], 16)
  assert ids.dtype == np.int32 and ids.shape == (2, 16)
  assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  assert np.all(ids[0, 1:-1] < tok.bos_id)
  row = ids[1].tolist()
  end = row.index(tok.eos_id)
  assert row[0] == tok.bos_id and row[end + 1:] == [0] * (16 - end - 1)
  # eos is the largest id, so argmax pooling (OpenAI CLIP) finds it.
  assert np.all(np.argmax(ids, axis=1) == [15, end])
  with pytest.raises(ValueError, match="length 1"):
    tok.encode(["x"], 1)
  with pytest.raises(TypeError, match="list of texts"):
    tok.encode("x", 8)


def test_hugging_face_files_give_our_ids(vocab_file, tmp_path):
  """`hf_files` written to a folder: transformers' AutoTokenizer reads them as a CLIPTokenizer
  and gives our ids up to the eos (it pads with the eos; a CLIP ignores what follows it)."""
  transformers = pytest.importorskip("transformers")
  tok = bpe.load(vocab_file[0])
  for name, data in bpe.hf_files(tok, context_length=24).items():
    (tmp_path / name).write_bytes(data)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert type(hf).__name__ == "CLIPTokenizer" and hf.model_max_length == 24
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id,
                                                                 tok.eos_id)
  texts = [t for t in TRICKY if "_of_text>" not in t] + ["photo " * 40, "wow!!! yes!"]
  ours = tok.encode(texts, 24)
  theirs = np.asarray(hf(texts, padding="max_length", max_length=24, truncation=True)[
      "input_ids"])
  for text, mine, row in zip(texts, ours, theirs):
    end = mine.tolist().index(tok.eos_id) + 1
    assert row[:end].tolist() == mine[:end].tolist(), text
    assert set(row[end:].tolist()) <= {tok.eos_id}, text
  # A merges list that makes a token twice has no one-id-per-token vocab.json: refused.
  twice = bpe.BPETokenizer([("a", "b"), ("c", "d"), ("a", "b")])
  with pytest.raises(ValueError, match=r"make some tokens twice \(ab\)"):
    bpe.hf_files(twice)


def test_decode_round_trip(vocab_file):
  tok = bpe.load(vocab_file[0])
  texts = ["a photo of a cat.", "naïve café 日本 😀", "it's 2024!"]
  decoded = tok.decode(tok.encode(texts, 40))
  # Decoding gives the cleaned text with pre-token boundaries as spaces.
  assert decoded == ["a photo of a cat .", "naïve café 日本 😀", "it 's 2 0 2 4 !"]
  assert tok.decode(tok.encode(["photo"], 8)[0]) == ["photo"]


def test_bad_vocab_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no BPE vocabulary file"):
    bpe.load(tmp_path / "missing.txt.gz")
  bad = tmp_path / "bad.txt"
  bad.write_text("#version: 0.2\nthis has three\n")
  with pytest.raises(ValueError, match="line 2: expected a merge"):
    bpe.load(bad)
  empty = tmp_path / "empty.txt"
  empty.write_text("#version: 0.2\n")
  with pytest.raises(ValueError, match="no merges"):
    bpe.load(empty)
  binary = tmp_path / "binary.gz"
  binary.write_bytes(b"\x1f\x8b\x08garbage")
  with pytest.raises(ValueError, match="not a BPE merges file"):
    bpe.load(binary)


def test_real_openai_vocab_when_available():
  """The real 16e6 vocabulary, if a package ships it: ids equal the original tokenizer's."""
  spec = importlib.util.find_spec("open_clip")
  path = spec and os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
  if not path or not os.path.exists(path):
    pytest.skip("the OpenAI vocabulary file is not installed (it ships with open_clip_torch)")
  tok = bpe.load(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49408, 49406, 49407)
  ref = openclip_reference(path)
  texts = TRICKY + ["&amp; &lt;b&gt; double &amp;amp; escaped"]
  np.testing.assert_array_equal(tok.encode(texts, 77), ref(texts, 77))
  # Text ftfy repairs gets the reference's ids too.
  repaired = ["“quoted”", "cafÃ© ﬁne ｆｕｌｌ"]
  np.testing.assert_array_equal(tok.encode(repaired, 77), ref(repaired, 77))
