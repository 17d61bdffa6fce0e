"""Training on a weighted mixture of sources (`config.data.mixture`): the proportions of a
virtual epoch, prefixes in proportion, exact resume through the pipeline, the trainer end to
end, and refusals that name the entry and field."""
import collections
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from data_fixtures import shapes_data_dir, shapes_tokenizer, write_tar_and_jsonl  # pylint: disable=unused-import
import train_utils
from vlm_jax import config_utils
from vlm_jax import preflight
from vlm_jax.data import ops
from vlm_jax.data import pipeline
from vlm_jax.data import sources


def _captions_jsonl(folder, word, count):
  """A captions.jsonl of `count` 32 px images captioned '<word> <i>'."""
  os.makedirs(folder / "images", exist_ok=True)
  rng = np.random.default_rng(len(word))
  with open(folder / "captions.jsonl", "w") as f:
    for i in range(count):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
      (folder / "images" / f"{i}.png").write_bytes(buf.getvalue())
      f.write(json.dumps({"image": f"images/{i}.png", "caption": f"{word} {i}"}) + "\n")
  return str(folder / "captions.jsonl")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
  base = tmp_path_factory.mktemp("mixture")
  return (_captions_jsonl(base / "alpha", "alpha", 30), _captions_jsonl(base / "beta", "beta", 10),
          base)


def _data(*entries, **fields):
  c = config_utils.complete({"task": "contrastive", "data": {
      "mixture": tuple(entries), "image_size": 32, "read_threads": 1, **fields}})
  return c.data


def _word(raw):
  return raw["captions"][0].split()[0]


def test_a_virtual_epoch_reads_every_example_in_proportion(two_sets):
  alpha, beta, _ = two_sets
  data = _data(dict(weight=1, source="jsonl", train_jsonl=alpha),
               dict(weight=1, source="jsonl", train_jsonl=beta))
  source = sources.make_source(data, "train")
  # L = max(30 / 0.5, 10 / 0.5) = 60: alpha's 30 once each, beta's 10 three times each.
  assert len(source) == 60 and source.counts == [30, 30]
  read = collections.Counter(source[i]["captions"][0] for i in range(len(source)))
  assert all(read[f"alpha {i}"] == 1 for i in range(30))
  assert all(read[f"beta {i}"] == 3 for i in range(10))
  # Storage order strides through the components: any prefix holds both in proportion.
  first = [_word(source[i]) for i in range(20)]
  assert 7 <= first.count("beta") <= 13, first
  assert "captions file" in source.describe() and "weight 0.5" in source.describe()


def test_the_pipeline_mixes_by_weight_and_resumes_exactly(two_sets):
  alpha, beta, _ = two_sets
  data = _data(dict(weight=3, source="jsonl", train_jsonl=alpha),
               dict(weight=1, source="jsonl", train_jsonl=beta))
  field_ops = []                  # images alone: what the test compares

  def batches(state=None, n=6):
    it = pipeline.make_train_iterator(data, field_ops, batch_size=8)
    if state is not None:
      it.set_state(state)
    out = [next(it) for _ in range(n)]
    return out, it.get_state(), it
  first, _, it = batches(n=3)
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  it.close()
  resumed, _, it2 = batches(state, n=3)
  it2.close()
  for a, b in zip(rest, resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  # alpha:beta = 3:1 in the virtual epoch (L = max(30 / .75, 10 / .25) = 40: 30 + 10 positions).
  source = sources.make_source(data, "train")
  assert source.counts == [30, 10]


def test_tar_shard_sources_interleave_by_weight_and_resume_on_the_same_processes(
    tmp_path, shapes_tokenizer):
  """Two tar-shard sets mixed 3:1: each process reads its own shards of both, every 4 examples
  hold 3 of the first; the state resumes exactly, on the same process count only."""
  alpha = write_tar_and_jsonl(str(tmp_path / "alpha"), 2, 12, caption="alpha")
  beta = write_tar_and_jsonl(str(tmp_path / "beta"), 2, 12, caption="beta")
  data = _data(dict(weight=3, source="wds", train_shards=alpha),
               dict(weight=1, source="wds", train_shards=beta))
  source = sources.make_source(data, "train")
  assert not source.random_access
  field_ops = [ops.Caption(shapes_tokenizer, 8)]
  alpha_id = shapes_tokenizer.encode(["alpha"], 8)[0, 1]     # the first piece after bos
  assert alpha_id != shapes_tokenizer.encode(["beta"], 8)[0, 1]

  def words(batch):
    return ["alpha" if row[1] == alpha_id else "beta" for row in batch["text"]]

  for process in (0, 1):
    it = pipeline.make_train_iterator(data, field_ops, batch_size=8, process_index=process,
                                      process_count=2)
    first = [next(it) for _ in range(2)]
    assert [words(b).count("alpha") for b in first] == [6, 6]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    it.close()
    again = pipeline.make_train_iterator(data, field_ops, batch_size=8, process_index=process,
                                         process_count=2)
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(2)]):
      np.testing.assert_array_equal(a["image"], b["image"])
    again.close()
  with pytest.raises(ValueError, match="resumes on 2 process"):
    pipeline.resume_state([state, state], 0, 1)


