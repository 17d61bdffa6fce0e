"""Input pipeline: raw examples -> decoded, augmented, normalised per-process batches of named fields.

    source (vlm_jax.data.sources) -> decode -> crop/resize -> normalise -> field ops -> batch

Batches are dicts of numpy arrays: always
  image  float32 [B, H, W, 3] normalised with data.mean / data.std
  mask   bool [B]     False for padding examples (the tail of an eval split)
plus whatever the field ops (`vlm_jax.data.ops`) of the task or evaluator produce, e.g.
  text   int32 [B, L]  bos ... eos pad ...            (ops.Caption)
  label  int32 [B]     -1 where the source has none   (ops.Label)
  captions / captions_mask  int32 [B, K, L] / bool [B, K]   (ops.AllCaptions)

Why grain. Random-access sources (TFDS array_record via `tfds.data_source`, captions.jsonl,
ImageFolder) are read with `grain.MapDataset`: the read order is a pure function of
(seed, position), so the iterator's state is one small dict, a restored iterator yields exactly
the batches an uninterrupted one would have, and per-example randomness (crop, caption choice) is
derived from (seed, position) too. Tar shards and TFRecord-only TFDS datasets cannot be indexed
globally, so a small threaded reader walks them in an order that is a pure function of
(seed, epoch, group, offset) (see `sources.WdsSource`), with the same guarantees.

Elastic resume (random-access sources). Training reads ONE global order: position g of the
epoch-wise shuffled, repeated dataset, preprocessed with randomness seeded by g; process p of P
reads positions start + p, start + p + P, ... A checkpoint stores every process's count of
positions read, which together name exactly the set of global positions consumed. Resuming on
P' processes (`elastic_state`) starts the new shares at the first position nobody read and
passes silently over the few beyond it that some process already read (processes drift apart
only by the bad examples they skipped), so across any sequence of process counts every example
of an epoch is read exactly once. Tar shards and TFRecord-only TFDS datasets are read per
process (shards are assigned to processes), so they resume on the same process count only.

Bad data (an undecodable image, no usable caption, a missing label where one is required, a
truncated tar shard, an unreadable file) is skipped, never replaced: the batch is filled with the
next good examples. Each skip is counted by reason (`DataIterator.skipped_counts()`, also part
of the iterator state so resumed counts continue) and logged once per sample with its file and
key.
"""
import collections
import concurrent.futures
import io
import json
import logging
import math

import grain
import numpy as np
from PIL import Image

from vlm_jax.data import openai_preprocess
from vlm_jax.data import sources as sources_lib
from vlm_jax.data.ops import BadExample

_STATE_VERSION = 1
TRAIN_CROPS = ("random_resized", "resize")
EVAL_CROPS = ("center", "openai", "resize")
_MAX_LOGGED_KEYS = 1000


# ------------------------------------------------------------------------------------------------
# Per-example processing
# ------------------------------------------------------------------------------------------------


def _open_image(data, target_size, min_side_fraction):
  """Decodes `data` (encoded bytes or a uint8 array) to an RGB PIL image.

  For JPEGs, `draft` lets the decoder downscale by 2/4/8 while decoding, keeping at least
  `target_size / min_side_fraction` pixels on the side a crop will be taken from; this is most of
  the speed-up for large photos.
  """
  if data is None:
    raise BadExample("missing_image")
  try:
    if isinstance(data, np.ndarray):
      arr = data
      if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise BadExample("bad_image_array")
      if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
      img = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)
    else:
      img = Image.open(io.BytesIO(data))
      w, h = img.size
      f = min(1.0, target_size / (min_side_fraction * min(w, h)))
      img.draft("RGB", (max(1, math.ceil(w * f)), max(1, math.ceil(h * f))))
    img = img.convert("RGB")  # forces the full decode: truncated data fails here
  except BadExample:
    raise
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
    raise BadExample("undecodable_image") from e
  if min(img.size) < 1:
    raise BadExample("undecodable_image")
  return img


def _random_resized_box(w, h, rng, min_scale, max_scale, log_ratio=(math.log(3 / 4),
                                                                    math.log(4 / 3))):
  """Inception-style crop box: area fraction in [min_scale, max_scale], aspect in [3/4, 4/3]."""
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(min_scale, max_scale)
    ratio = math.exp(rng.uniform(*log_ratio))
    cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      return (x, y, x + cw, y + ch)
  return _center_box(w, h)


