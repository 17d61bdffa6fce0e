"""CLIP / SigLIP architectures: named OpenAI / OpenCLIP models, their description files, and the
vlm_jax config they become.

`ClipArch` holds everything that decides the parameter shapes and the forward pass. It comes
from a model name (`ViT-B-32`, ...), an OpenCLIP model-config JSON (`{"embed_dim": ...,
"quick_gelu": ..., "vision_cfg": {...}, "text_cfg": {...}}`) or a Hugging Face CLIP
`config.json`; the converter then checks it against the shapes found in the checkpoint.

The named models follow OpenCLIP's model configs: the `-quickgelu` variants (QuickGELU, which
OpenAI's own weights need) and the plain ones (exact GELU, used by most OpenCLIP/LAION
weights). All use LayerNorm eps 1e-5, a causal text tower pooled at its eos (the largest id),
vocabulary 49408, context 77, 64-dim vision heads and MLP ratio 4; the ViTs a class token with
`ln_pre`. RN50 / RN101 / RN50x4 / RN50x16 / RN50x64 have OpenAI's modified ResNet image tower
(`vlm_jax.models.clip_resnet`: 3-conv stem, anti-aliased strided bottlenecks, attention pooling
that projects to the embedding).

A SigLIP (`family='siglip'`, from a Hugging Face `SiglipModel` config.json; SigLIP 2's
fixed-resolution checkpoints have the same layout) differs: no class token and no ln_pre, a
biased patch embedding, MAP-head pooling that ends the image tower (no image projection, so
embed_dim is the vision width), a bidirectional text tower pooled at its last position with no
padding mask and a biased head, a learned logit bias, the sigmoid loss, an uncapped temperature,
gelu_tanh, LayerNorm eps 1e-6, and images resized whole to the square and scaled to [-1, 1].
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from vlm_jax.convert.common import ConversionError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FAMILIES = ("clip", "siglip")
# SigLIP never clips its temperature; a cap no trained model reaches keeps the field a float.
UNCAPPED_LOGIT_SCALE = 1e6


@dataclasses.dataclass(frozen=True)
class ClipArch:
  """A two-tower model: a ViT CLIP (OpenAI layout: class token, ln_pre, pre-LN blocks, plain
  projections), with family='siglip' a SigLIP (see the module docstring), or with
  `vision_blocks` set a CLIP whose image tower is OpenAI's modified ResNet (RN50, ...): then
  `vision_width` is its stem width, `vision_heads` its attention pool's heads, `patch_size` its
  total stride (32), `vision_layers` / `vision_mlp` are 0, and the attention pool projects to
  `embed_dim` (no separate image projection)."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp: int
  text_width: int
  text_layers: int
  text_heads: int
  text_mlp: int
  vocab_size: int = 49408
  context_length: int = 77
  vision_act: str = "gelu"
  text_act: str = "gelu"
  vision_ln_eps: float = 1e-5
  text_ln_eps: float = 1e-5
  family: str = "clip"            # 'clip' | 'siglip'
  # A CLIP whose eos is not its largest id (e.g. exported from vlm_jax with a SentencePiece
  # tokenizer) pools at its eos = the last token before the padding: the pad id, else None.
  text_pad_id: int | None = None
  vision_blocks: tuple = ()       # modified ResNet: bottlenecks per stage, e.g. (3, 4, 6, 3)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def resnet(self) -> bool:
    return bool(self.vision_blocks)

  @property
  def siglip(self) -> bool:
    return self.family == "siglip"

  def describe(self) -> dict:
    return dataclasses.asdict(self)


def _named(embed_dim, image_size, patch, vision_width, vision_layers, text_width, text_heads,
           text_layers, quick_gelu):
  act = "quick_gelu" if quick_gelu else "gelu"
  return ClipArch(
      embed_dim=embed_dim, image_size=image_size, patch_size=patch, vision_width=vision_width,
      vision_layers=vision_layers, vision_heads=vision_width // 64, vision_mlp=4 * vision_width,
      text_width=text_width, text_layers=text_layers, text_heads=text_heads,
      text_mlp=4 * text_width, vision_act=act, text_act=act)


