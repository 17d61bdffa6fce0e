"""OpenAI CLIP's modified ResNet image tower (Radford et al. 2021, the RN50 / RN101 / RN50x4 ...
CLIP models), with BatchNorm.

It differs from the ResNet of `resnet.py` in three places:
  stem    three 3x3 convolutions (the first with stride 2; width/2, width/2, width channels),
          each followed by BN and ReLU, then a 2x2 average pool (not a 7x7 conv + max pool);
  blocks  "anti-aliased" bottlenecks: every convolution has stride 1 and a strided block
          average-pools after its 3x3 convolution (and before its 1x1 shortcut convolution);
  head    attention pooling: the mean of the final feature map, prepended to its positions, plus
          a learned position embedding, is the query of a multi-head attention over all of
          them, whose output projection maps to `output_dim` (the CLIP embedding size).

images [B, H, W, 3] -> (pooled [B, output_dim] = the attention output at the mean token,
tokens [B, (H/32)^2, output_dim] = the same attention's outputs at the positions, which is what
OpenAI's implementation computes and discards; a decoder may cross-attend to them).

BatchNorm works as in `resnet.py`: its running statistics are params that the train step
updates (see that module's docstring), so training, resume and sharding need nothing special.

Parameter names: stem_conv_<i>, stem_bn_<i> (i = 1..3), stage_<s>_block_<b>/{conv_1, bn_1,
conv_2, bn_2, conv_3, bn_3[, shortcut_conv, shortcut_bn]}, attn_pool/{pos_embedding [N+1, C],
attn/{query, key, value, out}} with C = width * 32.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers
from vlm_jax.models import resnet

Dtype = Any
REDUCTION = 32                  # the stem (x4) and three strided stages (x2 each)


def feature_width(cfg) -> int:
  """Channels of the last stage: width * 8 (stages) * 4 (bottleneck expansion)."""
  return int(cfg.width) * 32


def heads(cfg) -> int:
  """The attention pool's heads: `num_heads`, else OpenAI's rule (64-dim heads)."""
  return int(cfg.num_heads) or feature_width(cfg) // 64


def _pool(x: jax.Array, stride: int) -> jax.Array:
  """PyTorch's AvgPool2d(stride): non-overlapping windows, a ragged edge dropped."""
  if stride == 1:
    return x
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> [avg pool] -> 1x1 (x4 channels); the shortcut pools, then 1x1 + BN."""
  width: int
  stride: int
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name, **k: resnet.BatchNorm(self.bn_momentum, name=name, **k, **kw)
    out = self.width * 4
    y = nn.relu(bn("bn_1")(resnet.conv(self.width, 1, 1, "conv_1", kw)(x), train))
    y = nn.relu(bn("bn_2")(resnet.conv(self.width, 3, 1, "conv_2", kw)(y), train))
    y = _pool(y, self.stride)
    # The last BN of a block starts at zero (as OpenAI's initialisation): blocks start as the
    # identity.
    y = bn("bn_3", scale_init=nn.initializers.zeros_init())(
        resnet.conv(out, 1, 1, "conv_3", kw)(y), train)
    if self.stride != 1 or x.shape[-1] != out:
      x = bn("shortcut_bn")(resnet.conv(out, 1, 1, "shortcut_conv", kw)(_pool(x, self.stride)),
                            train)
    return nn.relu(x + y)


class AttentionPool(nn.Module):
  """Mean token + positions -> multi-head self-attention -> (mean token's output, positions')."""
  num_heads: int
  output_dim: int
  attention: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, c = tokens.shape[1], tokens.shape[2]
    mean = jnp.mean(tokens.astype(jnp.float32), axis=1, keepdims=True).astype(tokens.dtype)
    x = jnp.concatenate([mean, tokens], axis=1)
    pos = self.param("pos_embedding", layers.partitioned(nn.initializers.normal(c ** -0.5),
                                                         (None, "embed")),
                     (n + 1, c), self.param_dtype)
    x = x + jnp.asarray(pos, self.dtype)[None]
    x = layers.Attention(self.num_heads, out_features=self.output_dim, impl=self.attention,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(x)
    return x[:, 0], x[:, 1:]


class CLIPResNet(nn.Module):
  """See the module docstring. Built from `model.image` by `from_config`."""
  image_size: int
  blocks: tuple = (3, 4, 6, 3)
  width: int = 64
  num_heads: int = 32
  output_dim: int = 1024
  bn_momentum: float = 0.9
  attention: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images: expected [B, {self.image_size}, {self.image_size}, 3] "
                       f"(model.image.image_size), got {images.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = jnp.asarray(images, self.dtype)
    for i, (features, stride) in enumerate(((self.width // 2, 2), (self.width // 2, 1),
                                            (self.width, 1))):
      x = resnet.conv(features, 3, stride, f"stem_conv_{i + 1}", kw,
                      in_axis=None if i == 0 else "embed")(x)
      x = nn.relu(resnet.BatchNorm(self.bn_momentum, name=f"stem_bn_{i + 1}", **kw)(x, train))
    x = _pool(x, 2)
    for s, count in enumerate(self.blocks):
      for b in range(count):
        x = Bottleneck(self.width * 2 ** s, stride=2 if (s > 0 and b == 0) else 1,
                       bn_momentum=self.bn_momentum, name=f"stage_{s + 1}_block_{b}", **kw)(
                           x, train)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    return AttentionPool(self.num_heads, self.output_dim, attention=self.attention,
                         name="attn_pool", **kw)(tokens)


def default_config() -> ml_collections.ConfigDict:
  """`model.image` of an OpenAI CLIP modified ResNet (defaults: RN50)."""
  c = ml_collections.ConfigDict()
  c.name = "clip_resnet"
  c.image_size = 224             # a multiple of 32
  c.blocks = (3, 4, 6, 3)        # bottlenecks per stage: RN50 (3,4,6,3), RN101 (3,4,23,3), ...
  c.width = 64                   # stem / first-stage channels; x2 per stage, x4 out of a block
  c.num_heads = 0                # attention pool heads; 0 = width * 32 / 64 (OpenAI's rule)
  c.output_dim = 1024            # the attention pool's output = the pooled width
  c.bn_momentum = 0.9            # running statistics: momentum * old + (1 - momentum) * batch
  return c


def validate(cfg, prefix: str = "model.image") -> list:
  problems = []
  blocks = tuple(cfg.blocks)
  if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
    problems.append(f"{prefix}.blocks: {blocks} must be four positive block counts")
  if int(cfg.width) < 2 or int(cfg.width) % 2:
    problems.append(f"{prefix}.width: {cfg.width} must be an even number >= 2 (the stem's first "
                    "convolutions have width / 2 channels)")
  if int(cfg.image_size) < REDUCTION or int(cfg.image_size) % REDUCTION:
    problems.append(f"{prefix}.image_size: {cfg.image_size} must be a multiple of {REDUCTION} "
                    "(the attention pool's position embedding covers image_size / 32 squared "
                    "positions)")
  if int(cfg.width) >= 2 and feature_width(cfg) % heads(cfg):
    problems.append(f"{prefix}.num_heads: {heads(cfg)} does not divide the final features "
                    f"({feature_width(cfg)} = width * 32)")
  if int(cfg.output_dim) < 1:
    problems.append(f"{prefix}.output_dim: {cfg.output_dim} must be >= 1")
  return problems


def width(cfg) -> int:
  return int(cfg.output_dim)


def num_tokens(cfg) -> int:
  return (int(cfg.image_size) // REDUCTION) ** 2


def forward_flops(cfg) -> float:
  """Forward FLOPs (2 per multiply-add) of the convolutions and the attention pool, one image."""
  side, w = int(cfg.image_size) // 2, int(cfg.width)
  flops = 2 * side * side * 9 * (3 * w // 2 + (w // 2) ** 2 + w // 2 * w)
  side //= 2
  cin = w
  for s, count in enumerate(tuple(cfg.blocks)):
    c, out = w * 2 ** s, w * 2 ** s * 4
    for b in range(count):
      stride = 2 if (s > 0 and b == 0) else 1
      pooled = side // stride
      flops += 2 * side * side * (cin * c + 9 * c * c) + 2 * pooled * pooled * c * out
      if stride != 1 or cin != out:
        flops += 2 * pooled * pooled * cin * out
      side, cin = pooled, out
  n, d = side * side + 1, cin
  flops += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * int(cfg.output_dim)
  return float(flops)


def from_config(cfg, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                remat: bool | str = False, scan: bool = False, attention: str = "einsum",
                name: Optional[str] = None) -> CLIPResNet:
  """Builds the tower from `model.image` (`remat` and `scan` are Transformer options and do not
  apply; `attention` picks the attention pool's implementation)."""
  del remat, scan
  problems = validate(cfg)
  if problems:
    raise ValueError("; ".join(problems))
  return CLIPResNet(image_size=int(cfg.image_size), blocks=tuple(int(b) for b in cfg.blocks),
                    width=int(cfg.width), num_heads=heads(cfg), output_dim=int(cfg.output_dim),
                    bn_momentum=float(cfg.bn_momentum), attention=attention, dtype=dtype,
                    param_dtype=param_dtype, name=name)