def _center_box(w, h):
  side = min(w, h)
  x, y = (w - side) // 2, (h - side) // 2
  return (x, y, x + side, y + side)


class Preprocess:
  """raw example -> normalised image + the field ops' values (or a skip marker); `collate`
  stacks a batch. Picklable, for grain worker processes."""

  def __init__(self, data_config, field_ops, train, images: bool = True):
    self.train, self.images = train, images
    self.ops = list(field_ops)
    self.size = int(data_config.image_size)
    self.mean = np.asarray(data_config.mean, np.float32).reshape(1, 1, 3)
    self.inv_std = 1.0 / np.asarray(data_config.std, np.float32).reshape(1, 1, 3)
    if train:
      self.crop = data_config.train_crop
      if self.crop not in TRAIN_CROPS:
        raise ValueError(f"data.train_crop: unknown crop {self.crop!r}; expected one of "
                         f"{', '.join(TRAIN_CROPS)}")
    else:
      # 'center': central square, then resize. 'openai': bicubic resize of the short side, then
      # centre crop, as OpenAI's CLIP transform (for imported weights; pixel-exact with theirs).
      # 'resize': the whole image to a square, no crop (SigLIP's evaluation transform).
      self.crop = data_config.eval_crop
      if self.crop not in EVAL_CROPS:
        raise ValueError(f"data.eval_crop: unknown crop {self.crop!r}; expected one of "
                         f"{', '.join(EVAL_CROPS)}")
    self.min_scale, self.max_scale = float(data_config.min_scale), float(data_config.max_scale)
    if not 0 < self.min_scale <= self.max_scale <= 1:
      raise ValueError(f"data.min_scale/max_scale: need 0 < {self.min_scale} <= "
                       f"{self.max_scale} <= 1")

  def _image(self, data, rng):
    if self.crop == "openai":
      # Decoded in full (no JPEG draft downscaling), as OpenAI's transform sees it.
      img = openai_preprocess.resize_and_center_crop(_open_image(data, float("inf"), 1.0),
                                                     self.size)
      x = np.asarray(img, np.float32) * np.float32(1 / 255)
      return (x - self.mean) * self.inv_std
    if self.crop == "random_resized":
      # The smallest crop side is about sqrt(min_scale * 3/4) of the image's.
      img = _open_image(data, self.size, math.sqrt(self.min_scale * 0.75))
      box = _random_resized_box(*img.size, rng, self.min_scale, self.max_scale)
    elif self.crop == "resize":
      img = _open_image(data, self.size, 1.0)
      box = (0, 0) + img.size
    else:
      img = _open_image(data, self.size, 1.0)
      box = _center_box(*img.size)
    img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
    x = np.asarray(img, np.float32) * np.float32(1 / 255)
    return (x - self.mean) * self.inv_std

  def template(self):
    """A padding example (mask=False) with this preprocessing's shapes and dtypes."""
    out = {"mask": np.bool_(False)}
    if self.images:
      out["image"] = np.zeros((self.size, self.size, 3), np.float32)
    for op in self.ops:
      out.update(op.padding())
    return out

  def __call__(self, raw, rng=None):
    key = raw.get("key", "?")
    if raw.get("error"):
      return {"_skip": raw["error"], "_key": key, "_lost": int(raw.get("lost", 0))}
    try:
      out = {"mask": np.bool_(True)}
      if self.images:
        out["image"] = self._image(raw["image"], rng)
      for op in self.ops:
        out.update(op(raw, rng, self.train))
    except BadExample as e:
      return {"_skip": e.reason, "_key": key}
    return out

  def collate(self, examples):
    """Stacks examples into a batch; each op collates its own fields."""
    batch = {k: np.stack([e[k] for e in examples])
             for k in (("image", "mask") if self.images else ("mask",))}
    for op in self.ops:
      batch.update(op.collate(examples))
    return batch


# ------------------------------------------------------------------------------------------------
# Element streams (processed examples in a deterministic order, with a resumable position)
# ------------------------------------------------------------------------------------------------


_CONSUMED = {"_consumed": True}    # a position read before an elastic resume: passed over


_LAYOUT_KEYS = ("start", "exclude", "process_count")


