"""Hugging Face `CLIPModel` and `SiglipModel` state dicts -> vlm_jax TwoTower params.

Key names (N = layer index; every Linear is weight [out, in] + bias):
    vision_model.embeddings.patch_embedding.weight [W, 3, p, p] -> image/embedding/kernel
    vision_model.embeddings.class_embedding [W]                  -> image/cls
    vision_model.embeddings.position_embedding.weight            -> image/pos_embedding
    vision_model.pre_layrnorm (sic)                              -> image/ln_pre
    vision_model.encoder.layers.N.*                              -> image/encoder/block_N/*
    vision_model.post_layernorm                                  -> image/encoder/encoder_norm
    visual_projection.weight [D, W] (no bias)                    -> image_projection/kernel
    text_model.embeddings.token_embedding.weight                 -> text/token_embedding/embedding
    text_model.embeddings.position_embedding.weight              -> text/pos_embedding
    text_model.encoder.layers.N.*                                -> text/encoder/block_N/*
    text_model.final_layer_norm                                  -> text/encoder/encoder_norm
    text_projection.weight [D, Wt] (no bias)                     -> text_projection/kernel
    logit_scale                                                  -> logit_scale
Layer: self_attn.{q,k,v,out}_proj -> attn/{query,key,value,out}; layer_norm1/2 -> ln_1/ln_2;
mlp.fc1/fc2 -> mlp/fc1/fc2.

SiglipModel differs (see `convert_siglip`): a biased patch embedding, position embeddings for
the patches only, no class token / pre-LayerNorm / visual projection, and
    vision_model.head.probe [1, 1, W]                         -> image/map_head/probe [1, W]
    vision_model.head.attention.in_proj_{weight,bias} [3W..]  -> image/map_head/attn/{query,key,value}
    vision_model.head.attention.out_proj                      -> image/map_head/attn/out
    vision_model.head.layernorm, vision_model.head.mlp.fc1/2  -> image/map_head/ln, mlp/fc1/2
    text_model.head (weight [D, Wt] + bias)                   -> text_projection/{kernel,bias}
    logit_scale [1], logit_bias [1]                           -> logit_scale, logit_bias
"""
from __future__ import annotations

import math
import re

from vlm_jax.convert import common
from vlm_jax.convert.configs import ClipArch, compare, grid_from_positions

# Buffers some transformers versions save; they hold arange(n) and carry no weights.
IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.")


def is_siglip(state: dict) -> bool:
  return "vision_model.head.probe" in state


