"""big_vision SigLIP checkpoints (`.npz`, the two-tower layout big_vision writes) -> vlm_jax
TwoTower params.

big_vision saves the flattened parameter tree with '/'-joined names (optionally under
`params/`); its Flax kernels are already in our [in, out] / [in, heads, head_dim] layouts, so the
mapping is a renaming (plus dropping the leading 1 of the position embeddings):
    img/embedding/{kernel [p, p, 3, W], bias}      -> image/embedding
    img/pos_embedding [1, N, W]                    -> image/pos_embedding [N, W]
    img/Transformer/encoderblock_N/*               -> image/encoder/block_N/*
    img/Transformer/encoder_norm                   -> image/encoder/encoder_norm
    img/MAPHead_0/{probe [1, 1, W], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
                                                   -> image/map_head/{probe [1, W], attn, ln, mlp}
    txt/Embed_0/embedding [V, Wt]                  -> text/token_embedding/embedding
    txt/pos_embedding [1, L, Wt]                   -> text/pos_embedding [L, Wt]
    txt/Encoder_0/encoderblock_N/*, encoder_norm   -> text/encoder/block_N/*, encoder_norm
    txt/head/{kernel [Wt, D], bias}                -> text_projection
    t [1], b [1]                                   -> logit_scale, logit_bias
Block: LayerNorm_0 -> ln_1, MultiHeadDotProductAttention_0/{query,key,value,out} -> attn/*,
LayerNorm_1 -> ln_2, MlpBlock_0/Dense_0 / Dense_1 -> mlp/fc1 / fc2. A model trained with
`scan=True` stores one `encoderblock` whose arrays have a leading depth axis; both layouts are
read. Everything the architecture needs is in the shapes (heads from the attention kernels);
big_vision's ViT uses tanh-approximated GELU and LayerNorm eps 1e-6.
"""
from __future__ import annotations

import re

import numpy as np

from vlm_jax.convert import common
from vlm_jax.convert.configs import ClipArch, compare

_BLOCK = re.compile(r"^(img/Transformer|txt/Encoder_0)/encoderblock_(\d+)/")
TOWERS = {"img": "img/Transformer", "txt": "txt/Encoder_0"}


def strip_prefix(state: dict) -> dict:
  """Names without big_vision's leading 'params/' (present when the whole train state was
  flattened)."""
  if state and all(k.startswith("params/") for k in state):
    return {k[len("params/"):]: v for k, v in state.items()}
  return state


def unstack_scanned(state: dict) -> dict:
  """A scanned tower's `encoderblock/<name>` [depth, ...] -> `encoderblock_<i>/<name>`."""
  out = {}
  for k, v in state.items():
    tower = next((t for t in TOWERS.values() if k.startswith(f"{t}/encoderblock/")), None)
    if tower is None:
      out[k] = v
      continue
    rest = k[len(f"{tower}/encoderblock/"):]
    for i in range(np.shape(v)[0]):
      out[f"{tower}/encoderblock_{i}/{rest}"] = v[i]
  return out


def prepare(state: dict, source: str) -> dict:
  state = unstack_scanned(strip_prefix(state))
  if "img/embedding/kernel" not in state or "txt/Embed_0/embedding" not in state:
    hint = ""
    if any(k.startswith("vision_model.") for k in state):
      hint = "; it is a Hugging Face state dict: use --format hf"
    elif "visual.conv1.weight" in state:
      hint = "; it is an OpenAI/OpenCLIP state dict: use --format openclip"
    raise common.ConversionError(f"convert: {source} is not a big_vision two-tower checkpoint "
                                 f"(no 'img/embedding/kernel' and 'txt/Embed_0/embedding'){hint}")
  if "img/MAPHead_0/probe" not in state:
    raise common.ConversionError(f"convert: {source}: only MAP-head image towers (SigLIP) are "
                                 "supported; this checkpoint has no img/MAPHead_0")
  if "img/head/kernel" in state:
    raise common.ConversionError(f"convert: {source}: an image head (img/head, out_dim set for "
                                 "the image tower) is not supported; SigLIP embeds images with "
                                 "its MAP head")
  return state


