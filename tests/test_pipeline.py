"""Tests for vlm_jax.data.pipeline: batch contents, exact resume, per-process shares, bad data,
coco_captions through tfds.testing.mock_data, eval padding, determinism, device prefetch."""
import json
import tarfile

import jax
import ml_collections
import numpy as np
import pytest

from vlm_jax import config_defaults
from vlm_jax import config_utils
from vlm_jax import prefetch
from vlm_jax.data import ops
from vlm_jax.data import pipeline
from vlm_jax.data import tokenizer as tokenizer_lib
from train_utils import REPO
from data_fixtures import shapes_data_dir, shapes_tokenizer  # pylint: disable=unused-import
from test_sources import jpeg_bytes, write_jsonl, write_shards

SIZE, LENGTH = 16, 12


@pytest.fixture(scope="module")
def tok():
  words = [f"picture another caption number {i} {j}" for i in range(20) for j in range(5)]
  return tokenizer_lib.train_sentencepiece(words, None, vocab_size=64)


def make_config(**data):
  config = ml_collections.ConfigDict()
  config.data = config_defaults.data_config()
  config.data.update(dict(image_size=SIZE, read_threads=2, shuffle_seed=3))
  config.data.update(data)
  config.batch_size = 4
  return config


def field_ops(tok, all_captions=0, length=LENGTH):
  """A caption (`text`) and the label, as a captioning task would ask; with `all_captions`,
  also up to that many captions per example (`captions`, as retrieval asks)."""
  out = [ops.Caption(tok, length), ops.Label()]
  if all_captions:
    out.append(ops.AllCaptions(tok, length, all_captions))
  return out


def train_iter(config, tok, *, process_index=0, process_count=1, batch_size=None, length=LENGTH):
  return pipeline.make_train_iterator(
      config.data, field_ops(tok, length=length),
      batch_size=batch_size if batch_size is not None else config.batch_size // process_count,
      process_index=process_index, process_count=process_count)


def eval_iter(config, tok, *, batch_size, process_index=0, process_count=1, all_captions=0,
              length=LENGTH):
  return pipeline.make_eval_iterator(
      config.data, field_ops(tok, all_captions, length), batch_size=batch_size,
      process_index=process_index, process_count=process_count)


@pytest.fixture
def jsonl_config(tmp_path):
  path = write_jsonl(str(tmp_path / "j"), 10)
  return make_config(source="jsonl", train_jsonl=path, eval_jsonl=path)


@pytest.fixture
def wds_config(tmp_path):
  write_shards(str(tmp_path / "w"), 3, 4)
  pattern = str(tmp_path / "w" / "{00000..00002}.tar")
  return make_config(source="wds", train_shards=pattern, eval_shards=pattern, shard_group=2)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------


