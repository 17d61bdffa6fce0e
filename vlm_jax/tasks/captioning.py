"""Caption-only pretraining (CapPa-style): an image tower and a cross-attention decoder that learns
to write the caption, with no text tower and no contrastive term.

Batch fields: `image` and `text` [B, L] (`bos caption eos pad...`). Model: `Captioner`. Loss: the
next-token cross-entropy over the real tokens of the global batch (a local term: a sum over
examples divided by the token count, so accumulation is a plain sum of micro-batch gradients).
The decoder's vocabulary and caption length are `model.decoder.vocab_size` / `context_length`.

Predict functions: generate (greedy / beam search with the decoder's KV cache), caption_nll
(teacher-forced log-likelihood of reference captions), image_features. The caption pieces here
(`caption_terms`, `caption_predict_fns`) are shared with the CoCa task.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import losses
from vlm_jax import models
from vlm_jax.data import ops
from vlm_jax import decoding
from vlm_jax.tasks import base


# Every vlm_jax tokenizer pads with id 0 (`vlm_jax.data.tokenizer`, `vlm_jax.data.bpe`).
PAD_ID = 0


def caption_loss_config(weight: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.caption_weight = weight        # CoCa paper: 2.0 next to a contrastive weight of 1.0
  c.label_smoothing = 0.0
  return c


def caption_terms(loss_config):
  """local_terms(outputs, batch) of the teacher-forced caption loss: logits at position t predict
  token t + 1; padded targets do not count."""
  smoothing = float(loss_config.get("label_smoothing", 0.0))

  def local_terms(outputs, batch):
    targets = batch["text"][:, 1:]
    total, count = losses.caption_xent_sum(outputs["caption_logits"][:, :-1], targets,
                                           targets != PAD_ID, label_smoothing=smoothing)
    return {"caption_loss": (total, count)}
  return local_terms


def build_decoder(config, vocab_size: int, context_length: int):
  return models.build_tower("decoder", config.model.decoder, "model.decoder",
                            vocab_size=vocab_size, max_length=context_length,
                            **models.common_kwargs(config.model))


def sequence_nll(logits, text):
  """(summed negative log-likelihood [N], real-token count [N]) of teacher-forced rows `text`
  [N, L] under `logits` [N, L, V] (position t predicts token t + 1; padding does not count)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = text[:, 1:]
  mask = (targets != PAD_ID).astype(jnp.float32)
  token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return -jnp.sum(token_logp * mask, axis=-1), jnp.sum(mask, axis=-1)


def caption_predict_fns(model) -> dict:
  """generate and caption_nll for any model with `image_tokens(images)` and
  `decode(image_tokens, text, decode=...)` (CoCa, Captioner)."""

  def generate(params, batch, *, max_len: int, bos_id: int, eos_id: int, pad_id: int = PAD_ID,
               beam_size: int = 1, length_penalty: float = 0.0, stop_at=None):
    """batch['image'] -> (tokens int32 [B, max_len], scores float32 [B]): greedy when
    beam_size == 1, else the best beam; both decode one token per step with the KV cache.
    `max_len` sizes the buffers; `stop_at` (may be traced) generated tokens, default max_len."""
    images = batch["image"]
    image_tokens = model.apply({"params": params}, images, method="image_tokens")
    size = images.shape[0]
    if beam_size > 1:   # example-major beams: rows i*K .. i*K+K-1 belong to example i
      image_tokens = jnp.repeat(image_tokens, beam_size, axis=0)
    cache = models.init_cache(model, {"params": params}, image_tokens, max_len)

    def logits_fn(tokens, cache):
      logits, mutated = model.apply({"params": params, "cache": cache}, image_tokens,
                                    tokens[:, None], decode=True, method="decode",
                                    mutable=["cache"])
      return logits[:, 0], mutated["cache"]

    kw = dict(batch_size=size, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
              stop_at=stop_at)
    if beam_size == 1:
      res = decoding.greedy(logits_fn, cache, **kw)
      return res.tokens, res.scores
    res = decoding.beam_search(logits_fn, cache, beam_size=beam_size, alpha=length_penalty,
                                 **kw)
    return res.tokens[:, 0], res.scores[:, 0]

  def caption_nll(params, batch):
    """Teacher-forced NLL of batch['captions'] [B, K, L] given batch['image']: per caption the
    summed negative log-likelihood and the number of real tokens, both [B, K]."""
    captions = batch["captions"]
    b, k, length = captions.shape
    image_tokens = model.apply({"params": params}, batch["image"], method="image_tokens")
    tokens = jnp.repeat(image_tokens, k, axis=0)
    text = captions.reshape(b * k, length)
    nll, count = sequence_nll(model.apply({"params": params}, tokens, text, method="decode"),
                              text)
    return nll.reshape(b, k), count.reshape(b, k)

  return {"generate": generate, "caption_nll": caption_nll}


def decoder_flops(config, vocab_size: int, length: int) -> float:
  m = config.model
  image = models.tower_module("image", m.image.name, "model.image.name")
  decoder = models.tower_module("decoder", m.decoder.name, "model.decoder.name")
  return decoder.forward_flops(m.decoder, vocab_size=vocab_size, length=length,
                               context_tokens=image.num_tokens(m.image),
                               context_width=image.width(m.image))


class CaptioningTask(base.Task):
  name = "captioning"
  description = "caption-only pretraining: image tower + cross-attention decoder"
  default_evals = "caption"
  towers = {"image": ("image", "vit"), "decoder": ("decoder", "cross_attention")}

  def loss_config(self):
    return caption_loss_config(1.0)

  def validate(self, config):
    d = config.model.decoder
    return [f"model.decoder.{field}: must be set for the captioning task (there is no text "
            f"tower to take it from)" for field in ("vocab_size", "context_length")
            if d.get(field) is None]

  def text_spec(self, config):
    d = config.model.decoder
    return base.TextSpec(vocab_size=int(d.vocab_size), context_length=int(d.context_length))

  def train_ops(self, config, tokenizer):
    return [ops.Caption(tokenizer, self.text_spec(config).context_length)]

  def build_model(self, config):
    spec = self.text_spec(config)
    image = models.build_tower("image", config.model.image, "model.image",
                               **models.common_kwargs(config.model))
    return models.Captioner(image=image,
                            decoder=build_decoder(config, spec.vocab_size, spec.context_length))

  def model_args(self, batch):
    return batch["image"], batch["text"]

  def objective(self, config, model):
    return base.Objective(
        forward=self.forward_fn(model),
        weights={"caption_loss": float(config.loss.caption_weight)},
        local_terms=caption_terms(config.loss))

  def predict_fns(self, config, model):
    fns = caption_predict_fns(model)
    fns["image_features"] = base.image_features_fn(model)
    return fns

  def forward_flops(self, config):
    m = config.model
    spec = self.text_spec(config)
    image = models.tower_module("image", m.image.name, "model.image.name")
    return image.forward_flops(m.image) + decoder_flops(config, spec.vocab_size,
                                                        spec.context_length)


TASK = CaptioningTask()
