"""Image-text retrieval: recall@k in both directions, with several captions per image.

`retrieval_metrics` is the pure metric on embeddings; `evaluate` embeds an eval split with the
model (sharded over the mesh) and calls it.

Ranking convention: a query's rank is the number of wrong candidates scored strictly higher than
its best right candidate, and recall@k counts queries with rank < k. Image -> text: a hit if ANY
of the image's captions is in the top k. Text -> image: every caption has exactly one image.
Exact score ties are resolved in the query's favour (they do not occur with real embeddings).
"""
from typing import Dict, Sequence

import numpy as np

from vlm_jax.data import ops
from vlm_jax.evals import common

DEFAULT_KS = (1, 5, 10)
_CHUNK = 1024   # similarity rows per block, so 25k captions x 5k images never sit in memory at once


PREDICT_FNS = ("encode_images", "encode_texts")


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  length = common.text_length(config)
  return [(common.eval_data_config(config, entry),
           [ops.AllCaptions(tokenizer, length, entry.max_captions)])]


def default_config(**fields):
  c = common.entry_config("retrieval")
  c.max_captions = 5               # captions per image
  c.ks = DEFAULT_KS
  c.update(fields)
  return c


def retrieval_metrics(image_embeds, text_embeds, text_image_ids, ks: Sequence[int] = DEFAULT_KS
                      ) -> Dict[str, float]:
  """Recall@k for image->text ('i2t_r<k>') and text->image ('t2i_r<k>'), in [0, 1].

  Args:
    image_embeds: float [N, D] image embeddings (L2-normalised: scores are dot products).
    text_embeds: float [M, D] caption embeddings.
    text_image_ids: int [M], the index (0..N-1) of the image each caption describes. Images with
      no caption are skipped as i2t queries (they still compete as t2i candidates).
    ks: the k values.
  """
  img = np.asarray(image_embeds, np.float32)
  txt = np.asarray(text_embeds, np.float32)
  ids = np.asarray(text_image_ids, np.int64)
  n, m = img.shape[0], txt.shape[0]
  if ids.shape != (m,):
    raise ValueError(f"text_image_ids: expected shape ({m},), got {ids.shape}")
  if m and (ids.min() < 0 or ids.max() >= n):
    raise ValueError(f"text_image_ids: values must be in [0, {n}), got [{ids.min()}, {ids.max()}]")

  # Text -> image: rank of the caption's own image among all images.
  t2i_rank = np.empty((m,), np.int64)
  for start in range(0, m, _CHUNK):
    sims = txt[start:start + _CHUNK] @ img.T                              # [c, N]
    own = sims[np.arange(sims.shape[0]), ids[start:start + _CHUNK]]
    t2i_rank[start:start + _CHUNK] = np.sum(sims > own[:, None], axis=1)

  # Image -> text: rank of the best of the image's captions among all captions.
  has_caption = np.bincount(ids, minlength=n) > 0
  i2t_rank = np.empty((n,), np.int64)
  for start in range(0, n, _CHUNK):
    sims = img[start:start + _CHUNK] @ txt.T                              # [c, M]
    rows = np.arange(start, start + sims.shape[0])
    positive = ids[None, :] == rows[:, None]                              # [c, M]
    best_pos = np.max(np.where(positive, sims, -np.inf), axis=1)
    i2t_rank[start:start + sims.shape[0]] = np.sum((sims > best_pos[:, None]) & ~positive, axis=1)
  i2t_rank = i2t_rank[has_caption]

  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k)) if i2t_rank.size else float("nan")
    out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k)) if t2i_rank.size else float("nan")
  return out


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  """Embeds every image and every caption (up to max_captions per image) of the split and
  returns `retrieval/<tag>/{i2t_r1, ..., t2i_r10}`."""
  who = f"evals: retrieval on {tag!r}"
  encode_images = ctx.predict_fn("encode_images", who)
  encode_texts = ctx.predict_fn("encode_texts", who)

  def fn(params, batch):
    images = encode_images(params, batch)
    b, k, length = batch["captions"].shape
    texts = encode_texts(params, {"text": batch["captions"].reshape(b * k, length)})
    return images, texts.reshape(b, k, -1), batch["mask"], batch["captions_mask"]

  (data, field_ops), = splits(ctx.config, eval_config, ctx.tokenizer)
  images, texts, ids = [], [], []
  count = 0
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      common.entry_batch_size(ctx.config, eval_config), who=who):
    img, txt, mask, cap_mask = ctx.call("retrieval/embed", fn, batch)
    img, txt, cap_mask = img[mask], txt[mask], cap_mask[mask]
    images.append(img)
    rows, cols = np.nonzero(cap_mask)           # row-major: captions stay in order per image
    texts.append(txt[rows, cols])
    ids.append(rows + count)
    count += img.shape[0]
  dim = int(ctx.config.model.embed_dim)
  image_embeds = np.concatenate(images) if images else np.zeros((0, dim), np.float32)
  text_embeds = np.concatenate(texts) if texts else np.zeros((0, dim), np.float32)
  text_ids = np.concatenate(ids) if ids else np.zeros((0,), np.int64)
  metrics = retrieval_metrics(image_embeds, text_embeds, text_ids, ks=tuple(eval_config.ks))
  metrics["num_images"] = float(image_embeds.shape[0])
  metrics["num_captions"] = float(text_embeds.shape[0])
  return {f"retrieval/{tag}/{k}": v for k, v in metrics.items()}
