"""Vision Transformer image tower.

images [B, H, W, 3] -> conv patch embedding -> (+ class token) -> + position embedding
-> (ln_pre) -> pre-LN encoder with final LayerNorm -> pooling.

Returns `(pooled [B, width], tokens [B, N, width])`, where `tokens` are the N patch tokens after
the final LayerNorm (the class token, if any, is not included); a captioning decoder cross-attends
to them.

Parameter names under the tower:
    embedding/{kernel [p, p, 3, width], bias}   conv patch embedding
    cls [width]                                 class token (class_token=True)
    pos_embedding [N (+1), width]               learned position embedding (posemb='learn');
                                                with a class token it has N+1 rows, row 0 for it
    ln_pre/{scale,bias}                         (ln_pre=True)
    encoder/block_<i>/...  encoder/encoder_norm  see layers.py
    map_head/{probe, attn, ln, mlp}             (pool='map')

OpenAI CLIP's visual tower is: class_token=True, ln_pre=True, pool='cls', act='quick_gelu',
ln_eps=1e-5, patch_bias=False (its `ln_post` is our `encoder_norm`, which applied to the class
token gives exactly its pooled output).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.models import layers

Dtype = Any

# Published ViT sizes (Zhai et al. 2021, "Scaling Vision Transformers", Table 2; So400m from
# Alabdulmohsin et al. 2023), as big_vision names them: (width, depth, num_heads, mlp_dim).
VARIANTS = {
    "mu": (32, 1, 2, 128),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "So400m": (1152, 27, 16, 4304),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
}
POOLS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d")


def parse_variant(variant: str, field: str = "model.image.variant") -> dict:
  """'B/16' -> dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)."""
  name, sep, patch = str(variant).partition("/")
  if name not in VARIANTS:
    raise ValueError(f"{field}: unknown variant {variant!r}; expected <size>/<patch> with size "
                     f"one of {', '.join(VARIANTS)} (e.g. 'B/16')")
  if not sep or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f"{field}: variant {variant!r} needs a positive patch size, e.g. '{name}/16'")
  width, depth, num_heads, mlp_dim = VARIANTS[name]
  return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
              patch_size=int(patch))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine/cosine position table [h*w, width] (a quarter each: sin/cos of x and y)."""
  if width % 4:
    raise ValueError(f"model.image.width: posemb 'sincos2d' needs a width divisible by 4, "
                     f"got {width}")
  y, x = np.mgrid[:h, :w]
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned query attends to the tokens, then an MLP residual."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, width = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", layers.partitioned(nn.initializers.xavier_uniform(),
                                                   (None, "embed")), (1, width), self.param_dtype)
    probe = jnp.broadcast_to(jnp.asarray(probe, self.dtype)[None], (b, 1, width))
    y = layers.Attention(self.num_heads, use_bias=self.use_bias, name="attn", **kw)(
        probe, context=x)
    z = layers.layer_norm("ln", self.ln_eps, True, **kw)(y)
    y = y + layers.MLP(self.mlp_dim, act=self.act, use_bias=self.use_bias, name="mlp", **kw)(z)
    return y[:, 0]


