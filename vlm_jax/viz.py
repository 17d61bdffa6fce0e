"""Plots for the notebooks: loss curves, image grids with captions, retrieval, similarity maps.

Every plotting function draws with matplotlib (imported when first needed, so importing this
module costs nothing) and returns the `Figure`; in a notebook end the cell with `plt.show()`.
The helpers that do not draw (`loss_history`, `top_k`, `load_examples`, `to_uint8`) are pure and
tested on their own.
"""
from __future__ import annotations

import io
import math
import textwrap
from typing import Mapping, Optional, Sequence

import numpy as np

LOSS_KEYS = ("loss", "contrastive_loss", "caption_loss")


# ---- data helpers (no drawing) -------------------------------------------------------------------


def loss_history(records: Sequence[Mapping], keys: Sequence[str] = LOSS_KEYS) -> dict:
  """{key: (steps int [n], values float [n])} from metrics.jsonl records (see
  `vlm_jax.metrics.read_metrics`), sorted by step. A resumed run logs the steps after its last
  checkpoint again: the LAST record of a step wins. Keys never logged are left out."""
  by_step: dict = {}
  for rec in records:
    if "step" not in rec:
      continue
    for k in keys:
      v = rec.get(k)
      if isinstance(v, (int, float)) and math.isfinite(v):
        by_step.setdefault(k, {})[int(rec["step"])] = float(v)
  out = {}
  for k in keys:
    if k in by_step:
      steps = sorted(by_step[k])
      out[k] = (np.asarray(steps, np.int64), np.asarray([by_step[k][s] for s in steps]))
  return out


def top_k(scores, k: int) -> np.ndarray:
  """Indices of the k highest scores of each row, best first: int [N, min(k, C)] for float
  [N, C] scores. Ties keep the lower index first (a stable order)."""
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"top_k: expected scores [N, C], got shape {scores.shape}")
  if k < 1:
    raise ValueError(f"top_k: k={k} must be >= 1")
  order = np.argsort(-scores, axis=1, kind="stable")
  return order[:, :min(k, scores.shape[1])]


