"""A weighted mixture of training sources, as one source.

    config.data.mixture = (
        dict(weight=0.7, source="tfds", name="cc12m", data_dir="gs://bucket/tfds"),
        dict(weight=0.3, source="jsonl", train_jsonl="data/coco/captions.jsonl"),
    )

Each entry is `config.data` with its fields overridden (the source and where it reads; anything
else in `config.data`, such as image size and crops, is shared) plus its `weight`. Only the
training split mixes; evaluations read their own data.

How positions map to examples. A virtual epoch of L = max_i(n_i / w_i) positions gives
component i (n_i examples, weight w_i normalised to sum 1) round(w_i * L) of them, so every
component is read whole at least once per virtual epoch and the one with the largest n_i / w_i
exactly once; the others repeat (position j of component i reads its example j mod n_i). The
pipeline then shuffles the virtual positions like any random-access source, so a batch holds
each component in proportion to its weight, and resuming (on any number of processes), per-
example randomness and `num_epochs` (virtual epochs) work unchanged. Storage order itself
strides through the virtual positions (position p reads virtual position p * a mod L for a
stride a coprime to L), so that any prefix, such as the captions a tokenizer is trained on, has
every component in proportion too.

Sequential sources (tar shards, TFRecord-only TFDS) have no random access. A mixture of them
alone interleaves their streams instead: each process reads its own shards of every source, and
example k goes to the source j with the smallest (read_j + 1) / w_j (a smooth weighted
round-robin, so every prefix of a batch holds the sources in proportion, exactly at multiples
of the weights' period). Its position is every source's position plus the counts, so it
resumes exactly on the same number of processes (as tar shards do); with `num_epochs` it ends
when the first source has been read that many times. A mixture of both kinds is refused.
"""
from __future__ import annotations

import bisect
import math


def entries(data_config) -> list[tuple[dict, float]]:
  """[(field overrides, weight normalised to sum 1)] of `data.mixture`; ValueError naming the
  entry and field for a bad one."""
  raw = list(data_config.get("mixture") or ())
  if len(raw) < 2:
    raise ValueError(f"data.mixture: {len(raw)} entr{'y' if len(raw) == 1 else 'ies'}; a "
                     "mixture needs at least two (or leave it empty and set the data fields)")
  fields = set(data_config.keys()) - {"mixture"}
  out = []
  for i, entry in enumerate(raw):
    entry = dict(entry)
    weight = entry.pop("weight", None)
    if not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
      raise ValueError(f"data.mixture[{i}].weight: {weight!r}; every entry needs a positive "
                       "weight")
    unknown = sorted(set(entry) - fields)
    if unknown:
      raise ValueError(f"data.mixture[{i}]: unknown data field(s) {', '.join(unknown)} (an "
                       "entry overrides fields of config.data: source, name, data_dir, "
                       "train_split, train_jsonl, train_folder, image_root, ...)")
    out.append((entry, float(weight)))
  total = sum(w for _, w in out)
  return [(entry, w / total) for entry, w in out]


def component_config(data_config, overrides: dict):
  """`config.data` with one entry's fields, and no mixture."""
  config = data_config.copy_and_resolve_references()
  with config.unlocked():
    config.mixture = ()
    config.update(overrides)
  return config


def _stride(length: int) -> int:
  """A stride coprime to `length` near length / golden ratio (spreads any prefix evenly)."""
  stride = max(1, int(length * 0.6180339887)) | 1
  while math.gcd(stride, length) != 1:
    stride += 2
  return stride


class MixtureSource:
  """The weighted components as one source: random-access when they all are, else sequential
  (see the module docstring)."""

  def __init__(self, components: list, weights: list[float], names: list[str]):
    kinds = [bool(getattr(source, "random_access", False)) for source in components]
    if len(set(kinds)) > 1:
      raise ValueError(
          "data.mixture: " + "; ".join(
              f"{name} is {'random-access' if k else 'sequential'} ({s.describe()})"
              for name, k, s in zip(names, kinds, components)) +
          ": a mixture is either of random-access sources (TFDS array_record, jsonl, "
          "imagefolder) or of sequential ones (tar shards, TFRecord-only TFDS), not both")
    self.components, self.weights, self.names = components, weights, names
    self.provides = frozenset.intersection(*(frozenset(s.provides) for s in components))
    self.random_access = kinds[0]
    if not self.random_access:
      return
    for source, name in zip(components, names):
      if len(source) == 0:
        raise ValueError(f"{name}: {source.describe()} holds no examples")
    virtual_epoch = max(len(s) / w for s, w in zip(components, weights))
    self.counts = [max(len(s), round(w * virtual_epoch)) for s, w in zip(components, weights)]
    self._starts = [0]
    for count in self.counts:
      self._starts.append(self._starts[-1] + count)
    self._stride = _stride(self._starts[-1])

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, index: int) -> tuple[int, int]:
    """(component, its example) read at storage position `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"mixture: position {index} outside [0, {len(self)})")
    virtual = (index * self._stride) % len(self)
    component = bisect.bisect_right(self._starts, virtual) - 1
    return component, (virtual - self._starts[component]) % len(self.components[component])

  def __getitem__(self, index: int) -> dict:
    component, example = self.locate(int(index))
    return self.components[component][example]

  def iterate(self, position, *, process_index, process_count, seed, shuffle, num_epochs=None):
    """Sequential sources: yields (raw example, position after it), interleaving the sources'
    own streams by weight from `position` (see the module docstring)."""
    n = len(self.components)
    parts = [dict(p) for p in position.get("parts") or
             [{"epoch": 0, "group": 0, "offset": 0}] * n]
    counts, read = list(position.get("counts") or [0] * n), int(position.get("offset", 0))
    streams = [source.iterate(part, process_index=process_index, process_count=process_count,
                              seed=seed, shuffle=shuffle, num_epochs=num_epochs)
               for source, part in zip(self.components, parts)]
    while True:
      j = min(range(n), key=lambda i: (counts[i] + 1) / self.weights[i])
      try:
        raw, parts[j] = next(streams[j])
      except StopIteration:
        if not any(counts):
          raise ValueError(f"{self.names[j]}: {self.components[j].describe()} gives process "
                           f"{process_index} of {process_count} no examples") from None
        return                     # a source read num_epochs times ends the mixture
      counts[j] += 1
      read += 1
      # epoch / group / offset seed the example's randomness (pipeline): offset is unique.
      yield raw, {"epoch": 0, "group": 0, "offset": read, "counts": list(counts),
                  "parts": [dict(p) for p in parts]}

  def describe(self) -> str:
    size = lambda s: f", {len(s)} examples" if self.random_access else ""
    return "a mixture of " + "; ".join(
        f"{s.describe()} (weight {w:.3g}{size(s)})"
        for s, w in zip(self.components, self.weights))

  def class_names(self):
    names = [getattr(s, "class_names", lambda: None)() for s in self.components]
    return names[0] if names[0] is not None and all(n == names[0] for n in names) else None
