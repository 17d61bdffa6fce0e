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

A ResNet CLIP (RN50, ...; image tower `clip_resnet`) has instead of the visual ViT keys
(S = stage 1..4, B = block; a BatchNorm's weight, bias, running_mean, running_var become
scale, bias, running_mean, running_var, and `num_batches_tracked` is not needed):
    visual.conv{1,2,3}.weight, visual.bn{1,2,3}.*  -> image/stem_conv_{1,2,3}, stem_bn_{1,2,3}
    visual.layerS.B.conv{1,2,3}, bn{1,2,3}          -> image/stage_S_block_B/conv_*, bn_*
    visual.layerS.B.downsample.{0,1}                -> .../shortcut_conv, shortcut_bn
                                                       (downsample.-1, the average pool, has
                                                       no weights)
    visual.attnpool.positional_embedding            -> image/attn_pool/pos_embedding
    visual.attnpool.{q,k,v,c}_proj                  -> image/attn_pool/attn/{query,key,value,out}
and no visual.proj: the attention pool's c_proj ends at the embedding size.
"""
from __future__ import annotations

import math
import re

import numpy as np

from vlm_jax.convert import common
from vlm_jax.convert.configs import ClipArch, compare, grid_from_positions
from vlm_jax.models import clip_resnet

# Entries OpenAI's release stores beside the weights (checked against the arch when present).
METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")


def is_resnet(state: dict) -> bool:
  return "visual.layer1.0.conv1.weight" in state


def infer(state: dict, source: str) -> dict:
  """Architecture fields readable from the shapes (heads are not: they come from the model)."""
  if "visual.conv1.weight" not in state:
    if any(k.startswith("vision_model.") for k in state):
      raise common.ConversionError(f"convert: {source} is a Hugging Face CLIPModel checkpoint; "
                                   "use --format hf")
    if any(k.startswith("visual.trunk.") for k in state):
      raise common.ConversionError(f"convert: {source}: a timm image tower is not supported "
                                   "(ViT and OpenAI's modified ResNet are)")
    raise common.ConversionError(f"convert: {source} is not an OpenAI/OpenCLIP CLIP state dict "
                                 "(no 'visual.conv1.weight')")
  kind = "ResNet" if is_resnet(state) else "ViT"
  try:
    found = _infer_resnet(state, source) if kind == "ResNet" else _infer_vit(state, source)
    vocab, text_width = state["token_embedding.weight"].shape
    found.update(vocab_size=vocab, text_width=text_width,
                 context_length=state["positional_embedding"].shape[0],
                 text_mlp=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
  except (KeyError, AttributeError, IndexError) as e:
    raise common.ConversionError(f"convert: {source} is not a complete OpenAI/OpenCLIP {kind} "
                                 f"CLIP state dict (cannot read {e})") from e
  layers = {"visual.": set(), "": set()}
  for k in state:
    m = _BLOCK.match(k)
    if m:
      layers[m.group(1) or ""].add(int(m.group(2)))
  if kind == "ViT":
    found["vision_layers"] = len(layers["visual."])
  found["text_layers"] = len(layers[""])
  return {k: (v if isinstance(v, tuple) else int(v)) for k, v in found.items()}


def _infer_vit(state: dict, source: str) -> dict:
  conv = state["visual.conv1.weight"].shape
  found = dict(vision_width=conv[0], patch_size=conv[-1])
  pos = state["visual.positional_embedding"].shape
  found["image_size"] = grid_from_positions(pos[0], source) * conv[-1]
  found["vision_mlp"] = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
  found["embed_dim"] = state["visual.proj"].shape[1]
  return found


def _infer_resnet(state: dict, source: str) -> dict:
  positions = state["visual.attnpool.positional_embedding"].shape[0]
  grid = math.isqrt(max(positions - 1, 0))
  if grid * grid + 1 != positions:
    raise common.ConversionError(f"convert: {source}: visual.attnpool.positional_embedding has "
                                 f"{positions} positions, not a square grid plus the mean token")
  blocks = []
  for s in range(1, 5):
    indices = {int(m.group(1)) for k in state
               for m in [re.match(rf"^visual\.layer{s}\.(\d+)\.", k)] if m}
    blocks.append(len(indices))
  return dict(vision_width=state["visual.conv3.weight"].shape[0],
              image_size=grid * clip_resnet.REDUCTION,
              embed_dim=state["visual.attnpool.c_proj.weight"].shape[0],
              vision_blocks=tuple(blocks))


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
  ignore = METADATA_KEYS + tuple(masks)
  if arch.resnet:
    ignore += tuple(k for k in state if k.endswith(".num_batches_tracked"))
  r = common.StateReader(state, source, ignore=ignore)
  w, wt = arch.vision_width, arch.text_width
  if arch.resnet:
    params = {"image": resnet_tower(r, arch)}
  else:
    params = {"image": vit_tower(r, arch),
              "image_projection": {"kernel": r.get("visual.proj", (w, arch.embed_dim))}}
  params.update({
      "text": {
          "token_embedding": {"embedding": r.get("token_embedding.weight",
                                                 (arch.vocab_size, wt))},
          "pos_embedding": r.get("positional_embedding", (arch.context_length, wt)),
          "encoder": encoder(r, "transformer.resblocks", arch.text_layers, wt, arch.text_heads,
                             arch.text_mlp, "ln_final"),
      },
      "text_projection": {"kernel": r.get("text_projection", (wt, arch.embed_dim))},
      "logit_scale": r.get("logit_scale", ()),
  })
  r.check(f"the {model} architecture (OpenAI/OpenCLIP layout)")
  return params


def vit_tower(r: common.StateReader, arch: ClipArch) -> dict:
  w, p = arch.vision_width, arch.patch_size
  return {
      "embedding": {"kernel": common.conv_patch_kernel(r.get("visual.conv1.weight", (w, 3, p, p)))},
      "cls": r.get("visual.class_embedding", (w,)),
      "pos_embedding": r.get("visual.positional_embedding", (arch.grid ** 2 + 1, w)),
      "ln_pre": common.layer_norm(r.get("visual.ln_pre.weight", (w,)),
                                  r.get("visual.ln_pre.bias", (w,))),
      "encoder": encoder(r, "visual.transformer.resblocks", arch.vision_layers, w,
                         arch.vision_heads, arch.vision_mlp, "visual.ln_post"),
  }


def resnet_tower(r: common.StateReader, arch: ClipArch) -> dict:
  """OpenAI's modified ResNet (`visual.*`) -> the `clip_resnet` tower's params."""
  def conv_bn(conv: str, bn: str, c_out: int, c_in: int, k: int):
    kernel = common.conv_patch_kernel(r.get(f"{conv}.weight", (c_out, c_in, k, k)))
    stats = {ours: r.get(f"{bn}.{theirs}", (c_out,)) for ours, theirs in (
        ("scale", "weight"), ("bias", "bias"), ("running_mean", "running_mean"),
        ("running_var", "running_var"))}
    return {"kernel": kernel}, stats

  w = arch.vision_width
  image = {}
  for i, (c_out, c_in) in enumerate(((w // 2, 3), (w // 2, w // 2), (w, w // 2))):
    image[f"stem_conv_{i + 1}"], image[f"stem_bn_{i + 1}"] = conv_bn(
        f"visual.conv{i + 1}", f"visual.bn{i + 1}", c_out, c_in, 3)
  c_in = w
  for s, count in enumerate(arch.vision_blocks):
    c = w * 2 ** s
    for b in range(count):
      theirs, ours = f"visual.layer{s + 1}.{b}", {}
      for i, (o, ci, k) in enumerate(((c, c_in, 1), (c, c, 3), (4 * c, c, 1))):
        ours[f"conv_{i + 1}"], ours[f"bn_{i + 1}"] = conv_bn(
            f"{theirs}.conv{i + 1}", f"{theirs}.bn{i + 1}", o, ci, k)
      if r.has(f"{theirs}.downsample.0.weight"):
        ours["shortcut_conv"], ours["shortcut_bn"] = conv_bn(
            f"{theirs}.downsample.0", f"{theirs}.downsample.1", 4 * c, c_in, 1)
      image[f"stage_{s + 1}_block_{b}"] = ours
      c_in = 4 * c
  pool = lambda name, shape: r.get(f"visual.attnpool.{name}", shape)
  proj = lambda name, out: (pool(f"{name}.weight", (out, c_in)), pool(f"{name}.bias", (out,)))
  image["attn_pool"] = {
      "pos_embedding": pool("positional_embedding", (arch.grid ** 2 + 1, c_in)),
      "attn": common.attention(proj("q_proj", c_in), proj("k_proj", c_in), proj("v_proj", c_in),
                               proj("c_proj", arch.embed_dim), arch.vision_heads),
  }
  return image