def resnet_arch(embed_dim, image_size, blocks, width, text_width, text_heads, text_layers,
                act, *, head_width=64, vocab_size=49408, context_length=77) -> ClipArch:
  """A CLIP with OpenAI's modified ResNet image tower (OpenCLIP's `vision_cfg.layers` list)."""
  return ClipArch(
      embed_dim=embed_dim, image_size=image_size, patch_size=32, vision_width=width,
      vision_layers=0, vision_heads=width * 32 // head_width, vision_mlp=0,
      text_width=text_width, text_layers=text_layers, text_heads=text_heads,
      text_mlp=4 * text_width, vocab_size=vocab_size, context_length=context_length,
      vision_act=act, text_act=act, vision_blocks=tuple(int(b) for b in blocks))


NAMED_MODELS: dict[str, ClipArch] = {}
for _quick in (False, True):
  _suffix = "-quickgelu" if _quick else ""
  _act = "quick_gelu" if _quick else "gelu"
  NAMED_MODELS.update({
      f"ViT-B-32{_suffix}": _named(512, 224, 32, 768, 12, 512, 8, 12, _quick),
      f"ViT-B-16{_suffix}": _named(512, 224, 16, 768, 12, 512, 8, 12, _quick),
      f"ViT-L-14{_suffix}": _named(768, 224, 14, 1024, 24, 768, 12, 12, _quick),
      f"ViT-L-14-336{_suffix}": _named(768, 336, 14, 1024, 24, 768, 12, 12, _quick),
      # OpenAI's ResNet CLIPs (OpenAI's own weights need the -quickgelu variants).
      f"RN50{_suffix}": resnet_arch(1024, 224, (3, 4, 6, 3), 64, 512, 8, 12, _act),
      f"RN101{_suffix}": resnet_arch(512, 224, (3, 4, 23, 3), 64, 512, 8, 12, _act),
      f"RN50x4{_suffix}": resnet_arch(640, 288, (4, 6, 10, 6), 80, 640, 10, 12, _act),
      f"RN50x16{_suffix}": resnet_arch(768, 384, (6, 8, 18, 8), 96, 768, 12, 12, _act),
      f"RN50x64{_suffix}": resnet_arch(1024, 448, (3, 15, 36, 10), 128, 1024, 16, 12, _act),
  })


def arch_from_openclip_json(d: dict, source: str = "model config") -> ClipArch:
  """An OpenCLIP model-config dict (the format of open_clip's model_configs/*.json)."""
  try:
    v, t = d["vision_cfg"], d["text_cfg"]
    for cfg, keys in ((v, ("image_size", "layers", "width", "patch_size")),
                      (t, ("width", "heads", "layers"))):
      for k in keys:
        if k not in cfg:
          raise KeyError(k)
    unsupported = [f"vision_cfg.{k}" for k in ("timm_model_name", "hf_model_name") if v.get(k)]
    unsupported += [f"text_cfg.{k}" for k in ("hf_model_name",) if t.get(k)]
    if unsupported:
      raise ConversionError(f"convert: {source}: only ViT and modified-ResNet CLIP towers are "
                            f"supported; unsupported: {', '.join(unsupported)}")
    head_width = int(v.get("head_width", 64))
    width = int(v["width"])
    act = "quick_gelu" if d.get("quick_gelu", False) else "gelu"
    image_size = v["image_size"]
    if isinstance(image_size, (list, tuple)):
      if len(set(image_size)) != 1:
        raise ConversionError(f"convert: {source}: non-square image_size {image_size} is not "
                              "supported")
      image_size = image_size[0]
    if isinstance(v["layers"], (list, tuple)):      # OpenAI's modified ResNet
      if int(t.get("mlp_ratio", 4)) != 4:
        raise ConversionError(f"convert: {source}: text_cfg.mlp_ratio={t['mlp_ratio']} with a "
                              "ResNet image tower is not supported")
      return resnet_arch(int(d["embed_dim"]), int(image_size), v["layers"], width,
                         int(t["width"]), int(t["heads"]), int(t["layers"]), act,
                         head_width=head_width, vocab_size=int(t.get("vocab_size", 49408)),
                         context_length=int(t.get("context_length", 77)))
    return ClipArch(
        embed_dim=int(d["embed_dim"]), image_size=int(image_size), patch_size=int(v["patch_size"]),
        vision_width=width, vision_layers=int(v["layers"]), vision_heads=width // head_width,
        vision_mlp=int(round(width * float(v.get("mlp_ratio", 4.0)))),
        text_width=int(t["width"]), text_layers=int(t["layers"]), text_heads=int(t["heads"]),
        text_mlp=int(round(int(t["width"]) * float(t.get("mlp_ratio", 4.0)))),
        vocab_size=int(t.get("vocab_size", 49408)),
        context_length=int(t.get("context_length", 77)), vision_act=act, text_act=act)
  except KeyError as e:
    raise ConversionError(f"convert: {source}: not an OpenCLIP model config (missing {e})") from e


