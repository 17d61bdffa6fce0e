"""OpenAI / OpenCLIP state dicts (ViT CLIP) -> vlm_jax TwoTower params.

Key names (N = block index):
    visual.conv1.weight [W, 3, p, p]             -> image/embedding/kernel [p, p, 3, W] (no bias)
    visual.class_embedding [W]                   -> image/cls
    visual.positional_embedding [1 + g*g, W]     -> image/pos_embedding
    visual.ln_pre.{weight,bias}                  -> image/ln_pre/{scale,bias}
    visual.transformer.resblocks.N.*             -> image/encoder/block_N/*   (see `block`)
    visual.ln_post.{weight,bias}                 -> image/encoder/encoder_norm
    visual.proj [W, D]                           -> image_projection/kernel
    token_embedding.weight [V, Wt]               -> text/token_embedding/embedding
    positional_embedding [77, Wt]                -> text/pos_embedding
    transformer.resblocks.N.*                    -> text/encoder/block_N/*
    ln_final.{weight,bias}                       -> text/encoder/encoder_norm
    text_projection [Wt, D]                      -> text_projection/kernel
    logit_scale []                               -> logit_scale
Block: attn.in_proj_{weight,bias} (q, k, v stacked) -> attn/{query,key,value};
attn.out_proj -> attn/out; ln_1, ln_2; mlp.c_fc -> mlp/fc1; mlp.c_proj -> mlp/fc2.
Our `encoder_norm` applied to every token and pooled at the class token (image) / the eos
(text) equals OpenAI's `ln_post` / `ln_final` applied to the pooled token.
"""
from __future__ import annotations

import re

import numpy as np

from vlm_jax.convert import common
from vlm_jax.convert.configs import ClipArch, compare, grid_from_positions

# Entries OpenAI's release stores beside the weights (checked against the arch when present).
METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")


