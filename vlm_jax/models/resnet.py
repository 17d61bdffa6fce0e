"""ResNet image tower (He et al. 2016, the v1.5 variant: stride in the 3x3 convolution), with
BatchNorm.

images [B, H, W, 3] -> stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> 4 stages of residual
blocks (basic for depths 10 / 18 / 34, bottleneck x4 for 50 / 101 / 152; the first block of stages
2-4 halves the resolution) -> (pooled [B, C] = global average of the last feature map,
tokens [B, h*w, C] = its positions, what a decoder cross-attends to).

BatchNorm's running statistics are params named `running_mean` / `running_var`, kept out of the
optimizer (never updated by a gradient nor decayed, `optim.make_optimizer`) and replaced after
every applied train step by the batch statistics' moving average that the forward pass reports
(collection `stat_updates`, written by `vlm_jax.train_step`). Because they live with the params
they are sharded, checkpointed, restored on resume, averaged by the EMA and read by evaluation
and inference like any param. In training the batch statistics are those of the whole global
batch (the step is jitted over the mesh, so the mean is a global mean: BatchNorm synchronised
across devices); in evaluation the running statistics are used.

Parameter names: stem_conv, stem_bn, stage_<s>_block_<b>/{conv_1, bn_1, conv_2, bn_2
[, conv_3, bn_3], shortcut_conv, shortcut_bn}; a BN has scale, bias, running_mean,
running_var.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers

Dtype = Any
STAGES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}
STATS = ("running_mean", "running_var")
STAT_UPDATES = "stat_updates"     # = tasks.base.STAT_UPDATES: where new statistics are reported


def bottleneck(depth: int) -> bool:
  return depth >= 50


class BatchNorm(nn.Module):
  """BatchNorm over the last (channel) axis; running statistics are params (module docstring).

  Training normalises with the batch's mean and (biased) variance and reports the new running
  statistics, momentum * old + (1 - momentum) * batch (the variance unbiased, as PyTorch does),
  in the `stat_updates` collection; evaluation normalises with the running statistics.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones_init()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    names = ("mlp",)
    scale = self.param("scale", layers.partitioned(self.scale_init, names), (c,), self.param_dtype)
    bias = self.param("bias", layers.partitioned(nn.initializers.zeros_init(), names), (c,),
                      self.param_dtype)
    mean = self.param("running_mean", layers.partitioned(nn.initializers.zeros_init(), names),
                      (c,), self.param_dtype)
    var = self.param("running_var", layers.partitioned(nn.initializers.ones_init(), names),
                     (c,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      batch_mean = jnp.mean(xf, axis=axes)
      batch_var = jnp.mean(jnp.square(xf - batch_mean), axis=axes)
      n = x.size // c
      unbiased = batch_var * (n / max(n - 1, 1))
      m = self.momentum
      keep = lambda old, new: (m * jax.lax.stop_gradient(old)
                               + (1 - m) * jax.lax.stop_gradient(new)).astype(self.param_dtype)
      overwrite = dict(init_fn=lambda: None, reduce_fn=lambda _, new: new)
      self.sow(STAT_UPDATES, "running_mean", keep(mean, batch_mean), **overwrite)
      self.sow(STAT_UPDATES, "running_var", keep(var, unbiased), **overwrite)
      use_mean, use_var = batch_mean, batch_var
    else:
      use_mean, use_var = mean.astype(jnp.float32), var.astype(jnp.float32)
    y = (xf - use_mean) * jax.lax.rsqrt(use_var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


def conv(features: int, kernel: int, stride: int, name: str, kw: dict, in_axis="embed"):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, name=name,
                 kernel_init=layers.partitioned(
                     nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                     (None, None, in_axis, "mlp")), **kw)


class Block(nn.Module):
  """A residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4)."""
  width: int
  stride: int
  bottleneck: bool
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name, **k: BatchNorm(self.bn_momentum, name=name, **k, **kw)
    out = self.width * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(bn("bn_1")(conv(self.width, 1, 1, "conv_1", kw)(x), train))
      y = nn.relu(bn("bn_2")(conv(self.width, 3, self.stride, "conv_2", kw)(y), train))
      # The last BN of a block starts at zero: each block starts as the identity.
      y = bn("bn_3", scale_init=nn.initializers.zeros_init())(
          conv(out, 1, 1, "conv_3", kw)(y), train)
    else:
      y = nn.relu(bn("bn_1")(conv(self.width, 3, self.stride, "conv_1", kw)(x), train))
      y = bn("bn_2", scale_init=nn.initializers.zeros_init())(
          conv(out, 3, 1, "conv_2", kw)(y), train)
    if self.stride != 1 or x.shape[-1] != out:
      x = bn("shortcut_bn")(conv(out, 1, self.stride, "shortcut_conv", kw)(x), train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """See the module docstring. Built from `model.image` by `from_config`."""
  image_size: int
  depth: int = 50
  width: int = 64                # channels of the stem and the first stage (x2 per stage)
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images: expected [B, {self.image_size}, {self.image_size}, 3] "
                       f"(model.image.image_size), got {images.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.width, 7, 2, "stem_conv", kw, in_axis=None)(jnp.asarray(images, self.dtype))
    x = nn.relu(BatchNorm(self.bn_momentum, name="stem_bn", **kw)(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, blocks in enumerate(STAGES[self.depth]):
      for b in range(blocks):
        x = Block(self.width * 2 ** s, stride=2 if (s > 0 and b == 0) else 1,
                  bottleneck=bottleneck(self.depth), bn_momentum=self.bn_momentum,
                  name=f"stage_{s + 1}_block_{b}",
                  **kw)(x, train)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(self.dtype)
    return pooled, tokens


def default_config() -> ml_collections.ConfigDict:
  """`model.image` of a ResNet tower."""
  c = ml_collections.ConfigDict()
  c.name = "resnet"
  c.image_size = 224
  c.depth = 50                   # 10 | 18 | 34 (basic blocks) | 50 | 101 | 152 (bottlenecks)
  c.width = 64                   # stem / first-stage channels; x2 per stage
  c.bn_momentum = 0.9            # running statistics: momentum * old + (1 - momentum) * batch
  return c


def validate(cfg, prefix: str = "model.image") -> list:
  problems = []
  if int(cfg.depth) not in STAGES:
    problems.append(f"{prefix}.depth: {cfg.depth} is not a ResNet depth; expected one of "
                    f"{', '.join(map(str, STAGES))}")
  if int(cfg.width) < 1:
    problems.append(f"{prefix}.width: {cfg.width} must be >= 1")
  if int(cfg.image_size) < 32:
    problems.append(f"{prefix}.image_size: {cfg.image_size} is below 32, which the stem and the "
                    "three stride-2 stages reduce to nothing")
  return problems


def width(cfg) -> int:
  return int(cfg.width) * 8 * (4 if bottleneck(int(cfg.depth)) else 1)


def num_tokens(cfg) -> int:
  side = -(-int(cfg.image_size) // 32)
  return side * side


def forward_flops(cfg) -> float:
  """Forward FLOPs of the convolutions (2 per multiply-add) on one image."""
  side, w, depth = int(cfg.image_size), int(cfg.width), int(cfg.depth)
  side = -(-side // 2)
  flops = 2 * side * side * 7 * 7 * 3 * w
  side = -(-side // 2)
  cin = w
  for s, blocks in enumerate(STAGES[depth]):
    c = w * 2 ** s
    out = c * (4 if bottleneck(depth) else 1)
    for b in range(blocks):
      stride = 2 if (s > 0 and b == 0) else 1
      out_side = -(-side // stride)
      if bottleneck(depth):
        flops += 2 * side * side * cin * c + 2 * out_side ** 2 * (9 * c * c + c * out)
      else:
        flops += 2 * out_side ** 2 * (9 * cin * c + 9 * c * out)
      if stride != 1 or cin != out:
        flops += 2 * out_side ** 2 * cin * out
      side, cin = out_side, out
  return float(flops)


def from_config(cfg, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                remat: bool | str = False, scan: bool = False, attention: str = "einsum",
                name: Optional[str] = None) -> ResNet:
  """Builds the ResNet from `model.image` (`remat`, `scan`, `attention` are options of the
  Transformer towers and do not apply)."""
  del remat, scan, attention
  problems = validate(cfg)
  if problems:
    raise ValueError("; ".join(problems))
  return ResNet(image_size=int(cfg.image_size), depth=int(cfg.depth), width=int(cfg.width),
                bn_momentum=float(cfg.bn_momentum), dtype=dtype, param_dtype=param_dtype,
                name=name)
