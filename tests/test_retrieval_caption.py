"""Retrieval-augmented captioning: neighbours files, the retrieval prompt in training and in
generation, image-index neighbours, the terse shapes style, and a tiny end-to-end run with
refusals (an empty datastore fails before training)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_fixtures import shapes_data_dir, shapes_tokenizer  # pylint: disable=unused-import
import train_utils
from train_utils import REPO, subprocess_env
from vlm_jax import config_utils
from vlm_jax import embed as embed_lib
from vlm_jax.data import ops
from vlm_jax.data import retrieval
from vlm_jax.data import shapes
from vlm_jax.evals import captioning

pytestmark = pytest.mark.xdist_group("retrieval_caption")


def _write_neighbours(path, records):
  with open(path, "w") as f:
    for key, captions in records.items():
      f.write(json.dumps({"id": key, "neighbours": [
          {"id": f"n{i}", "caption": c, "score": 1.0 - i / 10} for i, c in enumerate(captions)]})
              + "\n")
  return str(path)


def test_neighbours_file_loads_k_captions_and_refuses_bad_files(tmp_path):
  path = _write_neighbours(tmp_path / "n.jsonl", {
      "train/0": ["a red circle.", "two red circles.", "a red square.", "a blue cross."],
      "train/1": []})                          # an image with nothing retrieved is left out
  assert retrieval.load_neighbours(path, 2) == {"train/0": [["a red circle."],
                                                            ["two red circles."]]}
  # An image index's hits carry every caption of their image; the first is the one retrieved.
  (tmp_path / "images.jsonl").write_text(json.dumps({"id": "t", "neighbours": [
      {"id": "x", "caption": "a red circle.", "captions": ["a red circle.", "one red circle."]},
      {"id": "y", "caption": "a cross.", "captions": ["a cross.", ""]}]}) + "\n")
  hits = retrieval.load_neighbours(str(tmp_path / "images.jsonl"), 3)["t"]
  assert hits == [["a red circle.", "one red circle."], ["a cross."]]
  assert retrieval.phrasing(hits, 1) == ["one red circle.", "a cross."]
  assert (retrieval.prompt_text(["a red circle.", "two red circles."])
          == "similar images show: a red circle; two red circles. caption:")
  with pytest.raises(ValueError, match=r"data.neighbours: neighbours file .*missing.jsonl does "
                                       "not exist"):
    retrieval.load_neighbours(str(tmp_path / "missing.jsonl"), 3)
  (tmp_path / "bad.jsonl").write_text('{"id": "a", "neighbours": [{"caption": "x"}]}\n{"id": 3}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl line 2 is not a neighbours record"):
    retrieval.load_neighbours(str(tmp_path / "bad.jsonl"), 3)
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"holds no retrieved captions \(an empty datastore\?\)"):
    retrieval.load_neighbours(str(tmp_path / "empty.jsonl"), 3)


def test_training_prompt_is_the_retrieved_captions_and_only_the_caption_is_a_target(
    shapes_tokenizer):
  tok = shapes_tokenizer
  neighbours = {"train/7": [["two red circles."], ["a red circle."]]}
  op = ops.PrefixLMText(tok, 40, caption_weight=1.0, vqa_weight=0.0, neighbours=neighbours)
  raw = {"key": "train/7", "captions": ["a small red circle in the top left."]}
  batch = op.collate([op(raw, np.random.default_rng(0), True)])
  prompt = tok.tokenize([retrieval.prompt_text(["two red circles.", "a red circle."])])[0]
  caption = tok.tokenize(["a small red circle in the top left."])[0]
  row, plen = batch["text"][0], int(batch["prompt_len"][0])
  assert plen == len(prompt) and row[:plen].tolist() == list(prompt)
  assert row[plen] == tok.bos_id and row[plen + 1:plen + 1 + len(caption)].tolist() == caption
  assert batch["target_mask"][0].tolist() == [plen < i <= plen + 1 + len(caption)
                                             for i in range(40)]
  with pytest.raises(ops.BadExample) as e:       # an image the neighbours file does not know
    op({"key": "train/8", "captions": ["a red circle."]}, np.random.default_rng(0), True)
  assert e.value.reason == "no_neighbours"
  # same_phrasing: each neighbour's caption at the index of the caption drawn as the target.
  phrased = {"k": [["a red circle.", "one red circle."], ["a cross.", "one cross."]]}
  op = ops.PrefixLMText(tok, 40, 1.0, 0.0, neighbours=phrased, same_phrasing=True)
  raw = {"key": "k", "captions": ["a blue square.", "one blue square."]}
  for seed in range(6):
    out = op(raw, np.random.default_rng(seed), True)
    j = raw["captions"].index(out["_answer"])
    assert out["_prompt"] == retrieval.prompt_text([h[j] for h in phrased["k"]])
  # A datastore holding fewer phrasings per image than the data has (embedded with a lower
  # --max_captions) would pair the wrong ones: refused, saying how to fix it.
  with pytest.raises(ValueError, match=r"image k has 3 captions but its neighbours have \[2\]; "
                     r"embed the datastore with all of them \(`vlm_jax.embed --max_captions 3`\)"):
    op(dict(raw, captions=raw["captions"] + ["the blue square."]), np.random.default_rng(0), True)
  # Without neighbours the same op gives a caption an empty prompt.
  plain = ops.PrefixLMText(tok, 40, 1.0, 0.0)
  assert plain.collate([plain(raw, np.random.default_rng(0), True)])["prompt_len"][0] == 0


def test_generation_prompt_is_left_padded_and_a_long_one_keeps_its_end(shapes_tokenizer):
  tok = shapes_tokenizer
  neighbours = {"a": [["a red circle.", "one red circle."]],
                "b": [["a small red circle in the top left."]] * 3}
  ids = {k: tok.tokenize([retrieval.prompt_text(retrieval.phrasing(v))])[0]
         for k, v in neighbours.items()}
  length = len(ids["a"]) + 2
  assert len(ids["b"]) > length
  op = ops.RetrievalPrompt(tok, length, neighbours)
  batch = op.collate([op({"key": "a"}, None, False), op({"key": "b"}, None, False),
                      op.padding()])
  assert batch["prompt"][0].tolist() == [tok.pad_id] * 2 + list(ids["a"])
  assert batch["prompt"][1].tolist() == list(ids["b"][-length:])   # "... caption:" kept
  assert batch["prompt_truncated"].tolist() == [False, True, False]
  assert (batch["prompt"][2] == tok.pad_id).all()
  with pytest.raises(ops.BadExample):
    op({"key": "c"}, None, False)


def test_terse_style_describes_the_same_images_in_other_words():
  plain, terse = shapes.get_config("demo"), shapes.get_config("demo_terse")
  for i in range(40):
    a, b = shapes.generate_example(plain, "train", i), shapes.generate_example(terse, "train", i)
    np.testing.assert_array_equal(a["image"], b["image"])
    (caption,) = b["captions"]
    objects = b["objects"]
    want = "; ".join(f"{c} {s}, {z}, {p}" for c, s, z, p in zip(
        objects["colour"], objects["shape"], objects["size"], objects["position"])) + "."
    assert caption == want
    # No plain caption starts with a colour word; every terse one does.
    assert not any(re.match(r"(red|green|blue|yellow|white) ", c) for c in a["captions"])


def test_attribute_list_formats_hold_out_terse_and_are_recognised():
  terse, formats = shapes.get_config("demo_terse"), shapes.get_config("demo_formats")
  assert len(set(shapes.FORMATS)) == len(shapes.FORMATS) == 34
  # Terse's field order and separator never occur together in a training format.
  assert not any(f[:2] == shapes.TERSE_FORMAT[:2] for f in shapes.FORMATS)
  for i in range(40):
    a, b = shapes.generate_example(terse, "train", i), shapes.generate_example(formats, "train", i)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert shapes.TERSE_FORMAT in shapes.caption_formats(a["captions"][0])
    # One caption per format, in FORMATS order, each recognised as its own format (and, for one
    # object, the format differing only in the unseen object separator); never as terse.
    assert len(b["captions"]) == 34
    for caption, fmt in zip(b["captions"], shapes.FORMATS):
      found = shapes.caption_formats(caption)
      assert fmt in found and shapes.TERSE_FORMAT not in found, (caption, found)
      assert len(found) == (2 if len(a["objects"]["shape"]) == 1 else 1)
    # Every format lists the same attributes: the sorted words agree with terse's.
    words = lambda c: sorted(re.findall(r"[a-z]+", c))
    assert all(words(c) == words(a["captions"][0]) for c in b["captions"])
  plain = shapes.generate_example(shapes.get_config("demo"), "train", 0)["captions"]
  assert [shapes.caption_formats(c) for c in plain] == [()] * 4
  # A list that switches format part-way, or names no real attribute, follows no format.
  assert shapes.caption_formats("red circle, small, top left; blue cross - large - center.") == ()
  assert shapes.caption_formats("red circle, tiny, top left.") == ()


def test_caption_eval_entry_with_neighbours_states_what_it_needs(tmp_path):
  config = config_utils.load_config(os.path.join(REPO, "configs/shapes_retrieval_caption.py:tiny"),
                                    {"evals.caption.neighbours": str(tmp_path / "none.jsonl"),
                                     "evals.caption.loglik": True, "evals.caption.max_len": 60})
  problems = captioning.check(config, config.evals.caption)
  assert any("max_len: 60 leaves 4 of the context length" in p for p in problems), problems
  assert any("loglik:" in p and "set loglik=False" in p for p in problems), problems
  assert any("none.jsonl does not exist" in p for p in problems), problems


@pytest.fixture(scope="module")
def retrieval_run(shapes_data_dir, shapes_tokenizer, tmp_path_factory):
  """A tiny CLIP embeds the tiny train and eval splits; an image index of the train split gives
  every image (train: other images only) 2 neighbours' captions."""
  from vlm_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference, train  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("retrieval_caption")
  tok_path = str(base / "tokenizer.model")
  shapes_tokenizer.save(tok_path)
  clip = str(base / "clip")
  train.train_and_evaluate(train_utils.tiny_config("clip", shapes_data_dir, tok_path,
                                                   total_steps=3), clip)
  model = inference.load(clip)
  store, test = str(base / "store"), str(base / "test_images")
  embed_lib.embed(model, embed_lib.split_data_config(model.config, "train"), store,
                  what=("images",), progress=False)
  embed_lib.embed(model, embed_lib.split_data_config(model.config, "eval"), test,
                  what=("images",), progress=False)
  index = index_lib.build(store, "images", str(base / "index"))
  paths = {}
  for name, emb in (("train", store), ("test", test)):
    paths[name] = str(base / f"{name}_neighbours.jsonl")
    index_lib.neighbours(index, emb, 2, paths[name])
  return dict(base=base, store=store, test_images=test, index=index, tokenizer=tok_path,
              **paths)