class ViT(nn.Module):
  """Vision Transformer; see the module docstring. Built from `model.image` by `from_config`."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pool: str = "map"
  posemb: str = "learn"
  class_token: bool = False
  ln_pre: bool = False
  act: str = "gelu"
  ln_eps: float = 1e-6
  use_bias: bool = True
  patch_bias: bool = True
  dropout: float = 0.0
  patch_dropout: float = 0.0      # FLIP: the fraction of patch tokens dropped in training
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False      # False, or True / a name in layers.REMAT_POLICIES
  scan: bool = False
  attention: str = "einsum"       # a name in layers.ATTENTION_IMPLS

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    validate(self)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images: expected shape [B, {self.image_size}, {self.image_size}, 3] "
                       f"(model.image.image_size={self.image_size}), got {images.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = nn.Conv(
        self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                       (None, None, "patch", "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
        name="embedding", **kw)(jnp.asarray(images, self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    n = x.shape[1]

    if self.class_token:
      cls = self.param("cls", layers.partitioned(nn.initializers.normal(self.width ** -0.5),
                                                 ("embed",)), (self.width,), self.param_dtype)
      cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    num_tokens = x.shape[1]

    if self.posemb == "learn":
      pos = self.param("pos_embedding",
                       layers.partitioned(nn.initializers.normal(self.width ** -0.5),
                                          ("length", "embed")),
                       (num_tokens, self.width), self.param_dtype)
    else:   # 'sincos2d': fixed; the class token (if any) gets a zero position embedding.
      pos = posemb_sincos_2d(self.grid, self.grid, self.width)
      pos = np.concatenate([np.zeros((num_tokens - n, self.width), np.float32), pos])
    x = x + jnp.asarray(pos, self.dtype)[None]
    prefix = num_tokens - n
    if train and self.patch_dropout > 0:
      # After the position embedding, so the kept tokens still say where they are.
      x = keep_random_patches(x, prefix, kept_patches(n, self.patch_dropout),
                              self.make_rng("dropout"))
    x = nn.with_logical_constraint(x, layers.ACT_AXES)

    if self.ln_pre:
      x = layers.layer_norm("ln_pre", self.ln_eps, True, **kw)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = layers.Encoder(
        self.depth, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
        use_bias=self.use_bias, dropout=self.dropout, remat=self.remat, scan=self.scan,
        attention=self.attention, name="encoder", **kw)(x, train=train)

    tokens = x[:, prefix:]
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = jnp.mean(tokens, axis=1)
    else:   # 'map'
      pooled = MAPHead(self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                       use_bias=self.use_bias, name="map_head", **kw)(tokens)
    return pooled, tokens


def kept_patches(n: int, patch_dropout: float) -> int:
  """Patch tokens a training step keeps of `n` (at least one; open_clip's rounding)."""
  return max(1, int(n * (1.0 - patch_dropout)))


def keep_random_patches(x: jax.Array, prefix: int, keep: int, rng: jax.Array) -> jax.Array:
  """Patch dropout (FLIP, Li et al. 2023; open_clip's `patch_dropout`): x [B, prefix + n, W] ->
  [B, prefix + keep, W], the prefix (class) tokens and `keep` of the n patch tokens drawn
  without replacement, independently per example, in their original order. The encoder then
  costs about keep / n of its full-image FLOPs; evaluation sees every patch."""
  batch, n = x.shape[0], x.shape[1] - prefix
  _, chosen = jax.lax.top_k(jax.random.uniform(rng, (batch, n)), keep)
  chosen = jnp.sort(chosen, axis=1)
  patches = jnp.take_along_axis(x[:, prefix:], chosen[..., None], axis=1)
  return jnp.concatenate([x[:, :prefix], patches], axis=1)


def validate(vit: ViT, prefix: str = "model.image") -> None:
  """Raises ValueError naming the config field for any inconsistent setting."""
  if vit.pool not in POOLS:
    raise ValueError(f"{prefix}.pool: unknown pooling {vit.pool!r}; expected one of "
                     f"{', '.join(POOLS)}")
  if vit.pool == "cls" and not vit.class_token:
    raise ValueError(f"{prefix}.pool: 'cls' pooling needs {prefix}.class_token=True")
  if vit.posemb not in POSEMBS:
    raise ValueError(f"{prefix}.posemb: unknown position embedding {vit.posemb!r}; expected one "
                     f"of {', '.join(POSEMBS)}")
  if vit.image_size % vit.patch_size:
    raise ValueError(f"{prefix}.image_size: {vit.image_size} is not divisible by the patch size "
                     f"{vit.patch_size}")
  if vit.width % vit.num_heads:
    raise ValueError(f"{prefix}.num_heads: width {vit.width} is not divisible by num_heads "
                     f"{vit.num_heads}")
  if vit.posemb == "sincos2d" and vit.width % 4:
    raise ValueError(f"{prefix}.width: posemb 'sincos2d' needs a width divisible by 4, "
                     f"got {vit.width}")
  if not 0.0 <= vit.patch_dropout < 1.0:
    raise ValueError(f"{prefix}.patch_dropout: {vit.patch_dropout} is not a fraction in [0, 1) "
                     "of the patch tokens to drop in training (FLIP uses 0.5-0.75)")
  layers.get_activation(vit.act, f"{prefix}.act")


def default_config() -> ml_collections.ConfigDict:
  """`model.image` of a ViT tower. `variant` is `<size>/<patch>`; the widths/depths come from
  `VARIANTS` unless overridden here (width, depth, num_heads, mlp_dim)."""
  c = ml_collections.ConfigDict()
  c.name = "vit"
  c.variant = "mu/8"
  c.image_size = 32
  c.width = ml_collections.config_dict.placeholder(int)
  c.depth = ml_collections.config_dict.placeholder(int)
  c.num_heads = ml_collections.config_dict.placeholder(int)
  c.mlp_dim = ml_collections.config_dict.placeholder(int)
  c.pool = "map"                 # 'map' (attention pooling) | 'gap' | 'cls'
  c.posemb = "learn"             # 'learn' | 'sincos2d'
  c.class_token = False          # OpenAI CLIP: True (with pool='cls', ln_pre=True)
  c.ln_pre = False
  c.act = "gelu"                 # 'gelu' (exact) | 'gelu_tanh' | 'quick_gelu'
  c.ln_eps = 1e-6
  c.use_bias = True              # biases in attention / MLP
  c.patch_bias = True            # bias of the patch embedding (OpenAI CLIP: False)
  c.dropout = 0.0
  c.patch_dropout = 0.0          # FLIP: fraction of patch tokens dropped in training (0.5-0.75)
  return c


def sizes(cfg) -> dict:
  """width, depth, num_heads, mlp_dim and patch_size of `model.image`: the variant's, with the
  explicit fields (when not None) taking precedence."""
  out = parse_variant(cfg.variant)
  for key in ("width", "depth", "num_heads", "mlp_dim"):
    if cfg.get(key) is not None:
      out[key] = int(cfg[key])
  return out


def width(cfg) -> int:
  """Width of the pooled output and of the tokens."""
  return sizes(cfg)["width"]


def num_tokens(cfg) -> int:
  """Tokens the encoder sees: patches, plus the class token if any."""
  s = sizes(cfg)
  return (int(cfg.image_size) // s["patch_size"]) ** 2 + (1 if cfg.class_token else 0)


def forward_flops(cfg) -> float:
  """Forward matmul FLOPs of the tower on one training image (2 FLOPs per multiply-add): with
  patch dropout the encoder and pooling count the kept tokens."""
  s = sizes(cfg)
  width, patch, n = s["width"], s["patch_size"], num_tokens(cfg)
  f = 2 * n * patch * patch * 3 * width                                     # patch embedding
  patch_dropout = float(cfg.get("patch_dropout") or 0.0)
  if patch_dropout > 0:          # the encoder sees the class token and the kept patches
    cls = int(bool(cfg.class_token))
    n = cls + kept_patches(n - cls, patch_dropout)
  f += layers.encoder_flops(n, width, s["depth"], s["mlp_dim"], causal=False)
  if cfg.pool == "map":                                   # one query over the tokens, MLP on it
    f += 2 * (n * 2 * width * width + 2 * width * width + 2 * width * s["mlp_dim"] + 2 * n * width)
  return f


def from_config(cfg, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                remat: bool | str = False, scan: bool = False,
                attention: str = "einsum", name: Optional[str] = None) -> ViT:
  """Builds the ViT from `model.image` (see `default_config`)."""
  vit = ViT(
      image_size=int(cfg.image_size), pool=cfg.pool, posemb=cfg.posemb,
      class_token=bool(cfg.class_token), ln_pre=bool(cfg.ln_pre), act=cfg.act,
      ln_eps=float(cfg.ln_eps), use_bias=bool(cfg.use_bias),
      patch_bias=bool(cfg.get("patch_bias", cfg.use_bias)), dropout=float(cfg.dropout),
      patch_dropout=float(cfg.get("patch_dropout") or 0.0),
      dtype=dtype, param_dtype=param_dtype, remat=remat, scan=scan, attention=attention, name=name, **sizes(cfg))
  validate(vit)
  return vit