def positions_read(state: dict) -> int:
  """How many positions of its share a stream handed out, from grain's iterator state: one
  reader's `next_index`, or the sum over grain's worker processes (which take the share's
  positions in turn, so what they handed out is a prefix)."""
  if "next_index" in state:
    return int(state["next_index"])
  if "iterators_in_use_states" in state:
    return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
  raise ValueError(f"data: unrecognised iterator state {sorted(state)}")


class _GlobalOrderStream:
  """A process's share of the global training order (see the module docstring): positions
  start + process_index + k * process_count, those in `exclude` passed over. Its state is
  grain's iterator state plus the layout ('start', 'exclude', 'process_count')."""

  def __init__(self, global_ds, data, process_index, process_count, start=0, exclude=()):
    self._global_ds, self._data = global_ds, data
    self._pi, self._pc = process_index, process_count
    self._build(start, exclude)

  def _build(self, start, exclude):
    self._start, self._exclude = int(start), sorted(int(g) for g in exclude)
    first, step, skip = self._start + self._pi, self._pc, frozenset(self._exclude)
    ds = self._global_ds[first::step]
    if skip:
      ds = ds.map_with_index(lambda k, x: _CONSUMED if first + k * step in skip else x)
    self._stream = _GrainStream(_to_iter(ds, self._data))

  def __next__(self):
    return next(self._stream)

  def get_state(self):
    return {**self._stream.get_state(), "start": self._start, "exclude": list(self._exclude),
            "process_count": self._pc}

  def set_state(self, state):
    start, exclude = state.get("start", 0), state.get("exclude", [])
    if (int(start), sorted(exclude)) != (self._start, self._exclude):
      self._build(start, exclude)
    grain_state = {k: v for k, v in state.items() if k not in _LAYOUT_KEYS}
    if grain_state:      # none: a fresh layout (elastic resume), read from its beginning
      self._stream.set_state(grain_state)

  def close(self):
    self._stream.close()


def elastic_state(per_process: list, process_index: int, process_count: int) -> dict:
  """This process's iterator state for resuming on `process_count` processes the training that
  the old processes' states `per_process` (all of them, in process order) describe.

  The old processes consumed global positions start + p + k * P for k < n_p (plus `exclude`).
  Every position below start + P * min(n) is consumed; beyond it only a few are (the processes
  that read further), so the new start is the first unconsumed position and the new `exclude`
  the consumed ones after it: nothing read twice, nothing skipped. Raises ValueError for
  sequential sources, whose positions are per-process shard offsets."""
  streams = [s["stream"] for s in per_process]
  if any("offset" in s for s in streams):
    raise ValueError(
        f"data: the checkpoint was written by {len(per_process)} process(es) reading tar shards "
        f"(or TFRecord TFDS), which are assigned to processes; it resumes on {len(per_process)} "
        f"process(es) only, not {process_count}. Random-access sources (TFDS array_record, "
        "jsonl, imagefolder) resume on any number")
  old_count = len(streams)
  start = int(streams[0].get("start", 0))
  counts = [positions_read(s) for s in streams]
  base = start + old_count * min(counts)
  consumed = {g for g in (int(x) for s in streams for x in s.get("exclude", [])) if g >= base}
  for p, n in enumerate(counts):
    consumed.update(start + p + k * old_count for k in range(min(counts), n))
  new_start = base
  while new_start in consumed:
    new_start += 1
  skipped: dict = collections.Counter()
  if process_index == 0:     # the totals carry over once, on the first process
    for s in per_process:
      skipped.update(s.get("skipped", {}))
  return {"version": _STATE_VERSION,
          "stream": {"start": new_start,
                     "exclude": sorted(g for g in consumed if g > new_start),
                     "process_count": process_count},
          "batches": max(int(s.get("batches", 0)) for s in per_process),
          "skipped": dict(skipped)}


def resume_state(per_process: list, process_index: int, process_count: int) -> dict:
  """This process's iterator state from a checkpoint's per-process states: its own on the same
  process count, else `elastic_state`."""
  if len(per_process) == process_count:
    return per_process[process_index]
  return elastic_state(per_process, process_index, process_count)


class _GrainStream:
  """Processed examples from a grain dataset; position = grain's iterator state."""

  def __init__(self, dataset):
    self._it = iter(dataset)

  def __next__(self):
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)

  def close(self):
    pass