def test_train_batch_contents(jsonl_config, tok):
  it = train_iter(jsonl_config, tok, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (4, LENGTH) and batch["text"].dtype == np.int32
  assert batch["label"].dtype == np.int32 and batch["mask"].all()
  # mean = std = 0.5: pixels land in [-1, 1] and use most of it.
  assert -1.0 <= batch["image"].min() < -0.8 and 0.8 < batch["image"].max() <= 1.0
  assert (batch["text"][:, 0] == tok.bos_id).all()
  assert ((batch["text"] == tok.eos_id).sum(1) == 1).all()
  for text, label in zip(tok.decode(batch["text"]), batch["label"]):
    # jsonl example i has label i % 3 and captions 'picture i' [, 'another i'].
    assert text.split()[0] in ("picture", "another")
    assert int(text.split()[1]) % 3 == label


def test_train_uses_every_caption_and_is_seeded(jsonl_config, tok):
  jsonl_config.batch_size = 10
  jsonl_config.data.train_crop = "resize"
  texts = set()
  it = train_iter(jsonl_config, tok, process_index=0, process_count=1)
  for batch in take(it, 6):
    texts.update(tok.decode(batch["text"]))
  assert "another 0" in texts and "picture 0" in texts  # example 0 has two captions


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_resume_mid_epoch_gives_the_same_batches(kind, jsonl_config, wds_config, tok):
  config = jsonl_config if kind == "jsonl" else wds_config
  config.batch_size = 3  # 10 or 12 examples: batches straddle epoch boundaries
  ref = train_iter(config, tok, process_index=0, process_count=1)
  expected = take(ref, 9)
  for cut in (2, 5):
    it = train_iter(config, tok, process_index=0, process_count=1)
    take(it, cut)
    state = json.dumps(it.get_state())  # what a checkpoint stores
    del it
    resumed = train_iter(config, tok, process_index=0, process_count=1)
    resumed.set_state(json.loads(state))
    assert_same_batches(take(resumed, 9 - cut), expected[cut:])
  # Restoring an earlier state on a live iterator rewinds it.
  it = train_iter(config, tok, process_index=0, process_count=1)
  state = it.get_state()
  first = take(it, 3)
  it.set_state(state)
  assert_same_batches(take(it, 3), first)


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_determinism_for_a_seed(kind, jsonl_config, wds_config, tok):
  config = jsonl_config if kind == "jsonl" else wds_config
  a = take(train_iter(config, tok, process_index=0, process_count=1), 4)
  b = take(train_iter(config, tok, process_index=0, process_count=1), 4)
  assert_same_batches(a, b)
  config.data.shuffle_seed = 4
  c = take(train_iter(config, tok, process_index=0, process_count=1), 4)
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


def _epoch_labels(config, tok, process_index, process_count):
  config.data.num_epochs = 1
  config.batch_size = 2 * process_count
  it = train_iter(config, tok, process_index=process_index,
                                    process_count=process_count)
  return [int(l) for batch in it for l in batch["label"]]


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_two_processes_read_disjoint_shares_covering_the_split(tmp_path, kind, tok):
  if kind == "jsonl":
    # Unique labels: rewrite the jsonl with label = line index.
    path = write_jsonl(str(tmp_path / "j"), 12)
    lines = [json.loads(l) for l in open(path)]
    with open(path, "w") as f:
      for i, line in enumerate(lines):
        f.write(json.dumps({**line, "label": i}) + "\n")
    config = make_config(source="jsonl", train_jsonl=path, eval_jsonl=path)
    everything = list(range(12))
  else:
    write_shards(str(tmp_path / "w"), 4, 3)  # label = 100 * shard + index
    config = make_config(source="wds", train_shards=str(tmp_path / "w" / "*.tar"),
                         eval_shards=str(tmp_path / "w" / "*.tar"))
    everything = [100 * s + i for s in range(4) for i in range(3)]
  shares = [_epoch_labels(config, tok, p, 2) for p in range(2)]
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == everything
  assert len(shares[0]) == len(shares[1]) == 6


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_eval_pads_last_batch_and_covers_every_example_once(tmp_path, kind, tok):
  if kind == "jsonl":
    config = make_config(source="jsonl", eval_jsonl=write_jsonl(str(tmp_path / "j"), 11))
    n = 11
  else:
    write_shards(str(tmp_path / "w"), 3, 3)
    config = make_config(source="wds", eval_shards=str(tmp_path / "w" / "*.tar"))
    n = 9
  seen, counts = [], []
  for p in range(2):
    batches = list(eval_iter(config, tok, process_index=p, process_count=2, batch_size=4,
                             all_captions=3))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (4, SIZE, SIZE, 3)
      assert b["captions"].shape == (4, 3, LENGTH) and b["captions_mask"].shape == (4, 3)
      assert (b["label"][~b["mask"]] == -1).all() and (b["text"][~b["mask"]] == 0).all()
      assert not b["captions_mask"][~b["mask"]].any()
      np.testing.assert_array_equal(b["captions"][:, 0][b["mask"]], b["text"][b["mask"]])
      seen.extend(tok.decode(b["text"][b["mask"]]))
    assert not batches[-1]["mask"].all()
  assert counts[0] == counts[1]  # every process steps through the same number of batches
  assert len(seen) == n and len(set(seen)) == n  # every example exactly once
  if kind == "jsonl":  # example 0 has two captions, example 1 one
    b = next(eval_iter(config, tok, batch_size=2, all_captions=3))
    np.testing.assert_array_equal(b["captions_mask"], [[True, True, False],
                                                       [True, False, False]])
    assert tok.decode(b["captions"][0]) == ["picture 0", "another 0", ""]
    assert tok.decode(b["text"]) == ["picture 0", "picture 1"]


def test_bad_data_is_skipped_counted_and_resumed(tmp_path, tok, caplog):
  folder = tmp_path / "w"
  extra = {0: [("corrupt.jpg", b"\xff\xd8 not really a jpeg"), ("corrupt.txt", b"fine"),
               ("empty.jpg", jpeg_bytes(1)), ("empty.txt", b"   "),
               ("latin1.jpg", jpeg_bytes(2)), ("latin1.txt", "caf\xe9".encode("latin-1"))]}
  write_shards(str(folder), 2, 4, extra=extra)
  # Truncate shard 1 inside its 3rd sample's image: samples 2 and 3 are lost.
  path = folder / "00001.tar"
  with tarfile.open(path) as tar:
    member = tar.getmember("s001_i02.jpg")
  path.write_bytes(path.read_bytes()[:member.offset_data + 10])
  config = make_config(source="wds", train_shards=str(folder / "*.tar"), num_epochs=1)
  config.batch_size = 1
  it = train_iter(config, tok, process_index=0, process_count=1)
  with caplog.at_level("WARNING"):
    labels = sorted(int(b["label"][0]) for b in it)
  assert labels == [0, 1, 2, 3, 100, 101]  # only the good samples, none substituted
  assert it.skipped_counts() == {"undecodable_image": 1, "empty_caption": 1,
                                 "non_utf8_caption": 1, "truncated_shard": 1,
                                 "lost_in_truncated_shard": 1}
  assert "00000.tar/corrupt (undecodable_image)" in caplog.text
  assert "00001.tar" in caplog.text
  # The counts are part of the state: a resumed iterator continues them.
  it2 = train_iter(config, tok, process_index=0, process_count=1)
  state = it.get_state()
  it2.set_state(state)
  assert it2.skipped_counts() == it.skipped_counts()


def test_bad_jsonl_image_is_skipped_and_counted(tmp_path, tok):
  path = write_jsonl(str(tmp_path / "j"), 6, bad=(2,))
  config = make_config(source="jsonl", train_jsonl=path, eval_jsonl=path, num_epochs=1)
  config.batch_size = 1
  it = train_iter(config, tok, process_index=0, process_count=1)
  texts = sorted(tok.decode(np.concatenate([b["text"] for b in it])))
  assert len(texts) == 5 and not any(t.endswith(" 2") for t in texts)
  assert it.skipped_counts() == {"undecodable_image": 1}
  # Eval keeps the batch count but never shows the bad example.
  batches = list(eval_iter(config, tok, process_index=0, process_count=1,
                                             batch_size=4))
  assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) == 5


