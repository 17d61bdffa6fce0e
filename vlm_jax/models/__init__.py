"""Flax Linen models: towers and decoders chosen by name, and the composite models tasks build.

Towers come from a registry by name (`config.model.image.name = 'vit'`); each entry is a module
with `default_config()` (its config section, `name` included), `from_config(cfg, ...)`,
`forward_flops(cfg, ...)` and `width(cfg)` (image towers also `num_tokens(cfg)`, what a decoder
cross-attends to). What a tower returns is its contract:

  image towers   images [B, H, W, 3] float -> (pooled [B, W], tokens [B, N, W])
  text towers    text [B, L] int ids      -> (pooled [B, W], tokens [B, L, W])
  decoders       (context tokens [B, N, Wc], text [B, L], decode=False) -> logits [B, L, V]
  language models  (tokens [B, T], prefix=[B, N, W], prefix_len, valid, decode=False)
                 -> logits [B, T, V]  (decoder-only, `lm.py`)

A new tower is a module with those three functions plus one line in `TOWERS`. The composite
models (TwoTower, CoCa, Captioner, Classifier, PrefixLM) are put together by the tasks
(`vlm_jax.tasks`), which know which towers they need.
"""
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import bert
from vlm_jax.models import clip_resnet
from vlm_jax.models import decoder
from vlm_jax.models import layers
from vlm_jax.models import lm
from vlm_jax.models import lstm
from vlm_jax.models import resnet
from vlm_jax.models import text
from vlm_jax.models import vit
from vlm_jax.models.captioner import Captioner
from vlm_jax.models.classifier import Classifier
from vlm_jax.models.coca import CoCa, init_cache
from vlm_jax.models.prefix_lm import PrefixLM, Projector
from vlm_jax.models.two_tower import TwoTower

# kind -> name -> tower module. The kind is the section's role (model.image, model.text,
# model.decoder); the name is the section's `name` field.
TOWERS = {
    "image": {"vit": vit, "resnet": resnet, "clip_resnet": clip_resnet},
    "text": {"transformer": text, "bert": bert},
    "decoder": {"cross_attention": decoder, "lstm": lstm},
    "lm": {"decoder_only": lm},
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def tower_module(kind: str, name: str, field: str):
  """The module registered as `name` for towers of `kind`; `field` names the config field in
  the error for an unknown name."""
  known = TOWERS[kind]
  if name not in known:
    raise ValueError(f"{field}: unknown {kind} tower {name!r}; known: {', '.join(sorted(known))}")
  return known[name]


def tower_config(kind: str, name: str, field: str = "") -> ml_collections.ConfigDict:
  """Default config section of the `kind` tower called `name`."""
  return tower_module(kind, name, field or f"model.{kind}.name").default_config()


def build_tower(kind: str, cfg, field: str, **kwargs):
  """Builds the tower described by the config section `cfg` (its `name` picks the module)."""
  return tower_module(kind, cfg.name, f"{field}.name").from_config(cfg, **kwargs)


def shared_config() -> ml_collections.ConfigDict:
  """Model fields every task has: numerics and memory options."""
  c = ml_collections.ConfigDict()
  c.dtype = "auto"               # compute dtype: 'auto' = bfloat16 on TPU/GPU, float32 on CPU
  c.param_dtype = "float32"
  c.remat = False                # nn.remat on every Transformer block
  c.remat_policy = "full"        # what remat keeps: 'full' (nothing) | 'dots' | 'dots_no_batch'
  c.attention = "einsum"         # 'einsum' (reference) | 'xla' | 'cudnn' | 'pallas' (TPU) | 'auto'
  c.scan = False                 # nn.scan over the Transformer blocks
  return c


def resolve_dtype(name: str, field: str = "model.dtype", backend: str = None):
  """'auto' -> bfloat16 on TPU/GPU, float32 on CPU; otherwise the named floating dtype."""
  if name == "auto":
    backend = backend or jax.default_backend()
    return jnp.float32 if backend == "cpu" else jnp.bfloat16
  if name not in _DTYPES:
    raise ValueError(f"{field}: unknown dtype {name!r}; expected one of auto, "
                     f"{', '.join(_DTYPES)}")
  return _DTYPES[name]


def common_kwargs(model_config) -> dict:
  """dtype / param_dtype / remat / scan for a tower's `from_config`, from `config.model`."""
  c = model_config
  policy = c.get("remat_policy") or "full"
  if policy not in layers.REMAT_POLICIES:
    raise ValueError(f"model.remat_policy: unknown policy {policy!r}; expected one of "
                     f"{', '.join(layers.REMAT_POLICIES)}")
  attention = c.get("attention") or "einsum"
  if attention not in layers.ATTENTION_IMPLS:
    raise ValueError(f"model.attention: unknown implementation {attention!r}; expected one of "
                     f"{', '.join(layers.ATTENTION_IMPLS)}")
  return dict(dtype=resolve_dtype(c.dtype, "model.dtype"),
              param_dtype=resolve_dtype(c.param_dtype, "model.param_dtype", backend="cpu"),
              remat=policy if c.remat else False, scan=bool(c.scan), attention=attention)


__all__ = ["TOWERS", "tower_module", "tower_config", "build_tower", "shared_config",
           "resolve_dtype", "common_kwargs", "init_cache", "CoCa", "TwoTower", "Captioner",
           "Classifier", "PrefixLM", "Projector", "vit", "resnet", "clip_resnet", "text", "bert",
           "decoder", "lstm", "lm"]
