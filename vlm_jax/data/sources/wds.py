"""WebDataset-style tar shards (the layout img2dataset writes)."""
import dataclasses
import glob
import json
import logging
import os
import re
import tarfile

import numpy as np

from vlm_jax.data.sources import common

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_CAPTION_JSON_FIELDS = ("caption", "captions", "text")


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
  lost: int = 0   # samples known lost to the damage (see `index_shard`)


def _stats_successes(path):
  """The sample count img2dataset wrote beside a shard (`<stem>_stats.json`), else None."""
  stats = os.path.splitext(path)[0] + "_stats.json"
  try:
    with open(stats) as f:
      count = json.load(f).get("successes")
  except (OSError, ValueError, AttributeError):
    return None
  return count if isinstance(count, int) and count >= 0 else None


def index_shard(path):
  """Scans a tar's headers (seeking over the data). A damaged tail is cut at the last complete
  sample: everything from the point of damage on is dropped and `truncated` is set.

  `lost` is what the index can tell of the samples dropped: the sample the damage cut into (one),
  or, when img2dataset's `<stem>_stats.json` sits beside the shard, its sample count minus the
  samples kept, if that is more.
  """
  samples, current_key, current, truncated, lost = [], None, {}, False, 0
  file_size = os.path.getsize(path)
  try:
    with tarfile.open(path, "r:") as tar:
      while True:
        member = tar.next()
        if member is None:
          break
        if member.offset_data + member.size > file_size:
          truncated, lost = True, 1     # the sample the damaged file belongs to
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
  elif current_key is not None:
    lost = 1   # when truncated, the open sample may be missing files: it goes with the rest
  expected = _stats_successes(path) if truncated else None
  if expected is not None:
    lost = max(lost, expected - len(samples))
  return ShardIndex(path, samples, truncated, lost)


def read_tar_sample(path, key, files):
  """Raw example for one indexed sample; missing parts become error examples."""
  full_key = f"{os.path.basename(path)}/{key}"
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
  if image_ext is None:
    return common.error("missing_image", full_key)
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
          return common.error("bad_caption_json", full_key)
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
    return common.error("unreadable_image", full_key)
  if captions is None:
    return common.error("missing_caption", full_key)
  return {"image": image, "captions": captions, "label": label, "key": full_key}


class TarShardSource:
  """Random access to the samples of one tar shard through its header index (`vlm_jax.embed`
  writes one output shard per tar file). A truncated shard ends with one `truncated_shard` error
  example that carries the number of samples known lost."""

  random_access = True

  def __init__(self, index: ShardIndex, provides):
    self.index, self.provides = index, provides

  def __len__(self):
    return len(self.index.samples) + int(self.index.truncated)

  def __getitem__(self, i):
    if i == len(self.index.samples) and self.index.truncated:
      return dict(common.error("truncated_shard", os.path.basename(self.index.path)),
                  lost=self.index.lost)
    key, files = self.index.samples[i]
    return read_tar_sample(self.index.path, key, files)

  def describe(self):
    return f"tar shard {self.index.path!r} ({len(self.index.samples)} samples)"

  def class_names(self):
    return None


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
  example at the start of its group (so it is counted once per epoch), which also carries the
  number of samples known lost with it (`ShardIndex.lost`; counted as `lost_in_truncated_shard`).
  """

  def __init__(self, pattern, *, field="data.train_shards", group_size=4):
    self.shards = list_shards(pattern, field)
    self.field = field
    self.group_size = max(1, int(group_size))
    self.random_access = False
    self._cache = {}
    # Every sample has a caption (.txt / .json) or is skipped; labels come from .cls files.
    self.provides = frozenset({common.CAPTIONS, common.LABEL})
    self.pattern = pattern

  def describe(self):
    return f"tar shards {self.pattern!r} ({len(self.shards)} files)"

  def class_names(self):
    return None

  def _index(self, path):
    if path not in self._cache:
      if len(self._cache) >= 4 * self.group_size:
        self._cache.pop(next(iter(self._cache)))
      self._cache[path] = index_shard(path)
    return self._cache[path]

  def shard_source(self, i: int) -> TarShardSource:
    """Random access to the samples of the i-th shard file (its headers are read once)."""
    return TarShardSource(self._index(self.shards[i]), self.provides)

  def process_shards(self, process_index, process_count, require_all=True):
    shards = self.shards[process_index::process_count]
    if require_all and len(self.shards) < process_count:
      raise ValueError(f"{self.field}: {len(self.shards)} shard(s) for {process_count} processes; "
                       "every process needs at least one shard file")
    return shards

  def _group_entries(self, shards):
    """[(path, key or None, files or lost count)]; a None key marks a truncated shard."""
    entries, markers = [], []
    for path in shards:
      index = self._index(path)
      if index.truncated:
        markers.append((path, None, index.lost))
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
            logging.warning("truncated tar shard %s: samples after the damage are skipped (%d "
                            "known lost)", path, files)
            raw = dict(common.error("truncated_shard", os.path.basename(path)), lost=files)
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