def to_uint8(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
  """Preprocessed float images [N, H, W, 3] (normalised with `mean`/`std`, as
  `inference.Model.load_images` returns them) -> displayable uint8 [N, H, W, 3]."""
  x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def decode_image(data) -> np.ndarray:
  """Encoded image bytes (PNG/JPEG) or an array -> uint8 [H, W, 3]."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    arr = data
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if isinstance(data, np.ndarray):
      data = data.item()
    with Image.open(io.BytesIO(data)) as im:
      arr = np.asarray(im.convert("RGB"))
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  return np.asarray(arr, np.uint8)


def load_examples(data_config, split: str = "eval", num: int = 16) -> dict:
  """The first `num` raw examples of a data config's split ('train' or 'eval'), for display:
  {'image': list of uint8 [H, W, 3], 'encoded': the images as stored (what
  `Model.load_images` takes), 'captions': list of list[str], 'label': int [n]}. Reads through
  `vlm_jax.data.sources`, so any random-access source works (TFDS array_record, jsonl)."""
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top  (TF is heavy)
  source = sources.make_source(data_config, split)
  if not getattr(source, "random_access", False):
    raise ValueError(f"data.source={data_config.source!r}: load_examples needs a random-access "
                     "source (TFDS array_record or jsonl)")
  out = {"image": [], "encoded": [], "captions": [], "label": []}
  for i in range(min(int(num), len(source))):
    ex = source[i]
    if ex.get("error"):
      continue
    out["encoded"].append(ex["image"])
    out["image"].append(decode_image(ex["image"]))
    caps = ex.get("captions") or []
    out["captions"].append([c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in caps])
    out["label"].append(int(ex.get("label", -1)))
  out["label"] = np.asarray(out["label"], np.int64)
  return out


# ---- plots ---------------------------------------------------------------------------------------


def _plt():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_losses(records: Sequence[Mapping], keys: Sequence[str] = LOSS_KEYS, title: str = ""):
  """Training loss curves (total, contrastive, captioning) against the step; log-scale y when
  the losses span more than a decade."""
  plt = _plt()
  history = loss_history(records, keys)
  if not history:
    raise ValueError(f"plot_losses: no record has any of {list(keys)} (is this a metrics.jsonl "
                     "of a training run?)")
  fig, ax = plt.subplots(figsize=(7, 4))
  for k, (steps, values) in history.items():
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=k)
  values = np.concatenate([v for _, v in history.values()])
  if values.min() > 0 and values.max() / values.min() > 10:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title or "training losses")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig


def image_grid(images: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None,
               ncols: int = 4, width: int = 28, cell: float = 2.6):
  """Images in a grid, each with a (wrapped) title underneath, e.g. caption + prediction."""
  plt = _plt()
  n = len(images)
  if n == 0:
    raise ValueError("image_grid: no images")
  if titles is not None and len(titles) != n:
    raise ValueError(f"image_grid: {n} images but {len(titles)} titles")
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, (cell + 0.9) * nrows),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= n:
      continue
    ax.imshow(np.asarray(images[i]), interpolation="nearest")
    if titles is not None:
      ax.set_title("\n".join(textwrap.wrap(str(titles[i]), width)) or " ", fontsize=8, loc="left",
                   y=-0.02, va="top")
  fig.tight_layout()
  return fig


def _image_by_item(values, images, items, fn: str, name: str, what: str) -> np.ndarray:
  """`values` as float32 [len(images), len(items)], or a ValueError naming the mismatch."""
  values = np.asarray(values, np.float32)
  if values.shape != (len(images), len(items)):
    raise ValueError(f"{fn}: {name} shape {values.shape} != ({len(images)}, {len(items)}) "
                     f"(images x {what})")
  return values


def _image_rows(images, figsize, text_ratio):
  """A figure with one row per image: the image on the left, a free axis on the right."""
  fig, axes = _plt().subplots(len(images), 2, figsize=figsize, squeeze=False,
                              gridspec_kw={"width_ratios": [1, text_ratio]})
  for i, image in enumerate(images):
    axes[i, 0].imshow(np.asarray(image), interpolation="nearest")
    axes[i, 0].axis("off")
  return fig, axes


def retrieval_examples(images: Sequence[np.ndarray], texts: Sequence[str], scores,
                       correct=None, k: int = 3, width: int = 60):
  """For each image (row), its top-k texts by score, best first; texts marked `correct`
  (bool [N, T], e.g. the image's own captions) get a check mark and are drawn in green."""
  scores = _image_by_item(scores, images, texts, "retrieval_examples", "scores", "texts")
  best = top_k(scores, k)
  fig, axes = _image_rows(images, figsize=(9, 1.5 * len(images)), text_ratio=5)
  for i in range(len(images)):
    ax = axes[i, 1]
    ax.axis("off")
    for r, j in enumerate(best[i]):
      ok = bool(correct[i, j]) if correct is not None else None
      mark = "" if ok is None else ("\u2713 " if ok else "\u2717 ")
      text = textwrap.shorten(str(texts[j]), width)
      ax.text(0.0, 0.85 - r * 0.3, f"{r + 1}. {mark}{text}  ({scores[i, j]:.2f})",
              fontsize=9, va="center", transform=ax.transAxes,
              color={True: "darkgreen", False: "firebrick", None: "black"}[ok])
  fig.suptitle(f"image \u2192 text retrieval: top {best.shape[1]} of {len(texts)} texts",
               fontsize=10)
  fig.tight_layout()
  return fig


def similarity_heatmap(scores, images: Sequence[np.ndarray], prompts: Sequence[str],
                       title: str = "cosine similarity"):
  """Heat map of image x prompt scores (rows: images, drawn on the left; columns: prompts),
  with the value in every cell and each row's best prompt outlined."""
  plt = _plt()
  scores = np.asarray(scores, np.float32)
  n, m = len(images), len(prompts)
  if scores.shape != (n, m):
    raise ValueError(f"similarity_heatmap: scores shape {scores.shape} != ({n}, {m}) "
                     "(images x prompts)")
  fig = plt.figure(figsize=(1.2 + 0.9 * m, 0.9 * n + 1.8))
  grid = fig.add_gridspec(n, 2, width_ratios=[1, max(m, 1)], wspace=0.02)
  heat = fig.add_subplot(grid[:, 1])
  im = heat.imshow(scores, cmap="viridis", aspect="auto")
  heat.set_xticks(range(m))
  heat.set_xticklabels([textwrap.shorten(p, 30) for p in prompts], rotation=40, ha="right",
                       fontsize=8)
  heat.set_yticks([])
  mid = (scores.max() + scores.min()) / 2 if scores.size else 0
  for i in range(n):
    for j in range(m):
      heat.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="black" if scores[i, j] > mid else "white")
    j = int(np.argmax(scores[i])) if m else 0
    heat.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
  for i in range(n):
    ax = fig.add_subplot(grid[i, 0])
    ax.imshow(np.asarray(images[i]), interpolation="nearest")
    ax.axis("off")
  heat.set_title(title)
  fig.colorbar(im, ax=heat, fraction=0.03, pad=0.02)
  return fig


def label_bars(probs, labels: Sequence[str], images: Sequence[np.ndarray], k: int = 5,
               titles: Optional[Sequence[str]] = None):
  """Zero-shot results: each image next to a bar chart of its top-k label probabilities."""
  probs = _image_by_item(probs, images, labels, "label_bars", "probs", "labels")
  best = top_k(probs, k)
  fig, axes = _image_rows(images, figsize=(8, 1.7 * len(images)), text_ratio=3)
  for i in range(len(images)):
    if titles is not None:
      axes[i, 0].set_title(textwrap.shorten(str(titles[i]), 40), fontsize=8)
    ax = axes[i, 1]
    idx = best[i][::-1]
    ax.barh(range(len(idx)), probs[i, idx], color="tab:blue")
    ax.set_yticks(range(len(idx)))
    ax.set_yticklabels([labels[j] for j in idx], fontsize=8)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
  axes[-1, 1].set_xlabel("probability")
  fig.tight_layout()
  return fig


__all__ = ["loss_history", "top_k", "to_uint8", "decode_image", "load_examples", "plot_losses",
           "image_grid", "retrieval_examples", "similarity_heatmap", "label_bars"]
