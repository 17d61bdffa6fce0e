"""LateFusion: pooled image features + pooled text features -> MLP -> classes.

images -> image tower -> pooled [B, Wimg] \
                                            concat -> Dense(hidden) -> GELU -> Dense(classes)
text   -> text tower  -> pooled [B, Wtxt] /

The classic VQA baseline shape (a CNN / ViT image vector and a BERT [CLS] vector fused late and
classified over the frequent answers). Towers come from the registry, so any image tower and any
text tower (`bert`, `transformer`) fit.

`__call__(images, text, *, train=False)` -> {'logits': [B, C] float32};
`question_logits(images, questions [B, Q, L])` -> [B, Q, C]: the image features computed once
and shared by the image's Q questions (the evaluation batch layout).
Parameter names: image/..., text/..., fusion_hidden/{kernel, bias}, head/{kernel, bias}.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

Dtype = Any


def from_config(model_config, num_classes: int) -> "LateFusion":
  """The towers of `config.model` (`image`, `text`) fused into `num_classes` outputs."""
  from vlm_jax import models  # pylint: disable=g-import-not-at-top  (the registry imports us)
  m = model_config
  common = models.common_kwargs(m)
  return LateFusion(
      image=models.build_tower("image", m.image, "model.image", **common),
      text=models.build_tower("text", m.text, "model.text", **common),
      num_classes=num_classes, hidden_dim=int(m.hidden_dim), dropout=float(m.dropout),
      dtype=common["dtype"], param_dtype=common["param_dtype"])


def forward_flops(model_config, num_classes: int) -> float:
  from vlm_jax import models  # pylint: disable=g-import-not-at-top
  m = model_config
  image = models.tower_module("image", m.image.name, "model.image.name")
  text = models.tower_module("text", m.text.name, "model.text.name")
  width = image.width(m.image) + text.width(m.text)
  return (image.forward_flops(m.image) + text.forward_flops(m.text)
          + 2 * int(m.hidden_dim) * (width + num_classes))


class LateFusion(nn.Module):
  """See the module docstring. Built by the vqa_classifier task."""
  image: Optional[nn.Module] = None
  text: Optional[nn.Module] = None
  num_classes: int = 100
  hidden_dim: int = 256
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    self.fusion_hidden = layers.dense(self.hidden_dim, ("embed", "mlp"), name="fusion_hidden",
                                      **kw)
    self.head = layers.dense(self.num_classes, ("mlp", "classes"), name="head", **kw)
    self.fusion_dropout = nn.Dropout(self.dropout)

  def _classify(self, image_features, text_features, train):
    x = jnp.concatenate([image_features.astype(self.dtype), text_features.astype(self.dtype)],
                        axis=-1)
    x = jax.nn.gelu(self.fusion_hidden(x), approximate=False)
    x = self.fusion_dropout(x, deterministic=not train)
    return self.head(x).astype(jnp.float32)

  def __call__(self, images: jax.Array, text: jax.Array, *, train: bool = False) -> dict:
    image_features, _ = self.image(images, train=train)
    text_features, _ = self.text(text, train=train)
    return dict(logits=self._classify(image_features, text_features, train))

  def question_logits(self, images: jax.Array, questions: jax.Array) -> jax.Array:
    """images [B, H, W, 3], questions [B, Q, L] -> logits [B, Q, C]."""
    b, q, length = questions.shape
    image_features, _ = self.image(images)
    text_features, _ = self.text(questions.reshape(b * q, length))
    image_features = jnp.repeat(image_features, q, axis=0)
    return self._classify(image_features, text_features, False).reshape(b, q, -1)
