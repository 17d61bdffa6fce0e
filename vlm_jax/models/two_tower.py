"""TwoTower: the CLIP / SigLIP image-text model.

image tower (ViT) -> pooled [B, Wimg] -> image_projection -> L2 normalise -> image_embed [B, D]
text tower        -> pooled [B, Wtxt] -> text_projection  -> L2 normalise -> text_embed  [B, D]

Top-level parameter names: image/..., text/..., image_projection/kernel [Wimg, D] and
text_projection/kernel [Wtxt, D] (plain matrices unless `proj_bias`; no image_projection when
`image_proj=False`, as in SigLIP, whose image tower ends in its MAP head), logit_scale (scalar,
log of the temperature's inverse), logit_bias (scalar; only when `logit_bias_init` is set, i.e.
SigLIP).

`__call__(images, text, *, train=False)` returns
    image_embed  [B, D] float32, unit L2 norm
    text_embed   [B, D] float32, unit L2 norm
    logit_scale  ()     float32, min(exp(logit_scale), max_logit_scale)
    logit_bias   ()     float32, the learned bias or 0.0
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

Dtype = Any


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Unit L2 norm along the last axis, computed in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class TwoTower(nn.Module):
  """CLIP / SigLIP; see the module docstring. Built by the contrastive task."""
  image: Optional[nn.Module] = None       # a vit.ViT
  text: Optional[nn.Module] = None        # a text.TextTransformer
  embed_dim: int = 512
  proj_bias: bool = False
  image_proj: bool = True                 # False: the pooled image features are the embedding
  logit_scale_init: float = 0.0
  logit_bias_init: Optional[float] = None
  max_logit_scale: float = 100.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    proj = lambda name: layers.dense(
        self.embed_dim, ("embed", "joint"), use_bias=self.proj_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name, kernel_init=nn.initializers.lecun_normal())
    if self.image_proj:
      self.image_projection = proj("image_projection")
    self.text_projection = proj("text_projection")
    self.log_scale = self.param(
        "logit_scale", layers.partitioned(nn.initializers.constant(self.logit_scale_init), ()),
        (), self.param_dtype)
    if self.logit_bias_init is not None:
      self.bias = self.param(
          "logit_bias", layers.partitioned(nn.initializers.constant(self.logit_bias_init), ()),
          (), self.param_dtype)

  def embed_pooled_image(self, pooled: jax.Array) -> jax.Array:
    """The image tower's pooled output [B, Wimg] -> L2-normalised float32 embeddings [B, D]."""
    return l2_normalize(self.image_projection(pooled) if self.image_proj else pooled)

  def encode_images(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] -> L2-normalised float32 embeddings [B, D]."""
    pooled, _ = self.image(images, train=train)
    return self.embed_pooled_image(pooled)

  def image_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """images -> the image tower's pooled output [B, Wimg], before the projection."""
    pooled, _ = self.image(images, train=train)
    return pooled

  def encode_texts(self, text: jax.Array, *, train: bool = False) -> jax.Array:
    """text [B, L] int token ids -> L2-normalised float32 embeddings [B, D]."""
    pooled, _ = self.text(text, train=train)
    return l2_normalize(self.text_projection(pooled))

  def logits_params(self) -> dict:
    """The temperature (exp of the log-param, capped) and the bias, as float32 scalars."""
    scale = jnp.minimum(jnp.exp(self.log_scale.astype(jnp.float32)), self.max_logit_scale)
    if self.logit_bias_init is not None:
      bias = self.bias.astype(jnp.float32)
    else:
      bias = jnp.zeros((), jnp.float32)
    return dict(logit_scale=scale, logit_bias=bias)

  def __call__(self, images: jax.Array, text: jax.Array, *, train: bool = False) -> dict:
    return dict(image_embed=self.encode_images(images, train=train),
                text_embed=self.encode_texts(text, train=train),
                **self.logits_params())
