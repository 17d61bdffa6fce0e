"""TFDS datasets by name: random access through `tfds.data_source` (array_record) or sequential
through `builder.as_dataset` (TFRecord)."""
import dataclasses
import logging

import numpy as np

from vlm_jax.data import cache
from vlm_jax.data.sources import common


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
  questions_key: str | None = None   # a Sequence of VQAv2-style question dicts (shapes: 'questions')


def _prepare_hint(name) -> str:
  if cache.is_embedded(name):
    config = name.split("/")[1].split(":")[0] if "/" in name else "tiny"
    return ("the trainer and `vlm_jax.evaluate` build it; by hand: python -c 'from vlm_jax.data "
            f"import shapes; shapes.prepare(\"{config}\")'")
  return f"prepare it first (e.g. `tfds build {name} --data_dir=...`)"


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
    if cache.is_embedded(name):
      from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top,unused-import
    data_dir = cache.tfds_data_dir(name, data_dir)
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
    if fields.questions_key:
      self._paths["questions"] = _resolve_feature_path(features, fields.questions_key,
                                                       "questions_key")
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
                                f"prepared in data_dir={data_dir!r}; {_prepare_hint(name)}: "
                                f"{e}") from e
    if self._data_source is None and not self._builder.is_prepared():
      raise FileNotFoundError(f"data.name: TFDS dataset {name!r} is not prepared in data_dir="
                              f"{data_dir!r}; {_prepare_hint(name)}")
    self.random_access = self._data_source is not None
    self.provides = frozenset(f for f, path in ((common.CAPTIONS, "text"), (common.LABEL, "label"),
                                                (common.QUESTIONS, "questions"))
                              if path in self._paths)

  def describe(self):
    return f"TFDS dataset {self.name!r} split {self.split!r} (data_dir={self.data_dir!r})"

  def class_names(self):
    """The names of a ClassLabel label feature, else None."""
    if "label" not in self._paths:
      return None
    feature = _lookup(self._builder.info.features, self._paths["label"])
    return list(getattr(feature, "names", None) or []) or None

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
    raw = {"image": image, "captions": captions, "label": label, "key": key}
    if "questions" in self._paths:
      raw["questions"] = common.questions_from_columns(_lookup(record, self._paths["questions"]))
    return raw

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
      return common.error("unreadable_record", key)
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
