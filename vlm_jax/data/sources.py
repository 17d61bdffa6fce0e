"""Sources of raw image-text examples: TFDS by name, WebDataset-style tar shards, captions.jsonl.

Every source produces *raw* examples, plain dicts

    {"image": bytes | np.ndarray (uint8) | None, "captions": list[str | bytes] | None,
     "label": int, "key": str}

that the pipeline (`vlm_jax.data.pipeline`) decodes, augments, tokenizes and batches. Sources do
not judge the data: an unreadable file becomes an example with an `"error"` field (a short reason
such as `"unreadable_image"`) so that the pipeline can skip, count and log it in one place.
`key` names the file and record so that a log line leads straight to the bad sample.
`captions` is None only for a TFDS dataset read without a text field (`text_key=''`, e.g.
cifar10 for zero-shot classification): the pipeline then emits all-pad text.

Two kinds of sources, because the storage formats allow different things:

* Random access (`len()` and `source[i]`): `TfdsSource` over a prepared TFDS dataset stored as
  array_record (`tfds.data_source`), and `JsonlSource`. The pipeline reads these with grain, whose
  iterator position is one integer, so shuffling is global and resuming is exact and O(1).
* Sequential (`iterate(position)`): `WdsSource` over tar shards, and `TfdsSource` over a dataset
  stored as TFRecord (the `tfds.load` path). A position is `{"epoch", "group", "offset"}`; see
  `WdsSource` for how tar shards are made exactly resumable. The TFRecord path resumes by
  re-reading and discarding `offset` examples (exact, but O(offset)).
"""
import dataclasses
import glob
import json
import logging
import os
import re
import tarfile

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_CAPTION_JSON_FIELDS = ("caption", "captions", "text")


def _error(reason, key):
  """A raw example that stands for a record that could not be read."""
  return {"image": None, "captions": [], "label": -1, "key": key, "error": reason}


