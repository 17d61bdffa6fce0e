"""Prefix-LM vision-language model (PaliGemma / LLaVA shape): image tower -> projector -> image
tokens in front of a decoder-only LM's text.

    images -> image tower tokens [B, N, Wimg] -> projector -> [B, N, Wlm]
    [image tokens; prompt; bos answer eos] -> LM (full attention over image tokens + prompt,
    causal over the answer) -> logits over the text positions [B, L, vocab]

The text of one example is `prompt ids, bos, answer ids, eos, pad...` with `prompt_len` prompt
tokens (0 for a caption without prompt): bos marks where the answer starts, so generation
prefills [image tokens; prompt] in one pass and starts from bos like any caption decoder.

`__call__(images, text, prompt_len, *, train=False)` returns {'caption_logits': [B, L, V]};
position t predicts token t + 1. Methods: image_prefix(images) -> [B, N, Wlm],
image_features(images) -> pooled [B, Wimg], lm_step(prefix, tokens, ..., decode=True) for
prefill and one-token steps with the KV cache (`vlm_jax.models.lm`).
Parameter names: image/..., projector/{fc1[, fc2]}, lm/... .
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

Dtype = Any
PROJECTORS = ("linear", "mlp")


class Projector(nn.Module):
  """Image tokens -> LM width: one Dense ('linear') or Dense -> GELU -> Dense ('mlp')."""
  width: int
  kind: str = "mlp"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(self.width, ("joint", "embed"), name="fc1", **kw)(x)
    if self.kind == "mlp":
      x = jax.nn.gelu(x, approximate=False)
      x = layers.dense(self.width, ("mlp", "embed"), name="fc2", **kw)(x)
    return nn.with_logical_constraint(x, layers.ACT_AXES)


class PrefixLM(nn.Module):
  """See the module docstring. Built by the prefix_lm task."""
  image: Optional[nn.Module] = None       # an image tower returning (pooled, tokens)
  projector: Optional[nn.Module] = None
  lm: Optional[nn.Module] = None          # a vlm_jax.models.lm.LM

  def image_prefix(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    _, tokens = self.image(images, train=train)
    return self.projector(tokens)

  def image_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    pooled, _ = self.image(images, train=train)
    return pooled

  def lm_step(self, prefix, tokens, *, prefix_len=None, valid=None, decode=False,
              train=False) -> jax.Array:
    return self.lm(tokens, prefix=prefix, prefix_len=prefix_len, valid=valid, decode=decode,
                   train=train)

  def __call__(self, images: jax.Array, text: jax.Array, prompt_len: jax.Array, *,
               train: bool = False) -> dict:
    prefix = self.image_prefix(images, train=train)
    n = prefix.shape[1]
    logits = self.lm(text, prefix=prefix, prefix_len=n + prompt_len, train=train)
    return dict(caption_logits=logits)
