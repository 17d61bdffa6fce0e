"""Hugging Face `CLIPModel` state dicts -> vlm_jax TwoTower params.

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
"""
from __future__ import annotations

import re

from vlm_jax.convert import common
from vlm_jax.convert.configs import ClipArch, compare, grid_from_positions

# Buffers some transformers versions save; they hold arange(n) and carry no weights.
IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.")


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
    found = dict(
        vision_width=conv[0], patch_size=conv[-1],
        image_size=grid_from_positions(pos[0], source) * conv[-1],
        vision_mlp=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        embed_dim=state["visual_projection.weight"].shape[0],
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


def convert(state: dict, arch: ClipArch, *, source: str, model: str) -> dict:
  """Returns the TwoTower params (numpy) for `state`; raises ConversionError on any mismatch."""
  compare(arch, infer(state, source), source, model)
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
  text = {
      "token_embedding": {"embedding": r.get("text_model.embeddings.token_embedding.weight",
                                             (arch.vocab_size, wt))},
      "pos_embedding": r.get("text_model.embeddings.position_embedding.weight",
                             (arch.context_length, wt)),
      "encoder": encoder(r, "text_model", arch.text_layers, wt, arch.text_heads, arch.text_mlp,
                         "final_layer_norm"),
  }
  params = {
      "image": image,
      "text": text,
      "image_projection": common.dense(r.get("visual_projection.weight", (d, w))),
      "text_projection": common.dense(r.get("text_projection.weight", (d, wt))),
      "logit_scale": r.get("logit_scale", ()),
  }
  r.check(f"the {model} architecture (Hugging Face CLIPModel layout)")
  return params
