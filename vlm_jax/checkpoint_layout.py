"""Restoring params stored in another layout or grid: Transformer blocks stored plain into a
model that scans them (or the other way round), and an image tower's position embedding
learned for another patch grid.

A stack of blocks is stored either plain, one entry per block (`image/encoder/block_<i>/...`),
or scanned (`model.scan=True`: one entry `image/encoder/blocks/...` whose arrays have a leading
depth axis). Both compute the same function, so a checkpoint of either layout can start a model
of either: imported weights (always plain) can fine-tune the scanned pod recipes, and a scanned
run's params can start a plain model.

`Relayout.plan(saved, wanted)` compares the two, stack by stack, on flat {path: leaf} dicts.
`checkpoint_targets(wanted)` are the model's restore targets renamed and reshaped into the
checkpoint's layout (each block's sharding is the stacked one without its leading axis, and the
other way round), so Orbax reads every array straight into place; `to_model(restored)` then
stacks or slices the restored arrays into the model's layout, each into its target sharding.
Nothing is read twice and no array passes through one device whole.

`grid_resample_plan` recognises an image tower's learned position embedding stored for another
grid (fine-tuning at another image size or patch count); `resample_grids` resizes the restored
ones (`layers.resample_grid_posemb`, as open_clip, timm and big_vision do on load).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp

from vlm_jax.models import layers

_BLOCK_PART = re.compile(r"block_(\d+)|blocks")


def split_block_path(path: str) -> Optional[tuple[str, Optional[int], str]]:
  """('image/encoder', 3, 'mlp/fc1/kernel') for 'image/encoder/block_3/mlp/fc1/kernel';
  (prefix, None, rest) for a scanned '.../blocks/...'; None for a param outside any block."""
  parts = path.split("/")
  for j, part in enumerate(parts):
    match = _BLOCK_PART.fullmatch(part)
    if match:
      index = None if part == "blocks" else int(match.group(1))
      return "/".join(parts[:j]), index, "/".join(parts[j + 1:])
  return None


def stack_layouts(paths) -> dict[str, str]:
  """{stack prefix: 'scanned' or 'plain'} of the block stacks among these param paths."""
  layouts = {}
  for path in paths:
    split = split_block_path(path)
    if split is not None:
      layouts[split[0]] = "scanned" if split[1] is None else "plain"
  return layouts


def _respec(sharding, spec: tuple):
  """A NamedSharding on the same mesh with partition spec `spec` (other shardings as they are:
  they name no axes)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return sharding


