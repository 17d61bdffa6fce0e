"""Captioner: an image tower and a cross-attention decoder, no text tower (CapPa-style
caption-only pretraining).

The decoder reads the image tower's token sequence (patch tokens after the final LayerNorm) and
the caption with teacher forcing. Parameter names are CoCa's minus the text tower and the
projections (image/..., decoder/...), so a CoCa checkpoint initialises a Captioner and back.

`__call__(images, text, *, train=False)` returns
    caption_logits [B, L, vocab] float32; position t predicts token t+1.
Methods: image_tokens(images) -> [B, N, W], image_features(images) -> pooled [B, W],
decode(image_tokens, text, *, decode=False) -> logits (decode=True: one token per call with the
KV cache; see `vlm_jax.models.coca.init_cache`, which works for any model with `decode`).
"""
from typing import Optional

import flax.linen as nn
import jax


class CaptionMethods:
  """What a model with an image tower (`self.image`) and a decoder (`self.decoder`) offers for
  captioning; shared by Captioner and CoCa."""

  def image_tokens(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """images -> the image tower's token sequence [B, N, W] (decoder cross-attention input)."""
    _, tokens = self.image(images, train=train)
    return tokens

  def decode(self, image_tokens: jax.Array, text: jax.Array, *, decode: bool = False,
             train: bool = False, cache_length: Optional[int] = None) -> jax.Array:
    """Caption logits [B, L, vocab] float32 (decode=True: one token per call, KV cache of
    `cache_length` positions)."""
    return self.decoder(image_tokens, text, train=train, decode=decode,
                        cache_length=cache_length)


class Captioner(CaptionMethods, nn.Module):
  """See the module docstring. Built by the captioning task."""
  image: Optional[nn.Module] = None       # an image tower returning (pooled, tokens)
  decoder: Optional[nn.Module] = None     # a decoder.Decoder

  def image_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    pooled, _ = self.image(images, train=train)
    return pooled

  def __call__(self, images: jax.Array, text: jax.Array, *, train: bool = False) -> dict:
    return dict(caption_logits=self.decode(self.image_tokens(images, train=train), text,
                                           train=train))