_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh"}


def arch_from_hf_config(d: dict, source: str = "config.json") -> ClipArch:
  """A Hugging Face CLIPConfig dict (config.json of a CLIPModel)."""
  try:
    v, t = d["vision_config"], d["text_config"]
    acts = {tower: _hf_act(cfg, tower, source, "quick_gelu")
            for tower, cfg in (("vision", v), ("text", t))}
    vocab = int(t.get("vocab_size", 49408))
    eos = t.get("eos_token_id", 2)
    pad = t.get("pad_token_id")
    text_pad_id = None
    if eos not in (2, vocab - 1):
      # HF pools at the first eos_token_id (or at the argmax id when it is the legacy 2).
      # vlm_jax pools at the argmax id (the same position when eos is the largest id) or at
      # the last token before the padding, the same position when padding has its own id.
      if pad is None or pad == eos:
        raise ConversionError(
            f"convert: {source}: text_config.eos_token_id={eos} is not the largest id "
            f"({vocab - 1}) and padding has no id of its own (pad_token_id={pad}); vlm_jax "
            "pools the text tower at the largest id or at the last token before the padding")
      text_pad_id = int(pad)
    return ClipArch(
        embed_dim=int(d.get("projection_dim", 512)), image_size=int(v.get("image_size", 224)),
        patch_size=int(v.get("patch_size", 32)), vision_width=int(v.get("hidden_size", 768)),
        vision_layers=int(v.get("num_hidden_layers", 12)),
        vision_heads=int(v.get("num_attention_heads", 12)),
        vision_mlp=int(v.get("intermediate_size", 3072)),
        text_width=int(t.get("hidden_size", 512)), text_layers=int(t.get("num_hidden_layers", 12)),
        text_heads=int(t.get("num_attention_heads", 8)),
        text_mlp=int(t.get("intermediate_size", 2048)), vocab_size=vocab,
        context_length=int(t.get("max_position_embeddings", 77)), vision_act=acts["vision"],
        text_act=acts["text"], vision_ln_eps=float(v.get("layer_norm_eps", 1e-5)),
        text_ln_eps=float(t.get("layer_norm_eps", 1e-5)), text_pad_id=text_pad_id)
  except KeyError as e:
    raise ConversionError(f"convert: {source}: not a Hugging Face CLIP config (missing {e})") from e


def _hf_act(cfg: dict, tower: str, source: str, default: str) -> str:
  act = cfg.get("hidden_act", default)
  if act not in _HF_ACTS:
    raise ConversionError(f"convert: {source}: {tower}_config.hidden_act={act!r} is not "
                          f"supported; expected one of {', '.join(_HF_ACTS)}")
  return _HF_ACTS[act]


