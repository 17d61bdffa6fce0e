"""Tests for vlm_jax.data.sources: TFDS (array_record and TFRecord readers, coco_captions via
tfds.testing.mock_data), captions.jsonl, WebDataset-style tar shards (brace/glob patterns,
per-process shard split, truncation), ImageFolder, the fields each provides, and fail-fast
errors."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import sources


def jpeg_bytes(seed, size=(24, 20), fmt="JPEG"):
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards, per_shard, *, caption_as="txt", extra=None):
  """Shards 00000.tar ... with samples 'sSSS_iII' -> caption 'caption S I'. Returns keys."""
  os.makedirs(folder, exist_ok=True)
  keys = []
  for s in range(num_shards):
    with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
      for i in range(per_shard):
        key = f"s{s:03d}_i{i:02d}"
        keys.append(f"{s:05d}.tar/{key}")
        _add(tar, f"{key}.jpg", jpeg_bytes(s * 1000 + i))
        text = f"caption {s} {i}".encode()
        if caption_as == "txt":
          _add(tar, f"{key}.txt", text)
        else:
          _add(tar, f"{key}.json", json.dumps({"caption": text.decode(), "w": 24}).encode())
        _add(tar, f"{key}.cls", str(s * 100 + i).encode())
      for name, data in (extra or {}).get(s, []):
        _add(tar, name, data)
  return keys


def write_jsonl(folder, n, bad=()):
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  with open(os.path.join(folder, "captions.jsonl"), "w") as f:
    for i in range(n):
      path = f"images/{i:03d}.png"
      with open(os.path.join(folder, path), "wb") as img:
        img.write(b"not an image" if i in bad else jpeg_bytes(i, fmt="PNG"))
      caption = f"picture {i}" if i % 2 else [f"picture {i}", f"another {i}"]
      f.write(json.dumps({"image": path, "caption": caption, "label": i % 3}) + "\n")
  return os.path.join(folder, "captions.jsonl")


def iterate_all(src, **kw):
  kw.setdefault("seed", 0)
  kw.setdefault("shuffle", False)
  kw.setdefault("num_epochs", 1)
  return list(src.iterate({"epoch": 0, "group": 0, "offset": 0}, **kw))


# ------------------------------------------------------------------------------------------------
# Shard patterns
# ------------------------------------------------------------------------------------------------


def test_expand_braces_ranges_and_lists():
  assert sources.expand_braces("a/{00008..00011}.tar") == [
      "a/00008.tar", "a/00009.tar", "a/00010.tar", "a/00011.tar"]
  assert sources.expand_braces("{x,y}/{1..2}.tar") == ["x/1.tar", "x/2.tar", "y/1.tar",
                                                        "y/2.tar"]
  assert sources.expand_braces("plain.tar") == ["plain.tar"]


def test_list_shards_glob_brace_and_failures(tmp_path):
  write_shards(str(tmp_path), 3, 1)
  assert [os.path.basename(p) for p in sources.list_shards(str(tmp_path / "*.tar"))] == [
      "00000.tar", "00001.tar", "00002.tar"]
  assert len(sources.list_shards(str(tmp_path / "{00000..00001}.tar"))) == 2
  with pytest.raises(FileNotFoundError, match=r"data.train_shards: no files match .*nothing"):
    sources.list_shards(str(tmp_path / "nothing*.tar"))
  with pytest.raises(FileNotFoundError, match="do not exist"):
    sources.list_shards(str(tmp_path / "{00000..00005}.tar"))


# ------------------------------------------------------------------------------------------------
# Tar shards
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption_as", ["txt", "json"])
def test_wds_source_yields_expected_examples(tmp_path, caption_as):
  keys = write_shards(str(tmp_path), 2, 3, caption_as=caption_as)
  src = sources.WdsSource(str(tmp_path / "{00000..00001}.tar"))
  out = iterate_all(src, process_index=0, process_count=1)
  assert [raw["key"] for raw, _ in out] == keys
  raw = out[4][0]  # shard 1, sample 1
  assert raw["captions"] in ([b"caption 1 1"], ["caption 1 1"])
  assert raw["label"] == 101
  assert raw["image"] == jpeg_bytes(1001)
  assert out[-1][1] == {"epoch": 0, "group": 0, "offset": 6}


def test_wds_process_split_is_disjoint_and_covers(tmp_path):
  keys = write_shards(str(tmp_path), 5, 2)
  src = sources.WdsSource(str(tmp_path / "*.tar"))
  seen = [[raw["key"] for raw, _ in iterate_all(src, process_index=p, process_count=2)]
          for p in range(2)]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(keys)
  # Whole shards go to one process.
  assert {k.split("/")[0] for k in seen[0]} == {"00000.tar", "00002.tar", "00004.tar"}
  with pytest.raises(ValueError, match="5 shard.*8 processes"):
    src.process_shards(0, 8)


def test_wds_shuffled_order_is_a_function_of_seed_and_resumes_exactly(tmp_path):
  write_shards(str(tmp_path), 4, 5)
  src = sources.WdsSource(str(tmp_path / "*.tar"), group_size=2)
  kw = dict(process_index=0, process_count=1, shuffle=True, num_epochs=2)
  a = [(raw["key"], pos) for raw, pos in iterate_all(src, seed=1, **kw)]
  b = [(raw["key"], pos) for raw, pos in iterate_all(sources.WdsSource(
      str(tmp_path / "*.tar"), group_size=2), seed=1, **kw)]
  c = [raw["key"] for raw, _ in iterate_all(src, seed=2, **kw)]
  assert a == b
  assert [k for k, _ in a] != c
  epoch0, epoch1 = [k for k, _ in a[:20]], [k for k, _ in a[20:]]
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
  # Resume from every 7th position: the continuation is identical.
  for i in range(0, 40, 7):
    resumed = [raw["key"] for raw, _ in src.iterate(a[i][1], seed=1, **kw)]
    assert resumed == [k for k, _ in a[i + 1:]]


def test_wds_truncated_shard_keeps_samples_before_damage(tmp_path):
  keys = write_shards(str(tmp_path), 2, 6)
  path = tmp_path / "00001.tar"
  data = path.read_bytes()
  # Cut in the middle of the 4th sample's image.
  with tarfile.open(path) as tar:
    member = tar.getmember("s001_i03.jpg")
  path.write_bytes(data[:member.offset_data + member.size // 2])
  index = sources.index_shard(str(path))
  assert index.truncated and index.lost == 1     # the 4th sample, cut in two
  assert [k for k, _ in index.samples] == ["s001_i00", "s001_i01", "s001_i02"]
  out = [raw for raw, _ in iterate_all(sources.WdsSource(str(tmp_path / "*.tar")),
                                       process_index=0, process_count=1)]
  errors = [raw for raw in out if raw.get("error")]
  assert [(e["error"], e["key"], e["lost"]) for e in errors] == [
      ("truncated_shard", "00001.tar", 1)]
  assert [raw["key"] for raw in out if not raw.get("error")] == keys[:6 + 3]
  # img2dataset's stats file beside the shard tells how many samples it held: 6, 3 kept.
  (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 6, "failed": 0}))
  assert sources.index_shard(str(path)).lost == 3


def test_wds_truncated_at_member_boundary_is_detected(tmp_path):
  write_shards(str(tmp_path), 1, 3)
  path = tmp_path / "00000.tar"
  with tarfile.open(path) as tar:
    member = tar.getmember("s000_i02.jpg")
  path.write_bytes(path.read_bytes()[:member.offset])  # header of sample 2 cut cleanly
  index = sources.index_shard(str(path))
  assert index.truncated
  assert len(index.samples) == 1  # sample 1 might have been incomplete: dropped with the tail


def test_wds_missing_caption_and_image_become_errors(tmp_path):
  extra = {0: [("nocap.jpg", jpeg_bytes(7)), ("noimg.txt", b"orphan caption")]}
  write_shards(str(tmp_path), 1, 1, extra=extra)
  out = [raw for raw, _ in iterate_all(sources.WdsSource(str(tmp_path / "*.tar")),
                                       process_index=0, process_count=1)]
  assert [(r.get("error"), r["key"]) for r in out] == [
      (None, "00000.tar/s000_i00"), ("missing_caption", "00000.tar/nocap"),
      ("missing_image", "00000.tar/noimg")]


# ------------------------------------------------------------------------------------------------
# captions.jsonl
# ------------------------------------------------------------------------------------------------


def test_jsonl_source(tmp_path):
  path = write_jsonl(str(tmp_path), 4)
  src = sources.JsonlSource(path)
  assert len(src) == 4 and src.random_access
  raw = src[2]
  assert raw["captions"] == ["picture 2", "another 2"]
  assert raw["label"] == 2
  assert raw["image"] == (tmp_path / "images/002.png").read_bytes()
  assert src[1]["captions"] == ["picture 1"]
  os.remove(tmp_path / "images/003.png")
  assert src[3]["error"] == "unreadable_image" and "003.png" in src[3]["key"]


def test_jsonl_fails_fast(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.jsonl"):
    sources.JsonlSource(str(tmp_path / "missing.jsonl"))
  (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"caption": 1}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    sources.JsonlSource(str(tmp_path / "bad.jsonl"))
  (tmp_path / "label.jsonl").write_text('{"image": "a.png", "caption": "x", "label": "cat"}\n')
  with pytest.raises(ValueError, match="label.jsonl:1: 'label' must be an integer"):
    sources.JsonlSource(str(tmp_path / "label.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="empty.jsonl holds no records"):
    sources.JsonlSource(str(tmp_path / "empty.jsonl"))


def test_fields_each_source_provides(tmp_path):
  labelled = sources.JsonlSource(write_jsonl(str(tmp_path / "a"), 3))
  assert labelled.provides == {"captions", "label"} and labelled.class_names() is None
  (tmp_path / "b.jsonl").write_text('{"image": "x.png", "caption": "a cat"}\n')
  assert sources.JsonlSource(str(tmp_path / "b.jsonl")).provides == {"captions"}
  write_shards(str(tmp_path / "w"), 1, 2)
  assert sources.WdsSource(str(tmp_path / "w" / "*.tar")).provides == {"captions", "label"}
  write_image_folder(tmp_path / "f", {"cat": 1})
  assert sources.ImageFolderSource(str(tmp_path / "f")).provides == {"label"}


def test_check_fields_names_what_is_missing(tmp_path):
  from vlm_jax.data import ops   # pylint: disable=g-import-not-at-top
  write_image_folder(tmp_path / "f", {"cat": 1})
  folder = sources.ImageFolderSource(str(tmp_path / "f"))
  sources.check_fields(folder, [ops.Label()], "task 'classification'")     # fine
  with pytest.raises(ValueError, match=r"data: task 'contrastive' needs 'captions' \(for batch "
                                       r"field text\), which image folder .* does not provide "
                                       r"\(it provides: image, label\)"):
    sources.check_fields(folder, [ops.Caption(None, 8), ops.Label()], "task 'contrastive'")


# ------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------


def write_image_folder(root, counts, fmt="PNG"):
  """root/<class>/<i>.png with counts[class] images each; returns {relative path: label}."""
  labels = {}
  for label, name in enumerate(sorted(counts)):
    os.makedirs(root / name, exist_ok=True)
    for i in range(counts[name]):
      path = root / name / f"{i}.{fmt.lower()}"
      path.write_bytes(jpeg_bytes(label * 100 + i, fmt=fmt))
      labels[f"{name}/{i}.{fmt.lower()}"] = label
  return labels


def test_image_folder_classes_labels_and_files(tmp_path):
  root = tmp_path / "train"
  labels = write_image_folder(root, {"zebra": 2, "ant": 3})
  (root / "ant" / "nested").mkdir()
  (root / "ant" / "nested" / "deep.JPG").write_bytes(jpeg_bytes(7))   # recursive, any case
  (root / "ant" / "notes.txt").write_text("not an image")            # ignored
  (root / ".cache").mkdir()                                           # hidden: not a class
  src = sources.ImageFolderSource(str(root))
  assert src.class_names() == ["ant", "zebra"] and src.random_access
  got = {src[i]["key"]: src[i]["label"] for i in range(len(src))}
  assert got == {**labels, "ant/nested/deep.JPG": 0}
  assert src[0]["captions"] is None
  assert src[0]["image"] == (root / src[0]["key"]).read_bytes()
  os.remove(root / "zebra" / "1.png")
  assert src[len(src) - 1]["error"] == "unreadable_image"
  # With the training run's class names: the same labels even where a class folder is missing.
  named = sources.ImageFolderSource(str(root), class_names=["cow", "zebra", "ant"])
  assert {named[i]["key"]: named[i]["label"] for i in range(len(named))}["zebra/0.png"] == 1
  with pytest.raises(ValueError, match=r"class folders \['ant'\] of .* are not among the 2"):
    sources.ImageFolderSource(str(root), class_names=["cow", "zebra"])


def test_image_folder_fails_naming_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data.train_folder: image folder .*nowhere"):
    sources.ImageFolderSource(str(tmp_path / "nowhere"))
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "a.png").write_bytes(jpeg_bytes(0, fmt="PNG"))
  with pytest.raises(ValueError, match=r"data.eval_folder: .*flat has no class folders"):
    sources.ImageFolderSource(str(tmp_path / "flat"), field="data.eval_folder")
  (tmp_path / "empty" / "cat").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"no image files .* under the 1 class folders of .*empty"):
    sources.ImageFolderSource(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------------


def test_tfds_missing_dataset_fails_fast(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'mnist'.*not prepared.*data_dir="):
    sources.TfdsSource("mnist", "train", data_dir=str(tmp_path),
                       fields=sources.FieldMap(text_key=None, label_key="label"))
  with pytest.raises(FileNotFoundError, match=r"'no_such_dataset_xyz' not found"):
    sources.TfdsSource("no_such_dataset_xyz", "train", data_dir=str(tmp_path))


def test_coco_captions_data_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  fields = sources.FieldMap(image_key="image", text_key="captions/text",
                            id_key="image/filename")
  with tfds.testing.mock_data(num_examples=6):
    # skip_decode=False: see TfdsSource (tfds 4.9.10 mock cannot encode coco's captions).
    src = sources.TfdsSource("coco_captions", "train", data_dir="/does/not/matter",
                             fields=fields, reader="data_source", skip_decode=False)
    assert src.random_access and len(src) == 6
    raw = src[3]
  assert raw["image"].dtype == np.uint8 and raw["image"].ndim == 3
  assert len(raw["captions"]) >= 1 and all(isinstance(c, (str, bytes)) for c in raw["captions"])
  assert raw["label"] == -1
  assert raw["key"].startswith("coco_captions/train/")


def test_tfds_bad_field_names_fail_with_the_field():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match=r"data.text_key: feature 'caption' not found"):
      sources.TfdsSource("coco_captions", "train", fields=sources.FieldMap(text_key="caption"))


def test_even_share():
  shares = [sources.even_share(10, p, 3, drop_remainder=False) for p in range(3)]
  assert shares == [(0, 3), (3, 6), (6, 10)]
  assert [sources.even_share(10, p, 3, drop_remainder=True) for p in range(3)] == [
      (0, 3), (3, 6), (6, 9)]


def _tiny_builder_cls():
  """A real (non-mocked) TFDS builder with 10 image-caption examples, defined once."""
  tfds = pytest.importorskip("tensorflow_datasets")
  global _TinyCaptions  # pylint: disable=global-statement
  if "_TinyCaptions" not in globals():

    class VlmJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "meta": {"captions": tfds.features.Sequence(tfds.features.Text())},
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(10):
          img = np.full((8, 10, 3), i * 20, np.uint8)
          yield i, {"image": img, "meta": {"captions": [f"number {i}", f"digit {i}"]},
                    "label": i, "id": f"ex{i}"}

    globals()["_TinyCaptions"] = VlmJaxTinyCaptions
  return globals()["_TinyCaptions"]


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_prepared_dataset_both_readers(tmp_path, file_format):
  cls = _tiny_builder_cls()
  cls(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
  fields = sources.FieldMap(image_key="image", text_key="meta/captions", label_key="label",
                            id_key="id")
  src = sources.TfdsSource("vlm_jax_tiny_captions", "train", data_dir=str(tmp_path),
                           fields=fields)
  assert src.random_access == (file_format == "array_record")
  if src.random_access:
    raws = [src[i] for i in range(len(src))]
  else:
    with pytest.raises(ValueError, match="no array_record files"):
      sources.TfdsSource("vlm_jax_tiny_captions", "train", data_dir=str(tmp_path),
                         fields=fields, reader="data_source")
    raws = [raw for raw, _ in iterate_all(src, process_index=0, process_count=1)]
    # Two processes: disjoint, covering shares (tfds.even_splits).
    shares = [[r["label"] for r, _ in iterate_all(src, process_index=p, process_count=2)]
              for p in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(10))
    assert src.eval_share_sizes(2) == [5, 5]
  assert sorted(r["label"] for r in raws) == list(range(10))
  raw = next(r for r in raws if r["label"] == 3)
  assert raw["key"] == "vlm_jax_tiny_captions/train/ex3"
  assert [c.decode() if isinstance(c, bytes) else c for c in raw["captions"]] == [
      "number 3", "digit 3"]
  assert isinstance(raw["image"], bytes)  # SkipDecoding: PNG bytes
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(raw["image"]))),
                                np.full((8, 10, 3), 60, np.uint8))