def even_share(num_examples, process_index, process_count, drop_remainder):
  """[start, end) of this process's contiguous share of `num_examples` records.

  With `drop_remainder` every process gets exactly `num_examples // process_count` records (so
  all processes see the same number of examples per epoch; at most `process_count - 1` records
  are never read); without it the shares differ by at most one and cover every record.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  start = process_index * num_examples // process_count
  if drop_remainder:
    return start, start + num_examples // process_count
  return start, (process_index + 1) * num_examples // process_count


# ------------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------------


def _lookup(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _resolve_feature_path(features, path, field):
  """Splits a '/'-separated feature path into dict keys, preferring the longest existing key.

  TFDS feature names may themselves contain '/' (coco's top-level 'image/filename') while nested
  features are addressed with '/' too ('captions/text'); trying the longest prefix first resolves
  both.
  """
  parts, remaining, node = [], path, features
  while remaining:
    keys = list(node.keys()) if hasattr(node, "keys") else []
    match = None
    for key in sorted(keys, key=len, reverse=True):
      if remaining == key or remaining.startswith(key + "/"):
        match = key
        break
    if match is None:
      raise ValueError(f"data.{field}: feature {path!r} not found; available: {sorted(keys)}")
    parts.append(match)
    remaining = remaining[len(match) + 1:]
    node = node[match]
    if hasattr(node, "feature"):  # tfds.features.Sequence: look inside the element feature
      node = node.feature
  return tuple(parts)


def _as_caption_list(value):
  """Normalises a TFDS text value (str, bytes, np.str_, 0-d or 1-d arrays, lists) to a list."""
  if isinstance(value, (str, bytes)):
    return [value]
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return [value.item()]
  out = []
  for v in value:
    out.extend(_as_caption_list(v))
  return out


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Where the image, caption(s), label and record id live in a source's records."""
  image_key: str = "image"
  text_key: str | None = "captions"  # None: no text (classification-only eval sets)
  label_key: str | None = None
  id_key: str | None = None


class TfdsSource:
  """A prepared TFDS dataset, by name and split.

  reader:
    'data_source'  random access through `tfds.data_source` (needs array_record files); grain
                   reads it with global shuffling and O(1) exact resume.
    'as_dataset'   sequential through `builder.as_dataset` (works for TFRecord); per-process split
                   with `tfds.even_splits`, file + buffer shuffling seeded per epoch, resume by
                   re-reading `offset` examples.
    'auto'         'data_source' when the prepared files allow it, else 'as_dataset'.

  skip_decode: read images still encoded (`SkipDecoding`) when the feature is a
  `tfds.features.Image`, so that the pipeline decodes them (with JPEG draft downscaling, and an
  undecodable image is counted, not fatal). False lets TFDS decode them (uint8 arrays); needed
  under `tfds.testing.mock_data` for datasets with a Sequence-of-dict feature (coco_captions):
  in tfds 4.9.10 the mock draws independent lengths for the dict's fields and fails to encode.
  (`PartialDecoding` would avoid decoding unused features, but the array_record reader of tfds
  4.9.10 does not accept it.)
  """

  def __init__(self, name, split, *, data_dir=None, fields=FieldMap(), reader="auto",
               skip_decode=True):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if name.split("/")[0].split(":")[0] == "shapes":
      from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top,unused-import
    if reader not in ("auto", "data_source", "as_dataset"):
      raise ValueError(f"data.tfds_reader: unknown reader {reader!r}; expected auto, data_source "
                       "or as_dataset")
    self.name, self.split, self.data_dir, self.fields = name, split, data_dir, fields
    try:
      self._builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends: name it and where we looked.
      raise FileNotFoundError(f"data.name: TFDS dataset {name!r} not found (data_dir="
                              f"{data_dir!r}): {e}") from e
    features = self._builder.info.features
    self._paths = {"image": _resolve_feature_path(features, fields.image_key, "image_key")}
    if fields.text_key:
      self._paths["text"] = _resolve_feature_path(features, fields.text_key, "text_key")
    if fields.label_key:
      self._paths["label"] = _resolve_feature_path(features, fields.label_key, "label_key")
    if fields.id_key:
      self._paths["id"] = _resolve_feature_path(features, fields.id_key, "id_key")
    image_feature = _lookup(features, self._paths["image"])
    self._decoders = None
    if skip_decode and isinstance(image_feature, tfds.features.Image):
      self._decoders = node = {}
      for part in self._paths["image"][:-1]:
        node = node.setdefault(part, {})
      node[self._paths["image"][-1]] = tfds.decode.SkipDecoding()
    self._data_source = None
    if reader in ("auto", "data_source"):
      try:
        self._data_source = tfds.data_source(name, split=split, data_dir=data_dir,
                                              download=False, decoders=self._decoders)
      except NotImplementedError as e:  # not in a random-access format (or not prepared)
        if reader == "data_source" and self._builder.is_prepared():
          raise ValueError(f"data.tfds_reader='data_source': {name!r} in data_dir={data_dir!r} "
                           f"has no array_record files; use 'as_dataset' or re-prepare with "
                           f"file_format='array_record': {e}") from e
      except Exception as e:  # pylint: disable=broad-except
        raise FileNotFoundError(f"data.name: TFDS dataset {name!r} split {split!r} is not "
                                f"prepared in data_dir={data_dir!r}; prepare it first (e.g. "
                                f"`tfds build {name} --data_dir=...`): {e}") from e
    if self._data_source is None and not self._builder.is_prepared():
      raise FileNotFoundError(f"data.name: TFDS dataset {name!r} is not prepared in data_dir="
                              f"{data_dir!r}; prepare it first (e.g. `tfds build {name}`)")
    self.random_access = self._data_source is not None

  # -- shared ------------------------------------------------------------------------------------
  def _to_raw(self, record, key):
    image = _lookup(record, self._paths["image"])
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()
    captions = (_as_caption_list(_lookup(record, self._paths["text"]))
                if "text" in self._paths else None)
    label = int(_lookup(record, self._paths["label"])) if "label" in self._paths else -1
    if "id" in self._paths:
      ident = _lookup(record, self._paths["id"])
      ident = ident.item() if isinstance(ident, np.ndarray) else ident
      ident = ident.decode("utf-8", "replace") if isinstance(ident, bytes) else str(ident)
      key = f"{self.name}/{self.split}/{ident}"
    return {"image": image, "captions": captions, "label": label, "key": key}

  # -- random access -----------------------------------------------------------------------------
  def __len__(self):
    if self._data_source is None:
      return self.num_examples(self.split)
    return len(self._data_source)

  def __getitem__(self, index):
    key = f"{self.name}/{self.split}[{index}]"
    try:
      record = self._data_source[index]
    except Exception as e:  # pylint: disable=broad-except
      logging.debug("unreadable record %s: %s", key, e)
      return _error("unreadable_record", key)
    return self._to_raw(record, key)

  # -- sequential --------------------------------------------------------------------------------
  def num_examples(self, split):
    return self._builder.info.splits[split].num_examples

  def process_split(self, process_index, process_count, drop_remainder):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.even_splits(self.split, n=process_count,
                            drop_remainder=drop_remainder)[process_index]

  def iterate(self, position, *, process_index, process_count, seed, shuffle,
              shuffle_buffer=10_000, num_epochs=None):
    """Yields (raw example, position after it) from `position` = {'epoch', 'group', 'offset'}."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    split = self.process_split(process_index, process_count, drop_remainder=shuffle)
    epoch, offset = position["epoch"], position["offset"]
    while num_epochs is None or epoch < num_epochs:
      read_config = tfds.ReadConfig(shuffle_seed=seed + epoch, add_tfds_id=True)
      ds = self._builder.as_dataset(split=split, shuffle_files=shuffle, decoders=self._decoders,
                                    read_config=read_config)
      if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed + epoch)
      ds = ds.skip(offset)  # exact resume: the order above is a function of (seed, epoch) only
      options = tf.data.Options()
      options.deterministic = True
      for record in ds.with_options(options).as_numpy_iterator():
        offset += 1
        raw = self._to_raw(record, f"{self.name}/{record['tfds_id'].decode()}")
        yield raw, {"epoch": epoch, "group": 0, "offset": offset}
      epoch, offset = epoch + 1, 0

  def eval_share_sizes(self, process_count):
    return [self._builder.info.splits[s].num_examples
            for s in self._sequential_splits(process_count)]

  def _sequential_splits(self, process_count):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.even_splits(self.split, n=process_count, drop_remainder=False)


# ------------------------------------------------------------------------------------------------
# captions.jsonl + image folder
# ------------------------------------------------------------------------------------------------


class JsonlSource:
  """`captions.jsonl` lines `{"image": path, "caption": str | [str], "label": int (optional)}`.

  Image paths are relative to `image_root` (default: the jsonl's folder). Random access; images are
  read lazily, so a missing or unreadable file becomes an error example, not a crash. A line that
  is not valid JSON or lacks "image" fails fast at construction (it is a broken index, not bad
  data).
  """

  def __init__(self, path, image_root=None):
    if not os.path.exists(path):
      raise FileNotFoundError(f"data.jsonl: captions file {path!r} does not exist")
    self.path = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    self._records = []
    with open(path, "rb") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          image = record["image"]
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{lineno}: expected a JSON object with an 'image' field: "
                           f"{e}") from e
        caption = record.get("caption", record.get("captions", []))
        captions = [caption] if isinstance(caption, str) else list(caption)
        self._records.append((image, captions, int(record.get("label", -1)), lineno))
    self.random_access = True

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    image, captions, label, lineno = self._records[index]
    key = f"{os.path.basename(self.path)}:{lineno}:{image}"
    try:
      with open(os.path.join(self.image_root, image), "rb") as f:
        data = f.read()
    except OSError:
      return _error("unreadable_image", key)
    return {"image": data, "captions": captions, "label": label, "key": key}


# ------------------------------------------------------------------------------------------------
# WebDataset-style tar shards
# ------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern):
  """'a/{00000..00002}.tar' -> ['a/00000.tar', 'a/00001.tar', 'a/00002.tar']; also '{x,y}'."""
  match = _BRACE.search(pattern)
  if not match:
    return [pattern]
  body = match.group(1)
  head, tail = pattern[:match.start()], pattern[match.end():]
  range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if range_match:
    lo, hi = range_match.groups()
    width = len(lo) if lo.startswith("0") else 0
    items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    items = body.split(",")
  return [p for item in items for p in expand_braces(head + item + tail)]


def list_shards(pattern, field="data.train_shards"):
  """Shard files for a brace and/or glob pattern, sorted; fails fast on no match / missing files."""
  if not pattern:
    raise ValueError(f"{field}: no shard pattern given")
  files, missing = [], []
  for p in expand_braces(pattern):
    if glob.has_magic(p):
      files.extend(sorted(glob.glob(p)))
    elif os.path.exists(p):
      files.append(p)
    else:
      missing.append(p)
  if missing:
    raise FileNotFoundError(f"{field}: {len(missing)} shard(s) of {pattern!r} do not exist, "
                            f"e.g. {missing[:3]}")
  if not files:
    raise FileNotFoundError(f"{field}: no files match {pattern!r}")
  return files


def _split_member_name(name):
  """WebDataset convention: key = path up to the first '.' of the basename; ext = the rest."""
  dirname, base = os.path.split(name)
  if "." not in base:
    return None, None
  stem, ext = base.split(".", 1)
  return os.path.join(dirname, stem), ext.lower()


@dataclasses.dataclass
class ShardIndex:
  """Byte ranges of each sample's files in one tar shard, from one pass over its headers."""
  path: str
  samples: list  # [(key, {ext: (offset, size)})] in file order
  truncated: bool


def index_shard(path):
  """Scans a tar's headers (seeking over the data). A damaged tail is cut at the last complete
  sample: everything from the point of damage on is dropped and `truncated` is set."""
  samples, current_key, current, truncated = [], None, {}, False
  file_size = os.path.getsize(path)
  try:
    with tarfile.open(path, "r:") as tar:
      while True:
        member = tar.next()
        if member is None:
          break
        if member.offset_data + member.size > file_size:
          truncated = True
          # The open sample is complete when the damaged file starts a new one.
          if _split_member_name(member.name)[0] != current_key and current_key is not None:
            samples.append((current_key, current))
            current_key = None
          break
        if not member.isfile():
          continue
        key, ext = _split_member_name(member.name)
        if key is None:
          continue
        if key != current_key:
          if current_key is not None:
            samples.append((current_key, current))
          current_key, current = key, {}
        current[ext] = (member.offset_data, member.size)
      # A complete archive ends with two zero blocks; missing ones mean the tail was cut
      # exactly at a member boundary.
      if not truncated and tar.offset + 2 * tarfile.BLOCKSIZE > file_size:
        truncated = True
  except (tarfile.TarError, EOFError, OSError) as e:
    logging.debug("tar read error in %s: %s", path, e)
    truncated = True
  if current_key is not None and not truncated:
    samples.append((current_key, current))
  # Otherwise, when truncated, the open sample may be missing files: it goes with the rest.
  return ShardIndex(path, samples, truncated)


def read_tar_sample(path, key, files):
  """Raw example for one indexed sample; missing parts become error examples."""
  full_key = f"{os.path.basename(path)}/{key}"
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
  if image_ext is None:
    return _error("missing_image", full_key)
  try:
    with open(path, "rb") as f:
      def read(ext):
        offset, size = files[ext]
        f.seek(offset)
        return f.read(size)
      image = read(image_ext)
      captions = None
      if "txt" in files:
        captions = [read("txt")]
      elif "json" in files:
        try:
          meta = json.loads(read("json"))
        except ValueError:
          return _error("bad_caption_json", full_key)
        for field in _CAPTION_JSON_FIELDS:
          if isinstance(meta, dict) and field in meta:
            value = meta[field]
            captions = [value] if isinstance(value, str) else list(value)
            break
      label = -1
      if "cls" in files:
        try:
          label = int(read("cls").strip())
        except ValueError:
          pass
  except OSError:
    return _error("unreadable_image", full_key)
  if captions is None:
    return _error("missing_caption", full_key)
  return {"image": image, "captions": captions, "label": label, "key": full_key}


class WdsSource:
  """WebDataset-style tar shards (`key.jpg|jpeg|png|webp` + `key.txt` or `key.json` with
  "caption"; optional `key.cls` label), the layout img2dataset writes.

  Exact resume without replaying data: each process takes every `process_count`-th shard
  (shards, not samples, are split, so each file is read by one process). Per epoch the process's
  shards are permuted with rng(seed, epoch) and cut into groups of `group_size` shards; a group's
  samples are indexed (one pass over the tar headers, no image bytes read) and permuted with
  rng(seed, epoch, group). The read order is therefore a pure function of (seed, epoch, group,
  offset) and a position `{"epoch", "group", "offset"}` restores it by seeking. `group_size`
  trades shuffle quality (samples from that many shards mix) against index memory.

  A truncated shard contributes its samples up to the damage and one `truncated_shard` error
  example at the start of its group (so it is counted once per epoch).
  """

  def __init__(self, pattern, *, field="data.train_shards", group_size=4):
    self.shards = list_shards(pattern, field)
    self.field = field
    self.group_size = max(1, int(group_size))
    self.random_access = False
    self._cache = {}

  def _index(self, path):
    if path not in self._cache:
      if len(self._cache) >= 4 * self.group_size:
        self._cache.pop(next(iter(self._cache)))
      self._cache[path] = index_shard(path)
    return self._cache[path]

  def process_shards(self, process_index, process_count, require_all=True):
    shards = self.shards[process_index::process_count]
    if require_all and len(self.shards) < process_count:
      raise ValueError(f"{self.field}: {len(self.shards)} shard(s) for {process_count} processes; "
                       "every process needs at least one shard file")
    return shards

  def _group_entries(self, shards):
    """[(path, key or None, files or None)]; a None key marks a truncated shard."""
    entries, markers = [], []
    for path in shards:
      index = self._index(path)
      if index.truncated:
        markers.append((path, None, None))
      entries.extend((path, key, files) for key, files in index.samples)
    return markers, entries

  def iterate(self, position, *, process_index, process_count, seed, shuffle, num_epochs=None):
    """Yields (raw example, position after it), starting at `position`."""
    shards = self.process_shards(process_index, process_count, require_all=shuffle)
    if not shards:
      return
    epoch, group, offset = position["epoch"], position["group"], position["offset"]
    while num_epochs is None or epoch < num_epochs:
      order = list(shards)
      if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
      groups = [order[i:i + self.group_size] for i in range(0, len(order), self.group_size)]
      for g in range(group, len(groups)):
        markers, entries = self._group_entries(groups[g])
        if shuffle:
          perm = np.random.default_rng([seed, epoch, g]).permutation(len(entries))
          entries = [entries[i] for i in perm]
        entries = markers + entries
        for i in range(offset, len(entries)):
          path, key, files = entries[i]
          if key is None:
            logging.warning("truncated tar shard %s: samples after the damage are skipped", path)
            raw = _error("truncated_shard", os.path.basename(path))
          else:
            raw = read_tar_sample(path, key, files)
          yield raw, {"epoch": epoch, "group": g, "offset": i + 1}
        offset = 0
      epoch, group = epoch + 1, 0

  def eval_share_sizes(self, process_count):
    """Entries (samples + truncation markers) each process reads in one unshuffled pass."""
    sizes = []
    for p in range(process_count):
      total = 0
      for path in self.shards[p::process_count]:
        index = self._index(path)
        total += len(index.samples) + int(index.truncated)
      sizes.append(total)
    return sizes


def make_source(data_config, split_name):
  """The source for `split_name` in {'train', 'eval'} from a data config (see configs.common)."""
  kind = data_config.source
  if kind == "tfds":
    split = data_config.train_split if split_name == "train" else data_config.eval_split
    fields = FieldMap(image_key=data_config.image_key, text_key=data_config.text_key or None,
                      label_key=data_config.label_key or None, id_key=data_config.id_key or None)
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
  raise ValueError(f"data.source: unknown source {kind!r}; expected tfds, wds or jsonl")