def test_coco_captions_mock_data_batches(tok):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = make_config(source="tfds", name="coco_captions", text_key="captions/text",
                       label_key="", id_key="image/filename", tfds_reader="data_source",
                       tfds_skip_decode=False, train_split="train", eval_split="val")
  with tfds.testing.mock_data(num_examples=10):
    it = train_iter(config, tok, process_index=1, process_count=2)
    batches = take(it, 3)
    state = it.get_state()
    after = take(it, 2)
    it.set_state(state)
    assert_same_batches(take(it, 2), after)
    eval_batches = list(eval_iter(config, tok, process_index=0,
                                                    process_count=1, batch_size=4))
  for b in batches:
    assert b["image"].shape == (2, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert np.isfinite(b["image"]).all() and np.abs(b["image"]).max() <= 1.0
    assert b["text"].shape == (2, LENGTH) and b["text"].dtype == np.int32
    assert (b["text"][:, 0] == tok.bos_id).all()
    assert ((b["text"] == tok.eos_id).sum(1) == 1).all()
    assert (b["label"] == -1).all() and b["mask"].all()
  assert len(eval_batches) == 3 and sum(int(b["mask"].sum()) for b in eval_batches) == 10


def test_config_errors_name_the_field(jsonl_config, tok):
  jsonl_config.data.train_crop = "zoom"
  with pytest.raises(ValueError, match="data.train_crop: unknown crop 'zoom'"):
    train_iter(jsonl_config, tok, process_index=0, process_count=1)
  jsonl_config.data.train_crop = "resize"
  with pytest.raises(ValueError, match="per-process batch size 0 < 1"):
    train_iter(jsonl_config, tok, batch_size=0)
  jsonl_config.data.source = "parquet"
  with pytest.raises(ValueError, match="data.source: unknown source 'parquet'"):
    train_iter(jsonl_config, tok, process_index=0, process_count=1)


def test_device_prefetcher_keeps_exact_state_and_measures_wait(jsonl_config, tok):
  it = train_iter(jsonl_config, tok, process_index=0, process_count=1)
  reference = take(train_iter(jsonl_config, tok, process_index=0,
                                                process_count=1), 6)
  prefetcher = prefetch.DevicePrefetcher(it, jax.device_put, size=3)
  first = [jax.tree.map(np.asarray, b) for b in take(prefetcher, 2)]
  assert isinstance(take(prefetcher, 1)[0]["image"], jax.Array)
  assert_same_batches(first, reference[:2])
  state = prefetcher.get_state()  # after 3 batches, though more are prefetched
  assert prefetcher.pop_wait_seconds() >= 0.0 and prefetcher.wait_seconds == 0.0
  fresh = train_iter(jsonl_config, tok, process_index=0, process_count=1)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 3), reference[3:])
  prefetcher.set_state(state)
  assert_same_batches([jax.tree.map(np.asarray, b) for b in take(prefetcher, 3)],
                      reference[3:])
  prefetcher.close()


