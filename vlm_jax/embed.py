r"""Embed the images and captions of a data split with a checkpoint, into `.npy` shards.

  python -m vlm_jax.embed --workdir runs/shapes_clip --out runs/shapes_clip/embeddings \
      [--split eval|train] [--what images,texts] [--shard_size 4096] [--max_captions 5] \
      [--config.data.source=jsonl --config.data.eval_jsonl=captions.jsonl ...]

The data is the run's (its config's `data` section, with any `--config.data.*` overrides): the
eval split, or with `--split train` the training files read in order. Every process reads its
share of each shard and the model runs on the global batch over all devices (as evaluation
does); process 0 writes. The output folder:

  manifest.json            the model (workdir, step, model_id, embed_dim), the data, the shard
                           size and the finished shards (`shards`: index -> row counts)
  images-00000.npy         float32 [n, D] unit-norm image embeddings of shard 0, in split order
  texts-00000.npy          float32 [m, D] caption embeddings (each image's captions, in order)
  rows-00000.jsonl         one line per image: {"row": split index, "key": the source's id,
                           "captions": [...]} (the captions the texts file holds, in order)

A shard's files are written under temporary names and renamed, then the manifest is replaced,
so a killed run leaves only finished shards; run the same command again and it continues with
the first unfinished shard (finished ones are neither read nor computed again). Embeddings of
another model or other settings in --out are refused, never mixed. Examples that cannot be
read (a corrupt image) are skipped and counted in the manifest, as in training.

Tar shards (`data.source='wds'`) are embedded one output shard per tar file (`--shard_size`
does not apply; `row` is the sample's index in its tar file): a tar's headers are read when its
turn comes, every process reads its share of that tar's samples by their offsets, and a killed
run continues with the first unfinished tar. A truncated tar contributes its samples up to the
damage (the damage counts as one skipped example). TFRecord-only TFDS datasets are read as a
stream and refused.

`read(dir, kind)` loads (vectors, rows) for `vlm_jax.index build`.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from vlm_jax import cli
from vlm_jax import files
from vlm_jax import console
from vlm_jax import inference
from vlm_jax.data import ops
from vlm_jax.evals import common

FORMAT = "vlm_jax.embeddings/1"
KINDS = ("images", "texts")
# --split train reads the training files through the (ordered, unaugmented) eval pipeline.
_TRAIN_AS_EVAL = {"eval_split": "train_split", "eval_shards": "train_shards",
                  "eval_jsonl": "train_jsonl", "eval_folder": "train_folder",
                  "eval_text": "train_text", "eval_vqa_questions": "train_vqa_questions",
                  "eval_vqa_annotations": "train_vqa_annotations",
                  "eval_vqa_images": "train_vqa_images"}


def split_data_config(config, split: str) -> ml_collections.ConfigDict:
  """The run's data config set to read `split` ('eval' or 'train') as an ordered eval pass."""
  if split not in ("eval", "train"):
    raise ValueError(f"embed: --split {split!r}: expected 'eval' or 'train'")
  data = ml_collections.ConfigDict(config.data.to_dict())
  if split == "train":
    for eval_field, train_field in _TRAIN_AS_EVAL.items():
      if eval_field in data:
        data[eval_field] = data.get(train_field)
  return data


def data_description(data) -> dict:
  """What identifies the data read (checked when a run continues)."""
  fields = ("source", "name", "data_dir", "eval_split", "eval_shards", "eval_jsonl",
            "eval_folder", "eval_text", "image_root", "image_size")
  return {f: data.get(f) for f in fields if data.get(f) is not None}


class _Range:
  """Records [start, end) of a random-access source, each tagged with its split index."""

  def __init__(self, source, start: int, end: int):
    self.source, self.start, self.end = source, start, end
    self.random_access = True
    self.provides = getattr(source, "provides", frozenset())

  def __len__(self):
    return self.end - self.start

  def __getitem__(self, index):
    return dict(self.source[self.start + index], _row=self.start + index)

  def describe(self):
    return f"{self.source.describe()} [{self.start}:{self.end}]"

  def class_names(self):
    return self.source.class_names()