class _SequentialStream:
  """Processed examples from a sequential source (tar shards, TFRecord TFDS).

  Reading stays in this thread (it is cheap: seeks and small reads); decoding runs on a thread
  pool `ahead` examples in advance. Each element carries the source position after it, so the
  stream's state is the position after the last element handed out, never past it.
  """

  def __init__(self, source, preprocess, *, process_index, process_count, seed, shuffle,
               num_epochs, threads, ahead=64):
    self._source, self._preprocess = source, preprocess
    self._kwargs = dict(process_index=process_index, process_count=process_count, seed=seed,
                        shuffle=shuffle, num_epochs=num_epochs)
    self._seed = seed
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
    self._ahead = max(1, ahead)
    self._start({"epoch": 0, "group": 0, "offset": 0})

  def _start(self, position):
    self._position = dict(position)
    self._raw = self._source.iterate(dict(position), **self._kwargs)
    self._pending = collections.deque()

  def _process(self, raw, position):
    # Per-example randomness is a function of (seed, epoch, group, offset) only.
    rng = np.random.default_rng(
        [self._seed, position["epoch"], position["group"], position["offset"]])
    return self._preprocess(raw, rng)

  def _fill(self):
    while len(self._pending) < self._ahead:
      try:
        raw, position = next(self._raw)
      except StopIteration:
        return
      self._pending.append((self._pool.submit(self._process, raw, position), position))

  def __next__(self):
    self._fill()
    if not self._pending:
      raise StopIteration
    future, position = self._pending.popleft()
    element = future.result()
    self._position = position
    return element

  def get_state(self):
    return dict(self._position)

  def set_state(self, state):
    for future, _ in self._pending:
      future.cancel()
    self._start(state)

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------
# The iterator the trainer sees
# ------------------------------------------------------------------------------------------------


class SkipLog:
  """Counts skipped examples by reason and logs each (reason, key) once."""

  def __init__(self, counts=None):
    self.counts = collections.Counter(counts or {})
    self._logged = set()

  def add(self, reason, key, count=1):
    self.counts[reason] += count
    if (reason, key) not in self._logged and len(self._logged) < _MAX_LOGGED_KEYS:
      self._logged.add((reason, key))
      logging.warning("input pipeline: skipped %s (%s)", key, reason)


class DataIterator:
  """Per-process batches with a JSON-serialisable, exactly resumable state.

  `get_state()` describes the position after the last batch returned; `set_state(state)` makes
  the next batch the one an uninterrupted iterator would have returned next. The state also
  carries the skip counters, so they continue across a resume.

  Eval iterators (`num_batches` set) yield exactly that many batches, padding with mask=False.
  """

  def __init__(self, stream, batch_size, collate, *, padding=None, num_batches=None):
    self._stream = stream
    self._collate = collate
    self._padding = padding
    self.batch_size = int(batch_size)
    self._num_batches = num_batches
    self.num_batches = num_batches          # None: unknown (training streams are endless)
    self._batches = 0
    self._skips = SkipLog()
    self._exhausted = False

  def __iter__(self):
    return self

  def _next_example(self):
    while not self._exhausted:
      try:
        element = next(self._stream)
      except StopIteration:
        self._exhausted = True
        break
      if "_consumed" in element:    # read before an elastic resume: not a skip
        continue
      if "_skip" in element:
        self._skips.add(element["_skip"], element["_key"])
        if element.get("_lost"):
          self._skips.add("lost_in_truncated_shard", element["_key"], element["_lost"])
        continue
      return element
    return None

  def __next__(self):
    if self._num_batches is not None and self._batches >= self._num_batches:
      raise StopIteration
    examples = []
    while len(examples) < self.batch_size:
      element = self._next_example()
      if element is None:
        break
      examples.append(element)
    if len(examples) < self.batch_size:
      if self._num_batches is None:  # training: no partial batches
        raise StopIteration
      examples.extend([self._padding] * (self.batch_size - len(examples)))
    self._batches += 1
    return self._collate(examples)

  def skipped_counts(self):
    """Cumulative skipped examples by reason, e.g. {'undecodable_image': 3}."""
    return dict(self._skips.counts)

  def get_state(self):
    state = {"version": _STATE_VERSION, "stream": self._stream.get_state(),
             "batches": self._batches, "skipped": self.skipped_counts()}
    return json.loads(json.dumps(state))  # fails here, not at save time, if not serialisable

  def set_state(self, state):
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"input pipeline state version {state.get('version')} != "
                       f"{_STATE_VERSION}")
    self._stream.set_state(state["stream"])
    self._batches = state["batches"]
    self._skips = SkipLog(state["skipped"])
    self._exhausted = False

  def close(self):
    self._stream.close()


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------