def infer(state: dict, source: str) -> dict:
  """Architecture fields readable from the shapes (heads are not: they come from the model)."""
  if "visual.conv1.weight" not in state:
    if any(k.startswith("vision_model.") for k in state):
      raise common.ConversionError(f"convert: {source} is a Hugging Face CLIPModel checkpoint; "
                                   "use --format hf")
    if any(k.startswith("visual.layer1.") or k.startswith("visual.trunk.") for k in state):
      raise common.ConversionError(f"convert: {source}: only ViT CLIP image towers are "
                                   "supported (this is a ResNet or timm tower)")
    raise common.ConversionError(f"convert: {source} is not an OpenAI/OpenCLIP CLIP state dict "
                                 "(no 'visual.conv1.weight')")
  try:
    conv = state["visual.conv1.weight"].shape
    found = dict(vision_width=conv[0], patch_size=conv[-1])
    pos = state["visual.positional_embedding"].shape
    found["image_size"] = grid_from_positions(pos[0], source) * conv[-1]
    found["vision_mlp"] = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    found["embed_dim"] = state["visual.proj"].shape[1]
    vocab, text_width = state["token_embedding.weight"].shape
    found.update(vocab_size=vocab, text_width=text_width,
                 context_length=state["positional_embedding"].shape[0],
                 text_mlp=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
  except (KeyError, AttributeError, IndexError) as e:
    raise common.ConversionError(f"convert: {source} is not a complete OpenAI/OpenCLIP ViT CLIP "
                                 f"state dict (cannot read {e})") from e
  layers = {"visual.": set(), "": set()}
  for k in state:
    m = _BLOCK.match(k)
    if m:
      layers[m.group(1) or ""].add(int(m.group(2)))
  found["vision_layers"] = len(layers["visual."])
  found["text_layers"] = len(layers[""])
  return {k: int(v) for k, v in found.items()}


def check_metadata(state: dict, arch: ClipArch, source: str) -> None:
  expected = dict(input_resolution=arch.image_size, context_length=arch.context_length,
                  vocab_size=arch.vocab_size)
  bad = [f"{k}={state[k]} (expected {v})" for k, v in expected.items()
         if k in state and int(state[k]) != v]
  if bad:
    raise common.ConversionError(f"convert: {source}: metadata disagrees with the model: " +
                                 ", ".join(bad))


def check_causal_mask(mask, name: str, source: str) -> None:
  """OpenAI's text blocks store their causal mask (0 on and below the diagonal, -inf above):
  vlm_jax's text tower builds the same mask, so it is checked and not converted."""
  if mask is None or not isinstance(mask, np.ndarray):
    return
  n = mask.shape[0] if mask.ndim == 2 else 0
  ok = (mask.ndim == 2 and mask.shape == (n, n) and
        np.all(mask[np.tril_indices(n)] == 0) and np.all(np.isneginf(mask[np.triu_indices(n, 1)])))
  if not ok:
    raise common.ConversionError(f"convert: {source}: {name} is not a causal attention mask; "
                                 "only causal text towers are supported")


def block(r: common.StateReader, prefix: str, width: int, heads: int, mlp: int) -> dict:
  """One residual block `prefix.*` -> {ln_1, attn, ln_2, mlp}."""
  g = lambda name, shape: r.get(f"{prefix}.{name}", shape)
  in_w, in_b = g("attn.in_proj_weight", (3 * width, width)), g("attn.in_proj_bias", (3 * width,))
  qkv = [(in_w[i * width:(i + 1) * width], in_b[i * width:(i + 1) * width]) for i in range(3)]
  out = (g("attn.out_proj.weight", (width, width)), g("attn.out_proj.bias", (width,)))
  return {
      "ln_1": common.layer_norm(g("ln_1.weight", (width,)), g("ln_1.bias", (width,))),
      "attn": common.attention(*qkv, out, heads),
      "ln_2": common.layer_norm(g("ln_2.weight", (width,)), g("ln_2.bias", (width,))),
      "mlp": {"fc1": common.dense(g("mlp.c_fc.weight", (mlp, width)), g("mlp.c_fc.bias", (mlp,))),
              "fc2": common.dense(g("mlp.c_proj.weight", (width, mlp)),
                                  g("mlp.c_proj.bias", (width,)))},
  }


def encoder(r, prefix, layers, width, heads, mlp, norm_prefix) -> dict:
  enc = {f"block_{i}": block(r, f"{prefix}.{i}", width, heads, mlp) for i in range(layers)}
  enc["encoder_norm"] = common.layer_norm(r.get(f"{norm_prefix}.weight", (width,)),
                                          r.get(f"{norm_prefix}.bias", (width,)))
  return enc


def convert(state: dict, arch: ClipArch, *, source: str, model: str) -> dict:
  """Returns the TwoTower params (numpy) for `state`; raises ConversionError on any mismatch."""
  compare(arch, infer(state, source), source, model)
  check_metadata(state, arch, source)
  masks = [k for k in state if k == "attn_mask" or k.endswith(".attn_mask")]
  for k in masks:
    check_causal_mask(state[k], k, source)
  r = common.StateReader(state, source, ignore=METADATA_KEYS + tuple(masks))
  w, p, wt = arch.vision_width, arch.patch_size, arch.text_width
  image = {
      "embedding": {"kernel": common.conv_patch_kernel(r.get("visual.conv1.weight", (w, 3, p, p)))},
      "cls": r.get("visual.class_embedding", (w,)),
      "pos_embedding": r.get("visual.positional_embedding", (arch.grid ** 2 + 1, w)),
      "ln_pre": common.layer_norm(r.get("visual.ln_pre.weight", (w,)),
                                  r.get("visual.ln_pre.bias", (w,))),
      "encoder": encoder(r, "visual.transformer.resblocks", arch.vision_layers, w,
                         arch.vision_heads, arch.vision_mlp, "visual.ln_post"),
  }
  text = {
      "token_embedding": {"embedding": r.get("token_embedding.weight", (arch.vocab_size, wt))},
      "pos_embedding": r.get("positional_embedding", (arch.context_length, wt)),
      "encoder": encoder(r, "transformer.resblocks", arch.text_layers, wt, arch.text_heads,
                         arch.text_mlp, "ln_final"),
  }
  params = {
      "image": image,
      "text": text,
      "image_projection": {"kernel": r.get("visual.proj", (w, arch.embed_dim))},
      "text_projection": {"kernel": r.get("text_projection", (wt, arch.embed_dim))},
      "logit_scale": r.get("logit_scale", ()),
  }
  r.check(f"the {model} architecture (OpenAI/OpenCLIP layout)")
  return params