class RowIndex:
  """Field op: `row` int32 [B], each example's index in the split (-1 for padding)."""
  requires = ()
  provides = ("row",)

  def __call__(self, raw, rng, train):
    del rng, train
    return {"_row": int(raw["_row"])}

  def padding(self):
    return {"_row": -1}

  def collate(self, examples):
    return {"row": np.asarray([e["_row"] for e in examples], np.int32)}


def _whole(source) -> _Range:
  return _Range(source, 0, len(source))


def _start_manifest(out_dir: str, settings: dict) -> dict:
  """The manifest to continue (its settings must be these), or a new one."""
  path = os.path.join(out_dir, "manifest.json")
  if not os.path.exists(path):
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      raise FileExistsError(f"embed: --out {out_dir} is a non-empty folder without a "
                            "manifest.json; choose a new folder")
    return dict(settings, format=FORMAT, shards={}, skipped={})
  with open(path) as f:
    manifest = json.load(f)
  # (The example and shard counts follow from the data, which is compared.)
  different = [f"{k}: {manifest.get(k)!r} there, {v!r} now" for k, v in settings.items()
               if k not in ("num_examples", "num_shards") and manifest.get(k) != v]
  if manifest.get("format") != FORMAT or different:
    raise ValueError(f"embed: {out_dir} holds embeddings made with other settings "
                     f"({'; '.join(different) or 'format ' + repr(manifest.get('format'))}); "
                     "use a new --out, or the same settings to continue it")
  return manifest


def embed(model: inference.Model, data, out_dir: str, *, what: Sequence[str] = KINDS,
          shard_size: int = 4096, max_captions: int = 5, batch_size: Optional[int] = None,
          max_shards: Optional[int] = None, progress: bool = True) -> dict:
  """Embeds the eval pass of `data` (a data config) into `out_dir`; returns the manifest.

  `max_shards`: stop after computing that many shards (the rest is left for a later call).
  """
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top  (TF is heavy)
  what = tuple(what)
  if not what or any(w not in KINDS for w in what):
    raise ValueError(f"embed: --what {','.join(what)!r}: expected images and/or texts")
  if shard_size < 1:
    raise ValueError(f"embed: --shard_size {shard_size} must be >= 1")
  ctx = model.context
  for name in ("encode_images",) * ("images" in what) + ("encode_texts",) * ("texts" in what):
    ctx.predict_fn(name, "embed")
  field_ops = [RowIndex()]
  if "texts" in what:
    field_ops.append(ops.AllCaptions(ctx.tokenizer, ctx.context_length, max_captions))
  source = sources.make_source(data, "eval")
  sources.check_fields(source, field_ops, "embed")
  if getattr(source, "random_access", False):
    n = len(source)
    num_shards = math.ceil(n / shard_size)
    shard_range = lambda i: _Range(source, i * shard_size, min(n, (i + 1) * shard_size))
  elif hasattr(source, "shard_source"):        # tar shards: one output shard per tar file
    n, shard_size, num_shards = None, None, len(source.shards)
    shard_range = lambda i: _whole(source.shard_source(i))
  else:
    raise ValueError(f"embed: data.source={data.source!r} ({source.describe()}) is read as a "
                     "stream; embed needs a source it can cut into resumable shards (tfds with "
                     "array_record files, jsonl, imagefolder, tar shards)")
  settings = {"model": model.identity(), "data": data_description(data), "what": list(what),
              "shard_size": shard_size, "max_captions": int(max_captions),
              "num_examples": n, "num_shards": num_shards}
  writer = jax.process_index() == 0
  manifest = _start_manifest(out_dir, settings)
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  done = np.asarray([str(i) in manifest["shards"] for i in range(num_shards)], bool)
  if jax.process_count() > 1:
    # Process 0's manifest decides (the others may not see its folder).
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  todo = [i for i in range(num_shards) if not done[i]]
  if max_shards is not None:
    todo = todo[:max(0, int(max_shards))]
  bar = console.bar(total=len(todo), desc="embed", unit="shard", enabled=progress)
  for i in todo:
    shard = shard_range(i)
    rows, images, texts, skipped = _embed_shard(ctx, data, field_ops, shard, what, batch_size)
    if writer:
      _write_shard(out_dir, i, shard.source, rows, images, texts, what, max_captions)
      manifest["shards"][str(i)] = {"images": len(rows), "texts": len(texts)}
      if skipped:
        manifest["skipped"][str(i)] = skipped
      manifest["complete"] = len(manifest["shards"]) == num_shards
      files.write_json(os.path.join(out_dir, "manifest.json"), manifest)
    bar.update(1)
  bar.close()
  manifest["complete"] = len(manifest["shards"]) == num_shards
  if writer and not todo:
    files.write_json(os.path.join(out_dir, "manifest.json"), manifest)
  return manifest


