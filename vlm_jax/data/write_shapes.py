r"""Writes a split of the embedded shapes data in the file layouts of your own data.

    python -m vlm_jax.data.write_shapes --layout jsonl --split train --out data/train
    python -m vlm_jax.data.write_shapes --layout wds --split train --out data/shards
    python -m vlm_jax.data.write_shapes --layout imagefolder --split test --out data/test
    python -m vlm_jax.data.write_shapes --layout vqav2 --split test --out data/vqa_test

Layouts (the ones `config.data.source` reads):
  jsonl        OUT/captions.jsonl ({"image": "images/<id>.png", "caption": [...]}) + OUT/images/
  wds          OUT/00000.tar, 00001.tar, ... as img2dataset writes them: <key>.png, <key>.txt
               (the first caption), <key>.json ({"caption", "key"}), and <shard>_stats.json
  imagefolder  OUT/<class_name>/<id>.png (class names with '_' for spaces)
  vqav2        OUT/questions.json + OUT/annotations.json (the official VQAv2 formats) and
               OUT/images/COCO_shapes<split>_<12-digit image id>.png (COCO naming)

It exists so that every bring-your-own-data command in README runs as written on any machine:
swap in your files and the commands stay the same. Images are drawn directly by the shapes
generator (no TFDS build), so the files equal the TFDS examples of the same ids.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tqdm

from vlm_jax.data import shapes

LAYOUTS = ("jsonl", "wds", "imagefolder", "vqav2")

_LAYOUT = flags.DEFINE_enum("layout", None, LAYOUTS, "File layout to write.")
_OUT = flags.DEFINE_string("out", None, "Output folder (created; must be empty or absent).")
_SPLIT = flags.DEFINE_enum("split", "train", list(shapes.SPLITS), "Shapes split.")
_CONFIG = flags.DEFINE_string("shapes_config", "tiny", "Shapes config: tiny, demo or small.")
_NUM = flags.DEFINE_integer("num", None, "Write only the first NUM examples.")
_LABELS = flags.DEFINE_bool("labels", False, "jsonl / wds: add the class label of each image.")
_PER_SHARD = flags.DEFINE_integer("per_shard", 1000, "wds: samples per tar shard.")


def _png(image) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def examples(config_name: str, split: str, num: int | None = None):
  """Yields the shapes examples (`shapes.generate_example`) of a split in id order."""
  config = shapes.get_config(config_name)
  total = shapes._split_sizes(config)[split]  # pylint: disable=protected-access
  for i in range(total if num is None else min(num, total)):
    yield shapes.generate_example(config, split, i)


def _file_name(example) -> str:
  return example["id"].replace("/", "_") + ".png"


def write_jsonl(out: str, exs, labels: bool = False) -> str:
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  path = os.path.join(out, "captions.jsonl")
  with open(path, "w") as f:
    for ex in exs:
      rel = os.path.join("images", _file_name(ex))
      with open(os.path.join(out, rel), "wb") as img:
        img.write(_png(ex["image"]))
      record = {"image": rel, "caption": ex["captions"]}
      if labels:
        record["label"] = int(ex["label"])
      f.write(json.dumps(record) + "\n")
  return path


def _add(tar, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(out: str, exs, per_shard: int = 1000, labels: bool = False) -> list:
  """img2dataset's output layout; returns the shard paths."""
  os.makedirs(out, exist_ok=True)
  paths, tar, count, shard = [], None, 0, -1

  def close():
    if tar is not None:
      tar.close()
      stats = {"count": count, "successes": count, "failed_to_download": 0}
      with open(os.path.join(out, f"{shard:05d}_stats.json"), "w") as f:
        json.dump(stats, f)

  for i, ex in enumerate(exs):
    if i % per_shard == 0:
      close()
      shard, count = shard + 1, 0
      paths.append(os.path.join(out, f"{shard:05d}.tar"))
      tar = tarfile.open(paths[-1], "w")
    key = f"{shard:05d}{count:04d}"
    _add(tar, f"{key}.png", _png(ex["image"]))
    _add(tar, f"{key}.txt", ex["captions"][0].encode())
    meta = {"caption": ex["captions"][0], "key": key, "id": ex["id"]}
    _add(tar, f"{key}.json", json.dumps(meta).encode())
    if labels:
      _add(tar, f"{key}.cls", str(int(ex["label"])).encode())
    count += 1
  close()
  return paths


def write_image_folder(out: str, exs) -> list:
  """Returns the class folder names, sorted: the label order an ImageFolder source gives them
  (not shapes' own label order, which is colour-major)."""
  names = [n.replace(" ", "_") for n in shapes.class_names()]
  for ex in exs:
    folder = os.path.join(out, names[int(ex["label"])])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _file_name(ex)), "wb") as f:
      f.write(_png(ex["image"]))
  return sorted(os.listdir(out))


def write_vqav2(out: str, exs, split: str) -> dict:
  """The VQAv2 questions / annotations files and a COCO-named image folder; returns the paths."""
  subtype = f"shapes{split}"
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  questions, annotations = [], []
  for ex in exs:
    image_id = int(ex["id"].split("/")[1])
    with open(os.path.join(out, "images", f"COCO_{subtype}_{image_id:012d}.png"), "wb") as f:
      f.write(_png(ex["image"]))
    for q in ex["questions"]:
      questions.append({"image_id": image_id, "question": q["question"],
                        "question_id": q["question_id"]})
      annotations.append({"image_id": image_id, **q})
  info = {"description": "shapes visual questions (vlm_jax)", "version": "1.0"}
  paths = {"questions": os.path.join(out, "questions.json"),
           "annotations": os.path.join(out, "annotations.json"),
           "images": os.path.join(out, "images")}
  with open(paths["questions"], "w") as f:
    json.dump({"info": info, "task_type": "Open-Ended", "data_type": "shapes",
               "data_subtype": subtype, "license": {}, "questions": questions}, f)
  with open(paths["annotations"], "w") as f:
    json.dump({"info": info, "data_type": "shapes", "data_subtype": subtype, "license": {},
               "annotations": annotations}, f)
  return paths


def write(layout: str, out: str, config_name: str = "tiny", split: str = "train",
          num: int | None = None, labels: bool = False, per_shard: int = 1000,
          progress: bool = False):
  if layout not in LAYOUTS:
    raise ValueError(f"layout: unknown {layout!r}; expected one of {', '.join(LAYOUTS)}")
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out: {out} is not empty; choose a new folder")
  exs = examples(config_name, split, num)
  if progress:
    total = shapes._split_sizes(shapes.get_config(config_name))[split]  # pylint: disable=protected-access
    exs = tqdm.tqdm(exs, total=total if num is None else min(num, total), unit="image",
                    desc=f"shapes/{config_name} {split} -> {layout}")
  if layout == "jsonl":
    return write_jsonl(out, exs, labels)
  if layout == "wds":
    return write_shards(out, exs, per_shard, labels)
  if layout == "vqav2":
    return write_vqav2(out, exs, split)
  return write_image_folder(out, exs)


def main(argv):
  del argv
  try:
    result = write(_LAYOUT.value, _OUT.value, _CONFIG.value, _SPLIT.value, _NUM.value,
                   _LABELS.value, _PER_SHARD.value, progress=True)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  where = result if isinstance(result, str) else _OUT.value
  if isinstance(result, dict):
    where = ", ".join(result.values())
  print(f"wrote shapes/{_CONFIG.value} {_SPLIT.value} as {_LAYOUT.value} to {where}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["layout", "out"])
  app.run(main)