def infer(state: dict, source: str) -> dict:
  """Architecture fields readable from the shapes (heads and activations are not)."""
  if "vision_model.embeddings.patch_embedding.weight" not in state:
    if "visual.conv1.weight" in state:
      raise common.ConversionError(f"convert: {source} is an OpenAI/OpenCLIP state dict; use "
                                   "--format openclip")
    raise common.ConversionError(f"convert: {source} is not a Hugging Face CLIPModel state dict "
                                 "(no 'vision_model.embeddings.patch_embedding.weight')")
  try:
    conv = state["vision_model.embeddings.patch_embedding.weight"].shape
    pos = state["vision_model.embeddings.position_embedding.weight"].shape
    vocab, text_width = state["text_model.embeddings.token_embedding.weight"].shape
    siglip = is_siglip(state)
    grid = math.isqrt(pos[0]) if siglip else grid_from_positions(pos[0], source)
    found = dict(
        vision_width=conv[0], patch_size=conv[-1], image_size=grid * conv[-1],
        vision_mlp=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        embed_dim=(state["text_model.head.weight"] if siglip else
                   state["visual_projection.weight"]).shape[0],
        vocab_size=vocab, text_width=text_width,
        context_length=state["text_model.embeddings.position_embedding.weight"].shape[0],
        text_mlp=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
  except (KeyError, AttributeError, IndexError) as e:
    raise common.ConversionError(f"convert: {source} is not a complete Hugging Face CLIPModel "
                                 f"state dict (cannot read {e})") from e
  layers = {"vision_model": set(), "text_model": set()}
  for k in state:
    m = _LAYER.match(k)
    if m:
      layers[m.group(1)].add(int(m.group(2)))
  found["vision_layers"] = len(layers["vision_model"])
  found["text_layers"] = len(layers["text_model"])
  return {k: int(v) for k, v in found.items()}


def layer(r: common.StateReader, prefix: str, width: int, heads: int, mlp: int) -> dict:
  lin = lambda name, n_out, n_in: (r.get(f"{prefix}.{name}.weight", (n_out, n_in)),
                                   r.get(f"{prefix}.{name}.bias", (n_out,)))
  norm = lambda name: common.layer_norm(r.get(f"{prefix}.{name}.weight", (width,)),
                                        r.get(f"{prefix}.{name}.bias", (width,)))
  attn = [lin(f"self_attn.{n}_proj", width, width) for n in ("q", "k", "v", "out")]
  return {
      "ln_1": norm("layer_norm1"),
      "attn": common.attention(*attn, heads),
      "ln_2": norm("layer_norm2"),
      "mlp": {"fc1": common.dense(*lin("mlp.fc1", mlp, width)),
              "fc2": common.dense(*lin("mlp.fc2", width, mlp))},
  }


def encoder(r, tower, layers, width, heads, mlp, norm_name) -> dict:
  enc = {f"block_{i}": layer(r, f"{tower}.encoder.layers.{i}", width, heads, mlp)
         for i in range(layers)}
  enc["encoder_norm"] = common.layer_norm(r.get(f"{tower}.{norm_name}.weight", (width,)),
                                          r.get(f"{tower}.{norm_name}.bias", (width,)))
  return enc


def _check_family(state: dict, arch: ClipArch, source: str, model: str) -> None:
  if is_siglip(state) != arch.siglip:
    found = "a SiglipModel" if is_siglip(state) else "a CLIPModel"
    raise common.ConversionError(f"convert: {source} is {found} state dict but {model} "
                                 f"describes a {arch.family} model")


def text_tower(r: common.StateReader, arch: ClipArch) -> dict:
  """text_model.* -> our text tower (the same layout in CLIPModel and SiglipModel)."""
  wt = arch.text_width
  return {
      "token_embedding": {"embedding": r.get("text_model.embeddings.token_embedding.weight",
                                             (arch.vocab_size, wt))},
      "pos_embedding": r.get("text_model.embeddings.position_embedding.weight",
                             (arch.context_length, wt)),
      "encoder": encoder(r, "text_model", arch.text_layers, wt, arch.text_heads, arch.text_mlp,
                         "final_layer_norm"),
  }


def convert(state: dict, arch: ClipArch, *, source: str, model: str) -> dict:
  """Returns the TwoTower params (numpy) for `state`; raises ConversionError on any mismatch."""
  _check_family(state, arch, source, model)
  compare(arch, infer(state, source), source, model)
  if arch.siglip:
    return convert_siglip(state, arch, source=source, model=model)
  r = common.StateReader(state, source, ignore=IGNORED)
  w, p, wt, d = arch.vision_width, arch.patch_size, arch.text_width, arch.embed_dim
  emb = "vision_model.embeddings"
  image = {
      "embedding": {"kernel": common.conv_patch_kernel(
          r.get(f"{emb}.patch_embedding.weight", (w, 3, p, p)))},
      "cls": r.get(f"{emb}.class_embedding", (w,)),
      "pos_embedding": r.get(f"{emb}.position_embedding.weight", (arch.grid ** 2 + 1, w)),
      "ln_pre": common.layer_norm(r.get("vision_model.pre_layrnorm.weight", (w,)),
                                  r.get("vision_model.pre_layrnorm.bias", (w,))),
      "encoder": encoder(r, "vision_model", arch.vision_layers, w, arch.vision_heads,
                         arch.vision_mlp, "post_layernorm"),
  }
  text = text_tower(r, arch)
  params = {
      "image": image,
      "text": text,
      "image_projection": common.dense(r.get("visual_projection.weight", (d, w))),
      "text_projection": common.dense(r.get("text_projection.weight", (d, wt))),
      "logit_scale": r.get("logit_scale", ()),
  }
  r.check(f"the {model} architecture (Hugging Face CLIPModel layout)")
  return params


def map_head(r: common.StateReader, prefix: str, width: int, heads: int, mlp: int) -> dict:
  """SiglipMultiheadAttentionPoolingHead -> our MAPHead. torch's MultiheadAttention packs the
  q/k/v projections into one in_proj [3W, W] (in that order)."""
  in_w = r.get(f"{prefix}.attention.in_proj_weight", (3 * width, width))
  in_b = r.get(f"{prefix}.attention.in_proj_bias", (3 * width,))
  qkv = [(in_w[i * width:(i + 1) * width], in_b[i * width:(i + 1) * width]) for i in range(3)]
  out = (r.get(f"{prefix}.attention.out_proj.weight", (width, width)),
         r.get(f"{prefix}.attention.out_proj.bias", (width,)))
  lin = lambda name, n_out, n_in: common.dense(r.get(f"{prefix}.{name}.weight", (n_out, n_in)),
                                               r.get(f"{prefix}.{name}.bias", (n_out,)))
  return {
      "probe": r.get(f"{prefix}.probe", (1, 1, width)).reshape(1, width),
      "attn": common.attention(*qkv, out, heads),
      "ln": common.layer_norm(r.get(f"{prefix}.layernorm.weight", (width,)),
                              r.get(f"{prefix}.layernorm.bias", (width,))),
      "mlp": {"fc1": lin("mlp.fc1", mlp, width), "fc2": lin("mlp.fc2", width, mlp)},
  }


def convert_siglip(state: dict, arch: ClipArch, *, source: str, model: str) -> dict:
  """A SiglipModel state dict -> TwoTower params (image_proj=False, see the module docstring)."""
  r = common.StateReader(state, source, ignore=IGNORED)
  w, p, wt, d = arch.vision_width, arch.patch_size, arch.text_width, arch.embed_dim
  emb = "vision_model.embeddings"
  image = {
      "embedding": {
          "kernel": common.conv_patch_kernel(r.get(f"{emb}.patch_embedding.weight", (w, 3, p, p))),
          "bias": r.get(f"{emb}.patch_embedding.bias", (w,))},
      "pos_embedding": r.get(f"{emb}.position_embedding.weight", (arch.grid ** 2, w)),
      "encoder": encoder(r, "vision_model", arch.vision_layers, w, arch.vision_heads,
                         arch.vision_mlp, "post_layernorm"),
      "map_head": map_head(r, "vision_model.head", w, arch.vision_heads, arch.vision_mlp),
  }
  text = text_tower(r, arch)
  params = {
      "image": image,
      "text": text,
      "text_projection": common.dense(r.get("text_model.head.weight", (d, wt)),
                                      r.get("text_model.head.bias", (d,))),
      "logit_scale": r.get("logit_scale", ()),
      "logit_bias": r.get("logit_bias", ()),
  }
  r.check(f"the {model} architecture (Hugging Face SiglipModel layout)")
  return params