def _embed_shard(ctx, data, field_ops, shard_source, what, batch_size):
  """(rows [n] sorted, image embeddings [n, D], caption embeddings [m, D], skipped count) of one
  shard, gathered on every process."""
  encode_images = ctx.predict_fn("encode_images") if "images" in what else None
  encode_texts = ctx.predict_fn("encode_texts") if "texts" in what else None

  def fn(params, batch):
    out = {"row": batch["row"], "mask": batch["mask"]}
    if encode_images is not None:
      out["images"] = encode_images(params, batch)
    if encode_texts is not None:
      b, k, length = batch["captions"].shape
      out["texts"] = encode_texts(params, {"text": batch["captions"].reshape(b * k, length)}
                                  ).reshape(b, k, -1)
      out["captions_mask"] = batch["captions_mask"]
    return out

  parts = []
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      batch_size or common.default_batch(ctx.config),
                                      who="embed", source=shard_source):
    out = ctx.call(("embed", tuple(what)), fn, batch)
    keep = out["mask"]
    parts.append({k: v[keep] for k, v in out.items()})
  dim = int(ctx.config.model.embed_dim)
  if not parts:
    return (np.zeros((0,), np.int64), np.zeros((0, dim), np.float32),
            np.zeros((0, dim), np.float32), len(shard_source))
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(out["row"], kind="stable")        # split order, whatever the processes
  rows = out["row"][order].astype(np.int64)
  images = out["images"][order] if "images" in out else np.zeros((len(rows), 0), np.float32)
  texts = np.zeros((0, dim), np.float32)
  if "texts" in out:
    texts_by_row, mask = out["texts"][order], out["captions_mask"][order]
    texts = texts_by_row[mask]                           # row-major: each image's captions
  return rows, images, texts, len(shard_source) - len(rows)


def _write_shard(out_dir, i, source, rows, images, texts, what, max_captions):
  lines = []
  for r in rows:
    raw = source[int(r)]
    # Kept with image vectors too: an image index is a datastore of these captions.
    try:
      captions = ops.clean_captions(raw.get("captions"))[:max_captions]
    except ops.BadExample:
      if "texts" in what:
        raise
      captions = []
    lines.append(json.dumps({"row": int(r), "key": str(raw.get("key", r)),
                             "captions": captions}))
  if "images" in what:
    files.save_npy(os.path.join(out_dir, f"images-{i:05d}.npy"), images.astype(np.float32))
  if "texts" in what:
    files.save_npy(os.path.join(out_dir, f"texts-{i:05d}.npy"), texts.astype(np.float32))
  files.write_lines(os.path.join(out_dir, f"rows-{i:05d}.jsonl"), lines)


def read_manifest(out_dir: str) -> dict:
  return files.read_described(os.path.join(out_dir, "manifest.json"), FORMAT, "embeddings",
                              "python -m vlm_jax.embed")


