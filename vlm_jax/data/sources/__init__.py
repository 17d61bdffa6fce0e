"""Sources of raw examples: TFDS by name, WebDataset-style tar shards, captions.jsonl, ImageFolder.

Every source produces *raw* examples, plain dicts

    {"image": bytes | np.ndarray (uint8) | None, "captions": list[str | bytes] | None,
     "label": int, "key": str}

that the pipeline (`vlm_jax.data.pipeline`) decodes, augments and turns into batch fields with the
task's field ops (`vlm_jax.data.ops`). Sources do not judge the data: an unreadable file becomes
an example with an `"error"` field (a short reason such as `"unreadable_image"`) so that the
pipeline can skip, count and log it in one place. `key` names the file and record so that a log
line leads straight to the bad sample.

Every source says which raw fields it provides (`provides`: 'captions', 'label'), describes
itself for error messages (`describe()`), and gives its class names when it knows them
(`class_names()`). `check_fields` compares that with what the field ops need, before anything is
compiled.

Two kinds of sources, because the storage formats allow different things:

* Random access (`len()` and `source[i]`): TFDS stored as array_record (`tfds.data_source`),
  captions.jsonl and ImageFolder. The pipeline reads these with grain, whose iterator position
  is one integer, so shuffling is global and resuming is exact and O(1).
* Sequential (`iterate(position)`): tar shards, and TFDS stored as TFRecord (the `tfds.load`
  path). A position is `{"epoch", "group", "offset"}`; see `WdsSource` for how tar shards are
  made exactly resumable. The TFRecord path resumes by re-reading and discarding `offset`
  examples (exact, but O(offset)).
"""
from vlm_jax.data.sources.common import CAPTIONS, LABEL, QUESTIONS, DataLacks, even_share
from vlm_jax.data.sources.imagefolder import ImageFolderSource
from vlm_jax.data.sources.jsonl import JsonlSource
from vlm_jax.data.sources.text import TextSource
from vlm_jax.data.sources.tfds import FieldMap, TfdsSource
from vlm_jax.data.sources.vqav2 import Vqav2Source
from vlm_jax.data.sources.wds import (WdsSource, expand_braces, index_shard, list_shards,
                                      read_tar_sample)

KINDS = ("tfds", "wds", "jsonl", "imagefolder", "vqav2", "text")


def make_source(data_config, split_name):
  """The source for `split_name` in {'train', 'eval'} from `config.data` (or an eval entry's
  data config); for training with `data.mixture`, the weighted mixture of its entries."""
  if split_name == "train" and data_config.get("mixture"):
    from vlm_jax.data.sources import mixture  # pylint: disable=g-import-not-at-top
    parts = mixture.entries(data_config)
    components = [make_source(mixture.component_config(data_config, entry), "train")
                  for entry, _ in parts]
    return mixture.MixtureSource(components, [w for _, w in parts],
                                 [f"data.mixture[{i}]" for i in range(len(parts))])
  kind = data_config.source
  if kind == "tfds":
    split = data_config.train_split if split_name == "train" else data_config.eval_split
    fields = FieldMap(image_key=data_config.image_key, text_key=data_config.text_key or None,
                      label_key=data_config.label_key or None, id_key=data_config.id_key or None,
                      questions_key=data_config.get("questions_key") or None)
    return TfdsSource(data_config.name, split, data_dir=data_config.data_dir, fields=fields,
                      reader=data_config.tfds_reader, skip_decode=data_config.tfds_skip_decode)
  if kind == "wds":
    field = f"data.{split_name}_shards"
    return WdsSource(data_config.get(f"{split_name}_shards"), field=field,
                     group_size=data_config.shard_group)
  if kind == "jsonl":
    path = data_config.get(f"{split_name}_jsonl")
    if not path:
      raise ValueError(f"data.{split_name}_jsonl: no captions.jsonl path given")
    return JsonlSource(path, image_root=data_config.image_root)
  if kind == "imagefolder":
    field = f"data.{split_name}_folder"
    names = [n.strip() for n in (data_config.get("classnames") or "").split(",") if n.strip()]
    return ImageFolderSource(data_config.get(f"{split_name}_folder"), field=field,
                             class_names=names or None)
  if kind == "vqav2":
    get = lambda f: data_config.get(f"{split_name}_vqa_{f}")
    if not get("questions") or not get("images"):
      raise ValueError(f"data.{split_name}_vqa_questions / data.{split_name}_vqa_images: the "
                       "VQAv2 questions JSON and image folder must be given")
    return Vqav2Source(get("questions"), get("annotations"), get("images"), field=split_name)
  if kind == "text":
    field = f"data.{split_name}_text"
    return TextSource(data_config.get(f"{split_name}_text"), field=field)
  raise ValueError(f"data.source: unknown source {kind!r}; expected one of {', '.join(KINDS)}")


def captions(source, limit: int, questions: bool = False) -> list:
  """The captions of the first `limit` records in storage order (unreadable records give none),
  from any source: to train a tokenizer on. With `questions`, also the records' questions and
  answers."""
  if getattr(source, "random_access", False):
    records = (source[i] for i in range(min(len(source), limit)))
  else:
    stream = source.iterate({"epoch": 0, "group": 0, "offset": 0}, process_index=0,
                            process_count=1, seed=0, shuffle=False, num_epochs=1)
    records = (raw for n, (raw, _) in zip(range(limit), stream))
  texts = []
  for raw in records:
    texts.extend(raw.get("captions") or [])
    if questions:
      for q in raw.get("questions") or []:
        texts.append(q["question"])
        texts.extend(sorted(set(q["answers"])))
  return texts


def check_fields(source, field_ops, who: str):
  """Fails, naming every missing field, when `source` lacks a raw field an op needs.

  `who` says who needs them in the message, e.g. "task 'classification'".
  """
  missing = [(field, op) for op in field_ops for field in op.requires
             if field not in source.provides]
  if missing:
    parts = [f"{field!r} (for batch field {', '.join(op.provides)})" for field, op in missing]
    raise DataLacks(f"data: {who} needs {'; '.join(parts)}, which {source.describe()} does not "
                     f"provide (it provides: image{''.join(', ' + f for f in sorted(source.provides))})")


__all__ = ["make_source", "captions", "check_fields", "KINDS", "CAPTIONS", "LABEL", "QUESTIONS", "DataLacks", "even_share", "FieldMap",
           "TfdsSource", "Vqav2Source", "JsonlSource", "TextSource", "WdsSource", "ImageFolderSource", "expand_braces",
           "index_shard", "list_shards", "read_tar_sample"]
