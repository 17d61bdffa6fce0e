"""Classifier: an image tower with a linear head (the supervised half of the ViT recipe).

images -> image tower -> pooled [B, W] -> head (Dense W -> num_classes) -> logits [B, C] float32.

The head starts at zero by default (`head_zero_init`), as big_vision's fine-tuning recipes do:
the first steps then train the head without disturbing a pre-trained tower
(`--config.init_from=` a CLIP / CoCa workdir loads the `image/...` params).

`__call__(images, *, train=False)` returns {'logits': [B, C]} ({'features': [B, W]} when
num_classes is 0: a tower without a head); `image_features(images)` the
pooled features the head reads (linear probes use them).
Parameter names: image/..., head/{kernel [W, C], bias [C]}.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

Dtype = Any


class Classifier(nn.Module):
  """See the module docstring. Built by the classification task."""
  image: Optional[nn.Module] = None       # an image tower returning (pooled, tokens)
  num_classes: int = 1000
  head_zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def image_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    pooled, _ = self.image(images, train=train)
    return pooled

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict:
    if self.num_classes == 0:     # features only: no head (an imported ViTModel)
      return dict(features=self.image_features(images, train=train))
    init = nn.initializers.zeros_init() if self.head_zero_init else nn.initializers.lecun_normal()
    head = layers.dense(self.num_classes, ("embed", "classes"), use_bias=True, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="head", kernel_init=init)
    logits = head(self.image_features(images, train=train))
    return dict(logits=logits.astype(jnp.float32))