def read(out_dir: str, kind: str) -> tuple[np.ndarray, list, dict]:
  """(vectors float32 [N, D], one row dict per vector, the manifest) of a finished embedding
  folder. Image rows: {id, captions}; caption rows: {id: '<image id>#<j>', image, caption}."""
  manifest = read_manifest(out_dir)
  if kind not in manifest["what"]:
    raise ValueError(f"embeddings: {out_dir} holds {', '.join(manifest['what'])}, not {kind}")
  if not manifest.get("complete"):
    total = manifest.get("num_shards") or math.ceil(manifest["num_examples"] /
                                                    manifest["shard_size"])
    raise ValueError(f"embeddings: {out_dir} is unfinished ({len(manifest['shards'])} of "
                     f"{total} shards); run the same `vlm_jax.embed` command again to finish it")
  vectors, rows = [], []
  for i in sorted(manifest["shards"], key=int):
    i = int(i)
    array = np.load(os.path.join(out_dir, f"{kind}-{i:05d}.npy"), allow_pickle=False)
    with open(os.path.join(out_dir, f"rows-{i:05d}.jsonl")) as f:
      images = [json.loads(line) for line in f]
    if kind == "images":
      shard_rows = [{"id": r["key"], "captions": r["captions"]} for r in images]
    else:
      shard_rows = [{"id": f"{r['key']}#{j}", "image": r["key"], "caption": c}
                    for r in images for j, c in enumerate(r["captions"])]
    if len(shard_rows) != array.shape[0]:
      raise ValueError(f"embeddings: {out_dir} shard {i}: {array.shape[0]} {kind} vectors but "
                       f"{len(shard_rows)} rows")
    vectors.append(array)
    rows.extend(shard_rows)
  dim = int(manifest["model"]["embed_dim"])
  return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), rows, manifest


# ---- command line -------------------------------------------------------------------------------

_FLAGS = {}


def define_flags():
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run (or converted model) directory.")
  _FLAGS["out"] = flags.DEFINE_string("out", None, "Output folder (continued if it holds an "
                                      "unfinished run with the same settings).")
  _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  _FLAGS["split"] = flags.DEFINE_enum("split", "eval", ["eval", "train"], "Which split to read.")
  _FLAGS["what"] = flags.DEFINE_list("what", list(KINDS), "images and/or texts.")
  _FLAGS["shard_size"] = flags.DEFINE_integer("shard_size", 4096, "Images per output shard "
                                              "(tar shards: one output shard per tar file).")
  _FLAGS["max_captions"] = flags.DEFINE_integer("max_captions", 5, "Captions per image.")
  _FLAGS["batch_size"] = flags.DEFINE_integer("batch_size", None,
                                              "Global batch (default: evals.batch_size).")
  _FLAGS["max_shards"] = flags.DEFINE_integer("max_shards", None,
                                              "Stop after this many shards.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.start()
  try:
    loc = inference.locate(_FLAGS["workdir"].value, _FLAGS["step"].value)
    config = cli.load_config(saved=inference.load_config(loc))
    from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
    runtime.prepare_data(config)        # the embedded shapes data, if the cache lacks it
    model = inference.load(_FLAGS["workdir"].value, loc.step, config=config)
    manifest = embed(model, split_data_config(config, _FLAGS["split"].value),
                     _FLAGS["out"].value, what=_FLAGS["what"].value,
                     shard_size=_FLAGS["shard_size"].value,
                     max_captions=_FLAGS["max_captions"].value,
                     batch_size=_FLAGS["batch_size"].value, max_shards=_FLAGS["max_shards"].value,
                     progress=bool(config.get("progress_bar", True)))
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    cli.fail(e)
  if jax.process_index() == 0:
    counts = {k: sum(s[k] for s in manifest["shards"].values()) for k in manifest["what"]}
    sys.stdout.flush()
    print(json.dumps({"out": os.path.abspath(_FLAGS["out"].value),
                      "complete": manifest["complete"], "shards": len(manifest["shards"]),
                      "skipped": sum(manifest["skipped"].values()), **counts}), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
