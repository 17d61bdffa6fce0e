"""Tests of the embedded `shapes` dataset: prepared with TFDS, read back like any TFDS dataset,
and checked against the pixels (the captions must describe what was actually drawn)."""
import hashlib
import os
import re
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from vlm_jax.data import shapes

CONFIG = "tiny"
SIZE = 32


def _records(data_dir, split):
  ds = tfds.data_source(f"shapes/{CONFIG}", split=split, data_dir=data_dir)
  return [ds[i] for i in range(len(ds))]


def _objects(ex):
  o = ex["objects"]
  return [dict(shape=shapes.SHAPES[o["shape"][i]], colour=shapes.COLOUR_NAMES[o["colour"][i]],
               size=shapes.SIZES[o["size"][i]], position=shapes.POSITIONS[o["position"][i]],
               box=np.round(np.asarray(o["bbox"][i]) * SIZE).astype(int))
          for i in range(len(o["shape"]))]


def _shape_from_pixels(mask):
  """Names the shape that fills `mask` (its bounding box), from the pixels alone."""
  corners = int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])
  if corners == 4 and mask.all():
    return "square"
  if corners == 2 and mask[-1].all() and mask[0].sum() <= 2:
    return "triangle"
  if corners == 0 and mask[len(mask) // 2].all():
    # A circle widens below its top row; a cross's vertical bar keeps its width.
    return "circle" if mask[1].sum() > mask[0].sum() else "cross"
  return "unknown"


def _position_from_box(box):
  y0, x0, y1, x1 = box
  cy, cx = (y0 + y1) / 2 / SIZE, (x0 + x1) / 2 / SIZE
  if abs(cy - 0.5) < 0.1 and abs(cx - 0.5) < 0.1:
    return "center"
  return f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


def _words(text, vocabulary):
  return {w for w in re.findall(r"[a-z]+", text) if w in vocabulary}


def test_prepared_dataset_info(shapes_data_dir):
  builder = tfds.builder(f"shapes/{CONFIG}", data_dir=shapes_data_dir)
  assert builder.is_prepared()
  assert builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 256, "validation": 64, "test": 64}
  names = shapes.class_names()
  assert builder.info.features["label"].names == names
  assert len(names) == len(set(names)) == len(shapes.COLOURS) * len(shapes.SHAPES)
  assert names[shapes.class_index("blue", "triangle")] == "blue triangle"
  assert builder.info.supervised_keys == ("image", "label")


def test_splits_do_not_overlap(shapes_data_dir):
  hashes, ids = {}, {}
  for split in shapes.SPLITS:
    records = _records(shapes_data_dir, split)
    hashes[split] = {hashlib.sha256(r["image"].tobytes()).hexdigest() for r in records}
    ids[split] = {r["id"].decode() for r in records}
    assert len(hashes[split]) == len(records), f"duplicate images inside {split}"
    assert all(i.startswith(split + "/") for i in ids[split])
  for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
    assert not hashes[a] & hashes[b], f"{a} and {b} share images"


def test_pixels_and_captions_match_the_drawn_objects(shapes_data_dir):
  scenes, labels = set(), set()
  colour_words, shape_words = set(shapes.COLOURS), set(shapes.SHAPES) | set(shapes.PLURALS.values())
  for split in shapes.SPLITS:
    for ex in _records(shapes_data_dir, split):
      image, objs = ex["image"], _objects(ex)
      scene = shapes.SCENES[ex["scene"]]
      caps = [c.decode() for c in ex["captions"]]
      scenes.add(scene)
      labels.add(int(ex["label"]))
      assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8

      # The metadata agrees with the pixels.
      covered = np.zeros((SIZE, SIZE), bool)
      for o in objs:
        y0, x0, y1, x1 = o["box"]
        rgb = shapes.COLOURS[o["colour"]]
        mask = np.all(image[y0:y1, x0:x1] == rgb, axis=-1)
        assert _shape_from_pixels(mask) == o["shape"], (ex["id"], o)
        side = y1 - y0
        assert side == x1 - x0
        assert (side < 0.33 * SIZE) if o["size"] == "small" else (side > 0.38 * SIZE), o
        assert _position_from_box(o["box"]) == o["position"], o
        covered[y0:y1, x0:x1] = True
      outside = np.zeros((SIZE, SIZE), bool)
      for rgb in shapes.COLOURS.values():
        outside |= np.all(image == rgb, axis=-1)
      assert not (outside & ~covered).any(), f"{ex['id']}: object colour outside the objects"

      # The label is the main object's class.
      main = objs[0]
      assert shapes.class_names()[ex["label"]] == f"{main['colour']} {main['shape']}"

      # The captions name what is there, and nothing else.
      present_colours = {o["colour"] for o in objs}
      present_shapes = {o["shape"] for o in objs} | {shapes.PLURALS[o["shape"]] for o in objs}
      for c in caps:
        assert c.endswith(".") and c == c.strip()
        assert _words(c, colour_words) <= present_colours, (c, objs)
        assert _words(c, shape_words) <= present_shapes, (c, objs)
        assert main["colour"] in c.split() and re.search(rf"\b{main['shape']}", c), (c, main)
        said_positions = set(re.findall(r"(?:top|bottom) (?:left|right)|center", c))
        assert said_positions <= {o["position"] for o in objs}, (c, objs)
      count_words = {len(objs)} if len(objs) > 1 else set()
      for c in caps:
        said = {n for n, w in shapes.NUMBER_WORDS.items() if w in c.split()}
        assert said <= count_words, (c, objs)
      if scene == "one":
        assert len(objs) == 1
        assert any(f"{main['size']} {main['colour']} {main['shape']} in the {main['position']}"
                   in c for c in caps), caps
      elif scene == "same":
        assert len(objs) in (2, 3)
        assert {(o["colour"], o["shape"], o["size"]) for o in objs} == {
            (main["colour"], main["shape"], "small")}
        assert len({o["position"] for o in objs}) == len(objs)
        number, plural = shapes.NUMBER_WORDS[len(objs)], shapes.PLURALS[main["shape"]]
        assert all(re.search(rf"\b{number} (small )?{main['colour']} {plural}\b", c)
                   for c in caps), caps
        assert any(all(f"the {o['position']}" in c for o in objs) for c in caps), caps
      else:
        assert len(objs) == 2
        other = objs[1]
        assert (main["size"], other["size"]) == ("large", "small")
        assert (main["colour"], main["shape"]) != (other["colour"], other["shape"])
        assert main["position"] != other["position"]
        for c in caps:  # both objects, the main one first
          i = c.find(f"{main['colour']} {main['shape']}")
          j = c.find(f"{other['colour']} {other['shape']}")
          assert 0 <= i < j, (c, objs)
        assert any(f"in the {main['position']}" in c and f"in the {other['position']}" in c
                   for c in caps), caps
  assert scenes == set(shapes.SCENES)
  train_labels = {int(r["label"]) for r in _records(shapes_data_dir, "train")}
  assert train_labels == set(range(len(shapes.class_names())))


