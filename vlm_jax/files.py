"""Small file helpers for outputs that must never be seen half-written: write under a temporary
name and rename (atomic on one filesystem), and read back JSON descriptions with their format."""
from __future__ import annotations

import json
import os

import numpy as np


def write_json(path: str, obj, **kwargs) -> None:
  """`obj` as JSON at `path`, replacing any previous file only once it is complete."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, **kwargs)
  os.replace(path + ".tmp", path)


def write_lines(path: str, lines) -> None:
  """Text lines at `path` (each ended by a newline), atomically."""
  with open(path + ".tmp", "w") as f:
    f.write("".join(line + "\n" for line in lines))
  os.replace(path + ".tmp", path)


def save_npy(path: str, array: np.ndarray) -> None:
  """`array` as .npy at `path`, atomically."""
  with open(path + ".tmp", "wb") as f:
    np.save(f, array)
  os.replace(path + ".tmp", path)


def read_described(path: str, fmt: str, what: str, make_with: str) -> dict:
  """The JSON object at `path`, whose "format" must be `fmt`; errors name the file, and for a
  missing one the command that makes it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no {os.path.basename(path)} in {os.path.dirname(path)} "
                            f"(make one with `{make_with}`)")
  with open(path) as f:
    obj = json.load(f)
  if not isinstance(obj, dict) or obj.get("format") != fmt:
    found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{what}: {path} has format {found!r}, expected {fmt!r}")
  return obj