@pytest.mark.slow  # starts a grain worker process (~15 s of imports on a small machine)
def test_grain_worker_processes_resume_exactly(jsonl_config, tok):
  from vlm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.ensure_flags_parsed()    # grain's workers read absl flags; a command line parses them
  jsonl_config.data.worker_count = 1
  it = train_iter(jsonl_config, tok, process_index=0, process_count=1)
  expected = take(it, 4)
  state = it.get_state()
  more = take(it, 2)
  it.close()
  resumed = train_iter(jsonl_config, tok, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 2), more)
  jsonl_config.data.worker_count = 0
  single = take(train_iter(jsonl_config, tok, process_index=0,
                                             process_count=1), 4)
  assert_same_batches(single, expected)  # same batches with or without worker processes


def test_shapes_demo_config_batches(shapes_data_dir, shapes_tokenizer):
  config = config_utils.load_config(f"{REPO}/configs/shapes_coca.py:tiny",
                                    {"data.data_dir": shapes_data_dir})
  length = config.tokenizer.context_length
  it = train_iter(config, shapes_tokenizer, process_index=0, process_count=2, length=length)
  batch = next(it)
  assert batch["image"].shape == (32, 32, 32, 3) and batch["text"].shape == (32, length)
  assert ((batch["label"] >= 0) & (batch["label"] < 20)).all()
  assert it.skipped_counts() == {}
  texts = shapes_tokenizer.decode(batch["text"])
  assert all(t.strip() for t in texts)
  # Eval (test split, 64 examples): every example once over two processes, in batches of 16.
  seen = []
  for p in range(2):
    for b in eval_iter(config, shapes_tokenizer, process_index=p, process_count=2,
                       batch_size=16, length=length):
      seen.extend(zip(b["label"][b["mask"]].tolist(),
                      map(bytes, b["image"][b["mask"]].view(np.uint8))))
  assert len(seen) == 64 and len(set(seen)) == 64


@pytest.mark.slow  # five tf.data pipelines: ~25 s on a small shared machine
def test_tfrecord_tfds_dataset_resumes_and_evaluates(tmp_path, tok):
  from test_sources import _tiny_builder_cls  # pylint: disable=g-import-not-at-top
  _tiny_builder_cls()(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  config = make_config(source="tfds", name="vlm_jax_tiny_captions", data_dir=str(tmp_path),
                       text_key="meta/captions", train_split="train", eval_split="train",
                       shuffle_buffer=4)
  config.batch_size = 3
  it = train_iter(config, tok, process_index=0, process_count=1)
  assert isinstance(it._stream, pipeline._SequentialStream)  # the tfds.load (TFRecord) reader
  expected = take(it, 6)  # 18 examples: crosses the end of the first epoch (10)
  first_epoch = [int(l) for b in expected[:3] for l in b["label"]] + [int(expected[3]["label"][0])]
  assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))  # shuffled
  it2 = train_iter(config, tok, process_index=0, process_count=1)
  take(it2, 2)
  state = json.loads(json.dumps(it2.get_state()))
  it3 = train_iter(config, tok, process_index=0, process_count=1)
  it3.set_state(state)
  assert_same_batches(take(it3, 4), expected[2:])
  labels = [int(l) for p in range(2)
            for b in eval_iter(config, tok, process_index=p, process_count=2,
                                                 batch_size=4)
            for l in b["label"][b["mask"]]]
  assert sorted(labels) == list(range(10))