def test_the_trainer_trains_on_a_mixture(two_sets, shapes_data_dir, tmp_path):
  """A mixture of a jsonl file and the TFDS shapes split: the tokenizer is trained on both
  (captions of the storage-order prefix), and a few steps run."""
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  alpha, _, _ = two_sets
  config = train_utils.tiny_config(
      "clip", shapes_data_dir, evals__run="", total_steps=2, log_every_steps=1,
      data__mixture=(dict(weight=0.5, source="jsonl", train_jsonl=alpha),
                     dict(weight=0.5, source="tfds", name="shapes/tiny")))
  train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert any(np.isfinite(r.get("loss", np.nan)) for r in rows)
  # The tokenizer it trained saw both components' captions: each one's words are whole pieces.
  from vlm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok = tok_lib.Tokenizer.load(str(tmp_path / "run" / "tokenizer.model"))
  assert tok.token_to_id("▁alpha") is not None and tok.token_to_id("▁circle") is not None


def test_bad_mixtures_are_named(two_sets, tmp_path):
  alpha, _, base = two_sets
  tar_pattern = write_tar_and_jsonl(str(tmp_path / "tars"), 1, 4)
  cases = [
      ((dict(weight=1, source="jsonl", train_jsonl=alpha),),
       r"data.mixture: 1 entry; a mixture needs at least two"),
      ((dict(weight=0, source="jsonl", train_jsonl=alpha), dict(weight=1, source="jsonl",
                                                               train_jsonl=alpha)),
       r"data.mixture\[0\].weight: 0; every entry needs a positive weight"),
      ((dict(weight=1, source="jsonl", train_jsonl=alpha), dict(weight=1, source="jsonl",
                                                               train_jsonl_path=alpha)),
       r"data.mixture\[1\]: unknown data field\(s\) train_jsonl_path"),
      ((dict(weight=1, source="jsonl", train_jsonl=alpha), dict(weight=1, source="wds",
                                                               train_shards=tar_pattern)),
       r"data.mixture\[0\] is random-access .*data.mixture\[1\] is sequential .*not both"),
  ]
  for entries, match in cases:
    with pytest.raises(ValueError, match=match):
      sources.make_source(_data(*entries), "train")
  # Before anything is built, a missing file is named with its entry.
  config = config_utils.complete({"task": "contrastive", "data": {"mixture": (
      dict(weight=1, source="jsonl", train_jsonl=alpha),
      dict(weight=1, source="jsonl", train_jsonl=str(base / "missing.jsonl")))}})
  problems = preflight.config_problems(config)
  assert any(p.startswith("data.mixture[1].train_jsonl: ") and "does not exist" in p
             for p in problems), problems