def infer_arch(state: dict, source: str) -> ClipArch:
  """The whole architecture from the shapes of a prepared state."""
  try:
    p, _, _, width = state["img/embedding/kernel"].shape
    n_patches = state["img/pos_embedding"].shape[-2]
    _, heads, _ = state["img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/"
                        "kernel"].shape
    vocab, text_width = state["txt/Embed_0/embedding"].shape
    _, text_heads, _ = state["txt/Encoder_0/encoderblock_0/MultiHeadDotProductAttention_0/query/"
                             "kernel"].shape
    layers = {"img/Transformer": set(), "txt/Encoder_0": set()}
    for k in state:
      m = _BLOCK.match(k)
      if m:
        layers[m.group(1)].add(int(m.group(2)))
    grid = int(round(n_patches ** 0.5))
    if grid * grid != n_patches:
      raise common.ConversionError(f"convert: {source}: {n_patches} image positions is not a "
                                   "square grid")
    return ClipArch(
        embed_dim=int(state["txt/head/kernel"].shape[1]), image_size=int(grid * p),
        patch_size=int(p), vision_width=int(width), vision_layers=len(layers["img/Transformer"]),
        vision_heads=int(heads),
        vision_mlp=int(state["img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]),
        text_width=int(text_width), text_layers=len(layers["txt/Encoder_0"]),
        text_heads=int(text_heads),
        text_mlp=int(state["txt/Encoder_0/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]),
        vocab_size=int(vocab), context_length=int(state["txt/pos_embedding"].shape[-2]),
        vision_act="gelu_tanh", text_act="gelu_tanh", vision_ln_eps=1e-6, text_ln_eps=1e-6,
        family="siglip")
  except (KeyError, AttributeError, ValueError) as e:
    if isinstance(e, common.ConversionError):
      raise
    raise common.ConversionError(f"convert: {source} is not a complete big_vision SigLIP "
                                 f"checkpoint (cannot read {e})") from e


def _norm(r, prefix, width):
  return {"scale": r.get(f"{prefix}/scale", (width,)), "bias": r.get(f"{prefix}/bias", (width,))}


def _dense(r, prefix, n_in, n_out):
  return {"kernel": r.get(f"{prefix}/kernel", (n_in, n_out)),
          "bias": r.get(f"{prefix}/bias", (n_out,))}


def _attention(r, prefix, width, heads):
  hd = width // heads
  out = {n: {"kernel": r.get(f"{prefix}/{n}/kernel", (width, heads, hd)),
             "bias": r.get(f"{prefix}/{n}/bias", (heads, hd))} for n in ("query", "key", "value")}
  out["out"] = {"kernel": r.get(f"{prefix}/out/kernel", (heads, hd, width)),
                "bias": r.get(f"{prefix}/out/bias", (width,))}
  return out


def _mlp(r, prefix, width, mlp):
  return {"fc1": _dense(r, f"{prefix}/Dense_0", width, mlp),
          "fc2": _dense(r, f"{prefix}/Dense_1", mlp, width)}


def _encoder(r, tower, depth, width, heads, mlp):
  enc = {}
  for i in range(depth):
    b = f"{tower}/encoderblock_{i}"
    enc[f"block_{i}"] = {
        "ln_1": _norm(r, f"{b}/LayerNorm_0", width),
        "attn": _attention(r, f"{b}/MultiHeadDotProductAttention_0", width, heads),
        "ln_2": _norm(r, f"{b}/LayerNorm_1", width),
        "mlp": _mlp(r, f"{b}/MlpBlock_0", width, mlp),
    }
  enc["encoder_norm"] = _norm(r, f"{tower}/encoder_norm", width)
  return enc


def convert(state: dict, arch: ClipArch, *, source: str, model: str) -> dict:
  """Returns the TwoTower params (numpy) for a big_vision SigLIP state."""
  state = prepare(state, source)
  compare(arch, {k: getattr(infer_arch(state, source), k) for k in (
      "embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
      "vision_mlp", "text_width", "text_layers", "text_heads", "text_mlp", "vocab_size",
      "context_length")}, source, model)
  r = common.StateReader(state, source)
  w, p, wt, d = arch.vision_width, arch.patch_size, arch.text_width, arch.embed_dim
  image = {
      "embedding": {"kernel": r.get("img/embedding/kernel", (p, p, 3, w)),
                    "bias": r.get("img/embedding/bias", (w,))},
      "pos_embedding": r.get("img/pos_embedding", (1, arch.grid ** 2, w))[0],
      "encoder": _encoder(r, "img/Transformer", arch.vision_layers, w, arch.vision_heads,
                          arch.vision_mlp),
      "map_head": {
          "probe": r.get("img/MAPHead_0/probe", (1, 1, w))[0],
          "attn": _attention(r, "img/MAPHead_0/MultiHeadDotProductAttention_0", w,
                             arch.vision_heads),
          "ln": _norm(r, "img/MAPHead_0/LayerNorm_0", w),
          "mlp": _mlp(r, "img/MAPHead_0/MlpBlock_0", w, arch.vision_mlp),
      },
  }
  text = {
      "token_embedding": {"embedding": r.get("txt/Embed_0/embedding", (arch.vocab_size, wt))},
      "pos_embedding": r.get("txt/pos_embedding", (1, arch.context_length, wt))[0],
      "encoder": _encoder(r, "txt/Encoder_0", arch.text_layers, wt, arch.text_heads,
                          arch.text_mlp),
  }
  params = {"image": image, "text": text,
            "text_projection": _dense(r, "txt/head", wt, d),
            "logit_scale": r.get("t", ()), "logit_bias": r.get("b", ())}
  r.check(f"the {model} architecture (big_vision SigLIP layout)")
  return params
