"""Retrieved captions for retrieval-augmented captioning (SmallCap-style).

A neighbours file is what `python -m vlm_jax.index neighbours` writes: JSON lines
`{"id": image key, "neighbours": [{"id", "caption", "score"}, ...]}`, best first, never the
image's own captions. `load_neighbours` reads one into {image key: [neighbour captions, ...]},
and
`prompt_text` puts an image's retrieved captions (`phrasing`: one of each neighbour) in the
prefix-LM's prompt:

    similar images show: a small red circle in the top left.; two red circles.; ... caption:

Training reads the neighbours of the training images (`data.neighbours`), evaluation those of the
evaluated images (`evals.<caption>.neighbours`), each retrieved from a datastore that can be
swapped at test time without retraining.
"""
from __future__ import annotations

import functools
import json
from typing import Dict, List, Sequence

PROMPT_START = "similar images show:"
PROMPT_END = "caption:"


def load_neighbours(path: str, k: int, field: str = "data.neighbours"
                    ) -> Dict[str, List[List[str]]]:
  """{image key: [the captions of each of its first k neighbours]} from a neighbours file (a hit
  of an image index lists all of its image's captions, first the one retrieved; a hit of a
  caption index has one); a clear ValueError (naming `field`, the file and the line) for a
  missing, malformed or empty file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if k < 1:
    raise ValueError(f"{field}: k must be >= 1, got {k}")
  p = epath.Path(path)
  if not p.exists():
    raise ValueError(f"{field}: neighbours file {path} does not exist (make it with "
                     "`python -m vlm_jax.index neighbours`)")
  stat = p.stat()
  return _parse(str(path), int(k), field, (stat.mtime, stat.length))


# A run reads the same file several times as it starts (the config checks, the tokenizer's texts,
# the field ops); the parse is kept per (file, k, modification time and size). Callers only read
# the returned dict.
@functools.lru_cache(maxsize=4)
def _parse(path: str, k: int, field: str, stamp) -> Dict[str, List[List[str]]]:
  del stamp   # part of the cache key only
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = {}
  with epath.Path(path).open() as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        hits = [[str(c).strip() for c in (h.get("captions") or [h["caption"]])]
                for h in record["neighbours"]]
        key = str(record["id"])
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{field}: {path} line {number} is not a neighbours record "
                         f'({{"id": ..., "neighbours": [{{"caption": ...}}, ...]}}): {e}') from e
      hits = [[c for c in h if c] for h in hits]
      hits = [h for h in hits if h][:k]
      if hits:
        out[key] = hits
  if not out:
    raise ValueError(f"{field}: {path} holds no retrieved captions (an empty datastore?)")
  return out


def phrasing(hits: Sequence[Sequence[str]], index: int = 0) -> List[str]:
  """One caption of each neighbour: its `index`-th (modulo its count; 0 = the one retrieved)."""
  return [h[index % len(h)] for h in hits]


def prompt_text(captions: Sequence[str]) -> str:
  """The prompt of one image: its retrieved captions between PROMPT_START and PROMPT_END."""
  return f"{PROMPT_START} {'; '.join(c.rstrip('.') for c in captions)}. {PROMPT_END}"