def _spec(leaf) -> tuple:
  sharding = getattr(leaf, "sharding", None)
  return tuple(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else ()


@dataclasses.dataclass
class Relayout:
  """The block stacks stored in the other layout: {stack prefix: the checkpoint's layout}."""
  stacks: dict[str, str]

  @classmethod
  def plan(cls, saved: dict, wanted: dict) -> "Relayout":
    have, want = stack_layouts(saved), stack_layouts(wanted)
    return cls({prefix: layout for prefix, layout in have.items()
                if want.get(prefix) not in (None, layout)})

  def messages(self, field: str) -> list[str]:
    return [f"{field}: the checkpoint's blocks under {prefix}/ are {layout} and the model's "
            f"{'plain' if layout == 'scanned' else 'scanned'}: converted while loading"
            for prefix, layout in sorted(self.stacks.items())]

  def _converted(self, path: str):
    split = split_block_path(path)
    return split if split is not None and split[0] in self.stacks else None

  def checkpoint_targets(self, wanted: dict) -> dict:
    """{checkpoint path: (restore target, [the model paths it feeds])}: the model's targets
    (ShapeDtypeStructs) under the checkpoint's paths and shapes."""
    out, plain_blocks, depths = {}, {}, {}
    for path, leaf in wanted.items():
      split = self._converted(path)
      if split is None:
        out[path] = (leaf, [path])
      elif split[1] is None:                       # the model scans, the checkpoint is plain
        prefix, _, rest = split
        block = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                     sharding=_respec(leaf.sharding, _spec(leaf)[1:]))
        for i in range(leaf.shape[0]):
          out[f"{prefix}/block_{i}/{rest}"] = (block, [path])
      else:                                        # the model is plain, the checkpoint scans
        prefix, index, rest = split
        plain_blocks.setdefault((prefix, rest), {})[index] = (path, leaf)
        depths[prefix] = max(depths.get(prefix, 0), index + 1)
    for (prefix, rest), by_index in plain_blocks.items():
      _, leaf = next(iter(by_index.values()))
      out[f"{prefix}/blocks/{rest}"] = (
          jax.ShapeDtypeStruct((depths[prefix],) + tuple(leaf.shape), leaf.dtype,
                               sharding=_respec(leaf.sharding, (None,) + _spec(leaf))),
          [by_index[i][0] for i in sorted(by_index)])
    return out

  def to_model(self, restored: dict, wanted: dict, field: str,
               skipped=lambda path: False) -> tuple[dict, list[str]]:
    """The restored arrays (checkpoint layout) in the model's layout and target shardings.
    A scanned param some of whose blocks were not restored keeps its fresh init; the blocks of a
    plain model that `skipped(path)` names are left out of a restored stack. Both are said."""
    out, messages, sliced = {}, [], {}
    for path, leaf in wanted.items():
      split = self._converted(path)
      if split is None:
        if path in restored:
          out[path] = restored[path]
      elif split[1] is None:
        prefix, _, rest = split
        parts = [restored.get(f"{prefix}/block_{i}/{rest}") for i in range(leaf.shape[0])]
        found = sum(p is not None for p in parts)
        if found == len(parts):
          out[path] = jax.jit(lambda *xs: jnp.stack(xs),
                              out_shardings=getattr(leaf, "sharding", None))(*parts)
        elif found:
          messages.append(f"{field}: kept fresh init: {path} (only {found} of its {len(parts)} "
                          "blocks were restored)")
      else:
        prefix, index, rest = split
        stacked_path = f"{prefix}/blocks/{rest}"
        if stacked_path not in restored:
          continue
        if skipped(path):
          messages.append(f"{field}: skipped by init_from_skip: {path}")
        else:
          sliced.setdefault(stacked_path, {})[index] = (path, getattr(leaf, "sharding", None))
    for stacked_path, by_index in sliced.items():
      order = tuple(sorted(by_index))
      blocks = jax.jit(lambda a, order=order: tuple(a[i] for i in order),
                       out_shardings=tuple(by_index[i][1] for i in order))(restored[stacked_path])
      for i, array in zip(order, blocks):
        out[by_index[i][0]] = array
    return out, messages


def grid_resample_plan(path: str, saved_shape, wanted_shape) -> Optional[tuple[int, int, int]]:
  """(prefix tokens, saved grid, wanted grid) when `path` is an image tower's learned position
  embedding [prefix + g * g, W] stored for another grid of the same width; None otherwise (the
  shapes then simply mismatch)."""
  if not (path.startswith("image/") and path.endswith("pos_embedding")):
    return None
  if len(saved_shape) != 2 or len(wanted_shape) != 2 or saved_shape[1] != wanted_shape[1]:
    return None
  for prefix in (1, 0):      # a class (or pooling) token first, or none
    have, want = saved_shape[0] - prefix, wanted_shape[0] - prefix
    if have > 0 and want > 0 and math.isqrt(have) ** 2 == have and math.isqrt(want) ** 2 == want:
      return prefix, math.isqrt(have), math.isqrt(want)
  return None


def replicated(sharding):
  """The same devices, nothing split (a param restored at the checkpoint's shape, which the
  target's partitioning may not divide)."""
  return _respec(sharding, ())


def resample_grids(loaded: dict, plans: dict, wanted: dict) -> dict:
  """`loaded` with each position embedding of `plans` ({path: grid_resample_plan}) resized to
  its wanted grid, into its target sharding."""
  out = dict(loaded)
  for path, (prefix, _, grid) in plans.items():
    if path in out:
      out[path] = jax.jit(lambda pos, prefix=prefix, grid=grid: layers.resample_grid_posemb(
          pos, prefix, grid), out_shardings=getattr(wanted[path], "sharding", None))(out[path])
  return out