def test_image_index_neighbours_are_the_nearest_other_images_captions(retrieval_run):
  vectors, rows, _ = embed_lib.read(retrieval_run["store"], "images")
  found = [json.loads(line) for line in open(retrieval_run["train"])]
  assert len(found) == len(rows) == 256
  scores = vectors @ vectors.T
  np.fill_diagonal(scores, -np.inf)               # never the image itself
  for i in range(0, 256, 17):
    best = np.argsort(-scores[i], kind="stable")[:2]
    got = found[i]["neighbours"]
    assert found[i]["id"] == rows[i]["id"]
    np.testing.assert_allclose([n["score"] for n in got], scores[i, best], atol=1e-5)
    by_id = {r["id"]: r for r in rows}
    assert all(n["id"] != rows[i]["id"] and n["caption"] == by_id[n["id"]]["captions"][0]
               for n in got)


def test_retrieval_augmented_captioner_trains_and_evaluates(retrieval_run, shapes_data_dir):
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(retrieval_run["base"] / "rag")
  config = config_utils.load_config(
      os.path.join(REPO, "configs/shapes_retrieval_caption.py:tiny"),
      {**train_utils.tiny_overrides(shapes_data_dir, None, "prefixlm"),
       "total_steps": 4, "data.neighbours": retrieval_run["train"],
       "evals.run": "caption", "evals.caption.neighbours": retrieval_run["test"],
       "evals.caption.tokenizer": "python", "evals.batch_size": 32})
  metrics = train.train_and_evaluate(config, workdir)
  assert metrics["eval/caption/shapes/num_images"] == 64
  assert metrics["eval/caption/shapes/prompts_truncated"] == 0
  assert metrics["eval/caption/shapes/cider"] >= 0
  assert metrics["data/skipped"] == 0       # every training image had its neighbours
  # The run's own tokenizer was trained on the captions and the retrieval prompts: the
  # template's words are pieces of it, not unknowns.
  from vlm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok = tok_lib.Tokenizer.load(os.path.join(workdir, "tokenizer.model"))
  ids = tok.tokenize([retrieval.prompt_text(["a red circle."])])[0]
  assert tok.unk_id not in ids
  # Neighbours of other images (the training split's) leave nothing to caption: an error, not
  # a metrics file of zero images.
  from vlm_jax import evaluate  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.evals.caption.neighbours = retrieval_run["train"]
  with pytest.raises(ValueError, match="no image of the split has retrieved captions in"):
    evaluate.evaluate(config, workdir, write=False)


def test_empty_datastore_fails_before_training(retrieval_run, shapes_data_dir, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  overrides = {**train_utils.tiny_overrides(shapes_data_dir, retrieval_run["tokenizer"],
                                            "prefixlm"),
               "data.neighbours": str(empty)}
  proc = subprocess.run(
      [sys.executable, "-m", "vlm_jax.train", "--config=configs/shapes_retrieval_caption.py:tiny",
       f"--workdir={tmp_path / 'run'}", *train_utils.flag_args(overrides)],
      cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "holds no retrieved captions (an empty datastore?)" in proc.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()