def test_openai_eval_crop_matches_openai_preprocessing(tmp_path, tok):
  """`data.eval_crop='openai'` gives exactly the OpenAI transform (short-side bicubic resize,
  centre crop) with the configured mean/std, for a non-square image."""
  from PIL import Image
  from vlm_jax.data import openai_preprocess
  folder = tmp_path / "o"
  (folder / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(23, 41, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(folder / "images" / "a.png")
  (folder / "captions.jsonl").write_text(json.dumps({"image": "images/a.png", "caption": "x"}))
  config = make_config(source="jsonl", eval_jsonl=str(folder / "captions.jsonl"),
                       eval_crop="openai", mean=openai_preprocess.OPENAI_MEAN,
                       std=openai_preprocess.OPENAI_STD)
  batch = next(eval_iter(config, tok, process_index=0, process_count=1,
                                           batch_size=1))
  expected = openai_preprocess.preprocess(pixels, SIZE)
  np.testing.assert_allclose(batch["image"][0], expected, atol=1e-5)
  config.data.eval_crop = "center"
  other = next(eval_iter(config, tok, process_index=0, process_count=1,
                                           batch_size=1))
  assert np.abs(other["image"][0] - expected).max() > 1e-3  # the two transforms really differ
  config.data.eval_crop = "squash"
  with pytest.raises(ValueError, match="data.eval_crop: unknown crop 'squash'"):
    next(eval_iter(config, tok, process_index=0, process_count=1,
                                     batch_size=1))


def test_per_example_randomness_does_not_depend_on_the_process_count(tmp_path, tok):
  """Each example gets the same caption draw and crop whether one process or two read it, so a
  multi-process run trains on exactly the samples of a single-process run."""
  path = write_jsonl(str(tmp_path / "j"), 16)
  lines = [json.loads(l) for l in open(path)]
  with open(path, "w") as f:  # unique labels and several captions per example
    for i, line in enumerate(lines):
      f.write(json.dumps({**line, "label": i, "caption": [f"picture {i}", f"another {i}",
                                                          f"caption number {i}"]}) + "\n")
  config = make_config(source="jsonl", train_jsonl=path, num_epochs=1)

  def samples(process_index, process_count):
    config.batch_size = 2 * process_count
    it = train_iter(config, tok, process_index=process_index,
                                      process_count=process_count)
    out = {}
    for batch in it:
      for label, text, image in zip(batch["label"], batch["text"], batch["image"]):
        out[int(label)] = (tuple(text.tolist()), image)
    return out

  single = samples(0, 1)
  split = {**samples(0, 2), **samples(1, 2)}
  assert sorted(single) == sorted(split) == list(range(16))
  for label in single:
    assert single[label][0] == split[label][0], label
    np.testing.assert_array_equal(single[label][1], split[label][1])
  # The draw is really random: not every example got its first caption.
  assert len({tok.decode(np.asarray([t]))[0].split()[0] for t, _ in single.values()}) > 1


def _labelled_jsonl(tmp_path, n, bad=()):
  """captions.jsonl whose label is the line index (so a batch names its examples)."""
  path = write_jsonl(str(tmp_path / "j"), n, bad=bad)
  lines = [json.loads(l) for l in open(path)]
  with open(path, "w") as f:
    for i, line in enumerate(lines):
      f.write(json.dumps({**line, "label": i}) + "\n")
  return make_config(source="jsonl", train_jsonl=path, eval_jsonl=path, num_epochs=1)


def _resume_all(states, config, tok, process_count, batch_size):
  its = [train_iter(config, tok, process_index=p, process_count=process_count,
                    batch_size=batch_size) for p in range(process_count)]
  for p, it in enumerate(its):
    it.set_state(pipeline.resume_state(states, p, process_count))
  return its


def test_elastic_resume_reads_every_example_once(tmp_path, tok):
  """2 processes -> 1 -> 2 over one epoch, with bad examples making the processes drift apart:
  every good example is read exactly once, none twice, none skipped; the skip counts carry
  over."""
  bad = {1, 2, 3, 9}
  config = _labelled_jsonl(tmp_path, 40, bad=bad)
  seen = []
  labels = lambda batch: [int(l) for l in batch["label"]]
  # 2 processes, 3 batches of 3 each (their shares hold different numbers of bad examples).
  its = [train_iter(config, tok, process_index=p, process_count=2, batch_size=3)
         for p in range(2)]
  for _ in range(3):
    for it in its:
      seen += labels(next(it))
  states = [it.get_state() for it in its]
  assert states[0]["stream"]["next_index"] != states[1]["stream"]["next_index"]
  # 1 process, 2 batches of 5.
  (one,) = _resume_all(states, config, tok, 1, 5)
  for _ in range(2):
    seen += labels(next(one))
  # 2 processes again, to the end of the epoch (batch 1: no partial batch is dropped).
  its = _resume_all([one.get_state()], config, tok, 2, 1)
  for it in its:
    seen += [l for batch in it for l in labels(batch)]
  assert len(seen) == len(set(seen)), sorted(seen)
  assert sorted(seen) == sorted(set(range(40)) - bad)
  assert sum(sum(it.skipped_counts().values()) for it in its) == len(bad)
  # Tar shards are assigned to processes: resuming them on another count is refused by name.
  write_shards(str(tmp_path / "w"), 2, 2)
  wds = make_config(source="wds", train_shards=str(tmp_path / "w" / "*.tar"))
  state = train_iter(wds, tok, process_index=0, process_count=1, batch_size=1).get_state()
  with pytest.raises(ValueError, match="tar shards"):
    pipeline.resume_state([state], 0, 2)