def test_grain_reads_the_data_source(shapes_data_dir):
  import grain  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(f"shapes/{CONFIG}", split="test", data_dir=shapes_data_dir)
  ds = (grain.MapDataset.source(source).shuffle(seed=0)
        .map(lambda e: {"image": e["image"], "label": np.int32(e["label"])}).batch(16))
  assert len(ds) == 4
  labels = np.concatenate([ds[i]["label"] for i in range(len(ds))])
  assert ds[0]["image"].shape == (16, SIZE, SIZE, 3)
  assert sorted(labels.tolist()) == sorted(int(r["label"]) for r in _records(shapes_data_dir, "test"))


def test_stored_examples_equal_the_generator(shapes_data_dir):
  config = shapes.get_config(CONFIG)
  for r in _records(shapes_data_dir, "validation")[:16]:
    split, index = r["id"].decode().split("/")
    ex = shapes.generate_example(config, split, int(index))
    np.testing.assert_array_equal(r["image"], ex["image"])
    assert [c.decode() for c in r["captions"]] == ex["captions"]
    assert r["label"] == ex["label"]
    np.testing.assert_allclose(np.stack(r["objects"]["bbox"]), ex["objects"]["bbox"])


def test_two_preparations_are_identical(shapes_data_dir, tmp_path):
  shapes.prepare(CONFIG, str(tmp_path))
  for split in shapes.SPLITS:
    a, b = _records(shapes_data_dir, split), _records(str(tmp_path), split)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x["id"] == y["id"]
      np.testing.assert_array_equal(x["image"], y["image"])
      assert list(x["captions"]) == list(y["captions"])
      assert x["label"] == y["label"]


def test_prepare_is_idempotent_and_checks_the_format(shapes_data_dir):
  version_dir = os.path.join(shapes_data_dir, "shapes", CONFIG, str(shapes.Shapes.VERSION))
  before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
  t0 = time.time()
  shapes.prepare(CONFIG, shapes_data_dir)
  assert time.time() - t0 < 5.0
  after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
  assert before == after
  with pytest.raises(ValueError, match="prepared as array_record"):
    shapes.prepare(CONFIG, shapes_data_dir, file_format="tfrecord")


def test_tfrecord_variant_reads_with_tf_data(shapes_data_dir, tmp_path):
  shapes.prepare(CONFIG, str(tmp_path), file_format="tfrecord")
  ds = tfds.load(f"shapes/{CONFIG}", split="test", data_dir=str(tmp_path), as_supervised=True)
  images, labels = next(iter(tfds.as_numpy(ds.batch(8))))
  assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert labels.shape == (8,) and ((labels >= 0) & (labels < len(shapes.class_names()))).all()


def test_caption_corpus_is_the_train_captions(shapes_data_dir):
  corpus = shapes.caption_corpus(CONFIG)
  stored = [c.decode() for r in _records(shapes_data_dir, "train") for c in r["captions"]]
  assert sorted(corpus) == sorted(stored)
  assert shapes.caption_corpus(CONFIG, "train[:10%]") == corpus
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    shapes.caption_corpus(CONFIG, "dev")


def test_prompt_templates_use_caption_words():
  corpus_words = set(" ".join(shapes.caption_corpus(CONFIG)).replace(".", " ").split())
  for template in shapes.PROMPT_TEMPLATES:
    for name in shapes.class_names():
      assert set(template.format(name).replace(".", " ").split()) <= corpus_words


def test_generation_is_deterministic_and_depends_on_split_and_seed():
  config = shapes.get_config(CONFIG)
  a = shapes.generate_example(config, "train", 7)
  b = shapes.generate_example(config, "train", 7)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["captions"] == b["captions"]
  c = shapes.generate_example(config, "test", 7)
  assert not np.array_equal(a["image"], c["image"])
  other_seed = shapes.ShapesConfig(name="x", seed=1)
  assert not np.array_equal(a["image"], shapes.generate_example(other_seed, "train", 7)["image"])


def test_clear_errors():
  with pytest.raises(ValueError, match="unknown config 'huge'"):
    shapes.get_config("huge")
  with pytest.raises(ValueError, match="scene_weights"):
    shapes.ShapesConfig(name="bad", scene_weights=(0.5, 0.5))
  with pytest.raises(ValueError, match="max_same 4"):
    shapes.ShapesConfig(name="bad", max_same=4)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    shapes.generate_example(shapes.get_config(CONFIG), "dev", 0)