def arch_from_hf_siglip_config(d: dict, source: str = "config.json") -> ClipArch:
  """A Hugging Face SiglipConfig dict (config.json of a SiglipModel; SigLIP 2's
  fixed-resolution checkpoints use the same model)."""
  v, t = d.get("vision_config") or {}, d.get("text_config") or {}
  if not v.get("vision_use_head", True):
    raise ConversionError(f"convert: {source}: vision_config.vision_use_head=false (no MAP head) "
                          "is not supported: a SiglipModel embeds images with its head")
  width = int(v.get("hidden_size", 768))
  text_width = int(t.get("hidden_size", 768))
  projection = int(t.get("projection_size") or text_width)
  if projection != width:
    raise ConversionError(f"convert: {source}: text_config.projection_size={projection} differs "
                          f"from vision_config.hidden_size={width}; the two embeddings of a "
                          "SiglipModel must have the same size")
  return ClipArch(
      embed_dim=width, image_size=int(v.get("image_size", 224)),
      patch_size=int(v.get("patch_size", 16)), vision_width=width,
      vision_layers=int(v.get("num_hidden_layers", 12)),
      vision_heads=int(v.get("num_attention_heads", 12)),
      vision_mlp=int(v.get("intermediate_size", 3072)),
      text_width=text_width, text_layers=int(t.get("num_hidden_layers", 12)),
      text_heads=int(t.get("num_attention_heads", 12)),
      text_mlp=int(t.get("intermediate_size", 3072)), vocab_size=int(t.get("vocab_size", 32000)),
      context_length=int(t.get("max_position_embeddings", 64)),
      vision_act=_hf_act(v, "vision", source, "gelu_pytorch_tanh"),
      text_act=_hf_act(t, "text", source, "gelu_pytorch_tanh"),
      vision_ln_eps=float(v.get("layer_norm_eps", 1e-6)),
      text_ln_eps=float(t.get("layer_norm_eps", 1e-6)), family="siglip")


def arch_from_hf_json(d: dict, source: str) -> ClipArch:
  """A Hugging Face config.json: a CLIPModel's or a SiglipModel's (by its model_type)."""
  model_type = d.get("model_type", "clip")
  if model_type == "siglip":
    return arch_from_hf_siglip_config(d, source)
  if model_type == "siglip2":
    raise ConversionError(f"convert: {source}: model_type 'siglip2' is SigLIP 2's NaFlex "
                          "(variable resolution) model, which is not supported; SigLIP 2's "
                          "fixed-resolution checkpoints (model_type 'siglip') are")
  if model_type != "clip":
    raise ConversionError(f"convert: {source}: model_type {model_type!r} is not supported; "
                          "expected 'clip' (CLIPModel) or 'siglip' (SiglipModel)")
  return arch_from_hf_config(d, source)


def resolve_arch(model: str | None, fmt: str, checkpoint: str) -> tuple[ClipArch, str]:
  """--model: a name from NAMED_MODELS or a JSON file (OpenCLIP model config or HF config.json).

  For --format hf without --model, the config.json next to the checkpoint is used (the layout of
  a Hugging Face model directory). Returns (arch, a description of where it came from).
  """
  if not model:
    if fmt != "hf":
      raise ConversionError(f"convert: --model is required for --format {fmt}: one of "
                            f"{', '.join(NAMED_MODELS)}, or an OpenCLIP model-config .json")
    model = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if not os.path.exists(model):
      raise ConversionError(f"convert: --format hf needs the model's config.json: none at "
                            f"{model}; pass --model PATH/config.json or a model name")
  if model in NAMED_MODELS:
    return NAMED_MODELS[model], model
  if model.endswith(".json") or os.path.isfile(model):
    if not os.path.isfile(model):
      raise ConversionError(f"convert: --model {model}: no such file")
    try:
      with open(model) as f:
        d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"convert: --model {model}: not a readable JSON file: {e}") from e
    if not isinstance(d, dict):
      raise ConversionError(f"convert: --model {model}: expected a JSON object")
    if "vision_config" in d and "text_config" in d:
      return arch_from_hf_json(d, model), model
    if "vision_cfg" in d and "text_cfg" in d:
      return arch_from_openclip_json(d, model), model
    raise ConversionError(f"convert: --model {model}: neither an OpenCLIP model config "
                          "(vision_cfg/text_cfg) nor a Hugging Face CLIPModel / SiglipModel "
                          "config (vision_config/text_config)")
  raise ConversionError(f"convert: --model {model!r}: unknown model; expected one of "
                        f"{', '.join(NAMED_MODELS)}, or a .json model description")


def compare(arch: ClipArch, found: dict, source: str, model: str) -> None:
  """Raises a ConversionError listing every field where the checkpoint's shapes disagree."""
  diffs = [f"{k}: {v} in the checkpoint, {getattr(arch, k)} in {model}"
           for k, v in found.items() if v != getattr(arch, k)]
  if diffs:
    raise ConversionError(f"convert: {source} is a different architecture than {model}:\n  " +
                          "\n  ".join(diffs))