def _check_share(batch_size, process_index, process_count):
  if batch_size < 1:
    raise ValueError(f"batch_size: per-process batch size {batch_size} < 1")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def make_train_iterator(data_config, field_ops, *, batch_size, process_index=0, process_count=1,
                        source=None, images=True):
  """Endless (or data.num_epochs) shuffled, augmented per-process batches.

  Args:
    data_config: `config.data`.
    field_ops: the batch fields besides image and mask (`Task.train_ops`).
    batch_size: this process's batch size (the global batch / process count).
    process_index, process_count: this process's share.
    source: a prebuilt source (default: sources.make_source(data_config, 'train')).
    images: False for a task that reads text alone: no image is decoded or batched.

  Every process reads a disjoint share: for random-access sources, global positions
  process_index, process_index + process_count, ... of the epoch-wise shuffled order (an epoch is
  covered exactly by the union of the processes); for tar shards, every process_count-th shard;
  for TFRecord TFDS, `tfds.even_splits`.
  """
  _check_share(batch_size, process_index, process_count)
  data, pi, pc = data_config, process_index, process_count
  source = source if source is not None else sources_lib.make_source(data, "train")
  preprocess = Preprocess(data, field_ops, train=True, images=images)
  seed = int(data.shuffle_seed)
  if getattr(source, "random_access", False):
    if len(source) < pc:
      raise ValueError(f"data: {len(source)} training examples for {pc} processes")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(data.num_epochs)
    # Per-example randomness (crop, caption) is seeded by the GLOBAL position, so a run draws the
    # same samples whatever the number of processes; then each process takes its share.
    stream = _GlobalOrderStream(ds.random_map(preprocess, seed=seed), data, pi, pc)
  else:
    stream = _SequentialStream(source, preprocess, process_index=pi, process_count=pc, seed=seed,
                               shuffle=True, num_epochs=data.num_epochs,
                               threads=data.read_threads)
  return DataIterator(stream, batch_size, preprocess.collate)


def make_eval_iterator(data_config, field_ops, *, batch_size, process_index=0, process_count=1,
                       source=None, images=True):
  """One pass over this process's share of the eval split, in order, no augmentation.

  Every process yields the same number of batches (ceil(largest share / batch_size)); the tail
  is padded with mask=False examples, so each real example appears exactly once over all
  processes. Skipped (bad) examples make a share shorter, never the batch count different.
  """
  _check_share(batch_size, process_index, process_count)
  data, pi, pc = data_config, process_index, process_count
  source = source if source is not None else sources_lib.make_source(data, "eval")
  preprocess = Preprocess(data, field_ops, train=False, images=images)
  if getattr(source, "random_access", False):
    n = len(source)
    shares = [sources_lib.even_share(n, p, pc, drop_remainder=False) for p in range(pc)]
    sizes = [end - start for start, end in shares]
    start, end = shares[pi]
    ds = grain.MapDataset.source(source)[start:end].map(preprocess)
    stream = _GrainStream(_to_iter(ds, data))
  else:
    sizes = source.eval_share_sizes(pc)
    stream = _SequentialStream(source, preprocess, process_index=pi, process_count=pc,
                               seed=int(data.shuffle_seed), shuffle=False, num_epochs=1,
                               threads=data.read_threads)
  num_batches = -(-max(sizes) // batch_size) if sizes else 0
  return DataIterator(stream, batch_size, preprocess.collate, padding=preprocess.template(),
                      num_batches=num_batches)


def _to_iter(ds, data):
  read = grain.ReadOptions(num_threads=max(1, int(data.read_threads)), prefetch_buffer_size=256)
  it_ds = ds.to_iter_dataset(read)
  if data.worker_count and data.worker_count > 0:
    # grain's worker processes read absl flags: outside a command line, the caller marks them
    # parsed first (`vlm_jax.cli.ensure_flags_parsed`).
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.worker_count)))
  return it_ds
