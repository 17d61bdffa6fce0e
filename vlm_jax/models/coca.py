"""CoCa: contrastive two-tower + multimodal captioning decoder, from one forward pass.

The image tower runs once: its pooled output feeds the contrastive head, its token sequence
(the patch tokens after the final LayerNorm) is what the decoder cross-attends to. The decoder
has its own token/position embeddings and reads the caption with teacher forcing.

`__call__(images, text, *, train=False)` returns the TwoTower outputs plus
    caption_logits [B, L, vocab] float32; position t predicts token t+1.
Methods: encode_images, encode_texts (as TwoTower), image_tokens(images) -> [B, N, Wimg],
decode(image_tokens, text, *, decode=False) -> logits; for KV-cache generation see
`init_cache` and the decoder module docstring.
Parameter names: those of TwoTower plus decoder/....
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.captioner import CaptionMethods
from vlm_jax.models.two_tower import TwoTower


class CoCa(CaptionMethods, TwoTower):
  """CoCa; see the module docstring. Built by the coca task."""
  decoder: Optional[nn.Module] = None     # a decoder.Decoder

  def __call__(self, images: jax.Array, text: jax.Array, *, train: bool = False) -> dict:
    pooled, tokens = self.image(images, train=train)
    return dict(image_embed=self.embed_pooled_image(pooled),
                text_embed=self.encode_texts(text, train=train),
                caption_logits=self.decode(tokens, text, train=train),
                **self.logits_params())


def init_cache(model: nn.Module, variables: dict, image_tokens: jax.Array,
               max_length: int) -> dict:
  """The 'cache' collection for decoding with any model that has a
  `decode(image_tokens, text, decode=...)` method (CoCa, Captioner): zeroed self-attention
  buffers for `max_length` tokens, the position, and the cross-attention keys/values of
  `image_tokens`, computed here once (one call on a single dummy token). Pass it (with the params) to
  `model.apply(..., method='decode', decode=True, mutable=['cache'])`.
  """
  batch = image_tokens.shape[0]
  _, mutated = model.apply({"params": variables["params"]}, image_tokens,
                           jnp.zeros((batch, 1), jnp.int32), decode=True, method="decode",
                           cache_length=max_length, mutable=["cache"])
  return mutated["cache"]