def grid_from_positions(n_positions: int, source: str) -> int:
  """Side of the patch grid from the number of vision positions (patches + class token)."""
  grid = math.isqrt(max(n_positions - 1, 0))
  if grid * grid + 1 != n_positions:
    raise ConversionError(f"convert: {source}: {n_positions} vision positions is not a square "
                          "grid plus a class token")
  return grid


def to_config(arch: ClipArch, *, tokenizer_path: str | None = None):
  """The vlm_jax config of a converted model (complete, locked).

  The model fields reproduce the original forward pass exactly; data / evals defaults use the
  original's evaluation preprocessing (CLIP: OpenAI's bicubic resize of the short side, centre
  crop, OpenAI mean/std; SigLIP: the whole image resized, scaled to [-1, 1]).
  """
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top
  if arch.resnet:
    image = {"name": "clip_resnet", "image_size": arch.image_size,
             "blocks": arch.vision_blocks, "width": arch.vision_width,
             "num_heads": arch.vision_heads, "output_dim": arch.embed_dim}
  else:
    image = {"name": "vit", "variant": f"B/{arch.patch_size}", "image_size": arch.image_size,
             "width": arch.vision_width, "depth": arch.vision_layers,
             "num_heads": arch.vision_heads, "mlp_dim": arch.vision_mlp,
             "act": arch.vision_act, "ln_eps": arch.vision_ln_eps, "use_bias": True,
             "posemb": "learn"}
  text = {"name": "transformer", "vocab_size": arch.vocab_size,
          "context_length": arch.context_length, "width": arch.text_width,
          "depth": arch.text_layers, "num_heads": arch.text_heads, "mlp_dim": arch.text_mlp,
          "act": arch.text_act, "ln_eps": arch.text_ln_eps, "use_bias": True,
          # Neither original masks padding: OpenAI CLIP is causal and pooled at its eos (and its
          # pad id 0 is also a real token, the '!' byte symbol), SigLIP reads its last position
          # (padding, written as eos, included). -1 matches no token, so nothing is masked,
          # exactly as in the originals; the tokenizer still pads.
          "pad_id": -1}
  if arch.siglip:
    image.update(pool="map", class_token=False, ln_pre=False, patch_bias=True)
    text.update(causal=False, pool="last")
    model = {"embed_dim": arch.embed_dim, "proj_bias": True, "image_proj": False,
             "logit_scale_init": math.log(10.0), "logit_bias_init": -10.0,
             "max_logit_scale": UNCAPPED_LOGIT_SCALE}
    loss = {"contrastive": "sigmoid"}
    data = {"image_size": arch.image_size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "train_crop": "resize", "eval_crop": "resize"}
    # SigLIP's SentencePiece model pads with its eos ("sticky" eos), lower-cases and drops
    # punctuation (Hugging Face's SiglipTokenizer); a tokenizer.json carries its own rules.
    tokenizer = {"kind": "sentencepiece", "pad": "eos", "canonicalize": True}
  else:
    if not arch.resnet:
      image.update(pool="cls", class_token=True, ln_pre=True, patch_bias=False)
    text.update(causal=True, pool="eos")
    if arch.text_pad_id is not None:   # causal: masking the padding changes nothing before it
      text.update(pool="last", pad_id=arch.text_pad_id)
    model = {"embed_dim": arch.embed_dim, "proj_bias": False,
             # The ResNet's attention pool already projects to the embedding.
             "image_proj": not arch.resnet,
             "logit_scale_init": math.log(1 / 0.07), "max_logit_scale": 100.0}
    loss = {"contrastive": "softmax"}
    data = {"image_size": arch.image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD,
            "eval_crop": "openai"}
    tokenizer = {"kind": "bpe"}
  model.update(dtype="auto", image=image, text=text)
  tokenizer.update(vocab_size=arch.vocab_size, context_length=arch.context_length,
                   model_path=tokenizer_path)
  user = {"task": "contrastive", "model": model, "loss": loss, "data": data,
          "tokenizer": tokenizer, "evals": {"run": "zeroshot"}}
  return config_utils.complete(user, source="convert")
