"""Flax Linen models: ViT and text towers, multimodal decoder, CLIP/SigLIP (TwoTower), CoCa.

`build_model(config.model)` is the one entry point the trainer, evals and tools use.
"""
import jax
import jax.numpy as jnp

from vlm_jax.models.coca import CoCa, init_cache
from vlm_jax.models.decoder import Decoder, decoder_from_config
from vlm_jax.models.text import TextTransformer, text_from_config
from vlm_jax.models.two_tower import TwoTower
from vlm_jax.models.vit import VARIANTS, ViT, parse_variant, vit_from_config

KINDS = ("clip", "siglip", "coca")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str, field: str = "model.dtype", backend: str = None):
  """'auto' -> bfloat16 on TPU/GPU, float32 on CPU; otherwise the named floating dtype."""
  if name == "auto":
    backend = backend or jax.default_backend()
    return jnp.float32 if backend == "cpu" else jnp.bfloat16
  if name not in _DTYPES:
    raise ValueError(f"{field}: unknown dtype {name!r}; expected one of auto, "
                     f"{', '.join(_DTYPES)}")
  return _DTYPES[name]


def build_model(model_config):
  """Builds the Linen module described by `config.model` (see configs/common.model_config).

  Returns a TwoTower (kind 'clip' / 'siglip') or a CoCa (kind 'coca'); raises ValueError naming
  the offending config field for anything invalid.
  """
  c = model_config
  if c.kind not in KINDS:
    raise ValueError(f"model.kind: unknown model kind {c.kind!r}; expected one of "
                     f"{', '.join(KINDS)}")
  dtype = resolve_dtype(c.dtype, "model.dtype")
  param_dtype = resolve_dtype(c.param_dtype, "model.param_dtype", backend="cpu")
  common = dict(dtype=dtype, param_dtype=param_dtype, remat=bool(c.remat), scan=bool(c.scan))
  kw = dict(
      image=vit_from_config(c.image, **common), text=text_from_config(c.text, **common),
      embed_dim=int(c.embed_dim), proj_bias=bool(c.proj_bias),
      logit_scale_init=float(c.logit_scale_init),
      logit_bias_init=None if c.logit_bias_init is None else float(c.logit_bias_init),
      max_logit_scale=float(c.max_logit_scale), dtype=dtype, param_dtype=param_dtype)
  if c.kind == "coca":
    decoder = decoder_from_config(c.decoder, vocab_size=c.text.vocab_size,
                                  max_length=c.text.context_length, **common)
    return CoCa(decoder=decoder, **kw)
  return TwoTower(**kw)


__all__ = ["build_model", "resolve_dtype", "init_cache", "CoCa", "TwoTower", "ViT",
           "TextTransformer", "Decoder", "VARIANTS", "parse_variant", "vit_from_config",
           "text_from_config", "decoder_from_config", "KINDS"]
