"""Export a trained or imported CLIP / SigLIP to Hugging Face or OpenCLIP.

    python -m vlm_jax.export --workdir RUN --format hf --out DIR        # CLIPModel / SiglipModel
    python -m vlm_jax.export --workdir RUN --format openclip --out DIR  # OpenCLIP state dict
    options: --step N (default: the latest), --ema (the EMA weights), --towers-only (a CoCa's
             two towers without its caption decoder)

Outputs:
  hf        DIR/config.json (CLIPModel or SiglipModel), DIR/model.safetensors, and the
            tokenizer where its kind allows (tokenizer.json for 'hf'; vocab.json, merges.txt and
            tokenizer_config.json for OpenAI's BPE; spiece.model for a SentencePiece SigLIP
            tokenizer); `transformers.AutoModel.from_pretrained(DIR)`,
            `transformers.AutoTokenizer.from_pretrained(DIR)`.
  openclip  DIR/open_clip_model.safetensors (OpenAI / OpenCLIP key names) and
            DIR/open_clip_config.json ({"model_cfg": <an open_clip model config>}):
            `open_clip.create_model(..., pretrained=DIR/open_clip_model.safetensors)` with that
            config registered (`open_clip.add_model_config`). CLIPs only: OpenCLIP's SigLIPs
            use timm image towers.
  both      DIR/export.json: what was exported from which checkpoint, and what was left out.

The model must be representable exactly: every setting the target cannot express is named
before anything is written (a MAP-pooled CLIP has no CLIPModel, a SigLIP whose text tower masks
its padding has no SiglipModel, ...). Settings the target expresses with fixed weights are
written that way (no ln_pre -> an identity pre-LayerNorm; no patch bias -> zeros). Exporting then
importing back (`vlm_jax.convert`) gives bitwise the same params.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

FORMATS = ("hf", "openclip")
_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


class ExportError(ValueError):
  """A model the target format cannot represent (the message names every reason)."""


# ------------------------------------------------------------------------------------------------
# What can be exported.


def target_family(config) -> str:
  """'siglip' for a model in SigLIP's layout (no image projection, or a logit bias), else 'clip'."""
  m = config.model
  return "siglip" if (not m.get("image_proj", True) or m.get("logit_bias_init") is not None) \
      else "clip"


def problems(config, fmt: str, tokenizer=None, towers_only: bool = False) -> list:
  """Every reason `config`'s model cannot be written as `fmt` exactly (empty: it can)."""
  m, out = config.model, []
  if config.task not in ("contrastive", "coca"):
    return [f"task {config.task!r}: only two-tower models (contrastive, coca) can be exported"]
  if config.task == "coca" and not towers_only:
    out.append("task 'coca': its caption decoder (model.decoder) has no place in a two-tower "
               "model; pass --towers-only to export the image and text towers without it")
  if m.image.name != "vit" or m.text.name != "transformer":
    return out + [f"towers {m.image.name!r} / {m.text.name!r}: only vit + transformer export"]
  image, text = m.image, m.text
  if image.posemb != "learn":
    out.append(f"model.image.posemb={image.posemb!r}: the targets have learned position "
               "embeddings only")
  for tower in ("image", "text"):
    if not m[tower].use_bias:
      out.append(f"model.{tower}.use_bias=False: the targets' attention / MLP layers have biases")
  if target_family(config) == "siglip":
    if fmt == "openclip":
      out.append("a SigLIP-layout model (model.image_proj=False or a logit bias): OpenCLIP's "
                 "SigLIPs use timm image towers; export it with --format hf (SiglipModel)")
    if image.class_token or image.pool != "map" or image.ln_pre:
      out.append(f"model.image: SiglipModel pools with a MAP head over the patches (class_token="
                 f"False, pool='map', ln_pre=False), not class_token={image.class_token}, "
                 f"pool={image.pool!r}, ln_pre={image.ln_pre}")
    if m.image_proj:
      out.append("model.image_proj=True: SiglipModel has no image projection")
    if text.causal:
      out.append("model.text.causal=True: SiglipModel's text tower is bidirectional")
    if text.pool != "last" or int(text.pad_id) >= 0:
      out.append(f"model.text.pool={text.pool!r}, pad_id={text.pad_id}: SiglipModel reads the "
                 "last position with no padding mask (train with model.text.pool='last', "
                 "model.text.pad_id=-1 and tokenizer.pad='eos', as big_vision's SigLIP)")
  else:
    if not (image.class_token and image.pool == "cls"):
      out.append(f"model.image.pool={image.pool!r}, class_token={image.class_token}: CLIP towers "
                 "pool at a class token (pool='cls', class_token=True)")
    if image.patch_bias:
      out.append("model.image.patch_bias=True: CLIP's patch embedding has no bias")
    if m.proj_bias:
      out.append("model.proj_bias=True: CLIP's projections have no bias")
    if not text.causal:
      out.append("model.text.causal=False: CLIP's text tower is causal")
    if text.pool not in ("eos", "last"):
      out.append(f"model.text.pool={text.pool!r}: CLIP pools the text at its eos "
                 "(pool='eos' or 'last')")
    elif text.pool == "last" and tokenizer is None:
      out.append("model.text.pool='last' pools at the eos, whose id comes from the run's "
                 "tokenizer, and the run has none")
    elif (text.pool == "last" and fmt == "hf" and
          int(getattr(tokenizer, "eos_id", -1)) == 2):
      out.append("the tokenizer's eos id is 2, which transformers' CLIP reads as its legacy "
                 "argmax pooling; use pool='eos' with the eos as the largest id")
    if fmt == "openclip":
      acts = {image.act, text.act}
      if len(acts) > 1 or not acts <= {"gelu", "quick_gelu"}:
        out.append(f"activations {image.act!r} / {text.act!r}: OpenCLIP has one activation for "
                   "both towers, 'gelu' or 'quick_gelu'")
      for tower in ("image", "text"):
        if abs(float(m[tower].ln_eps) - 1e-5) > 1e-12:
          out.append(f"model.{tower}.ln_eps={m[tower].ln_eps}: OpenCLIP's LayerNorms use 1e-5")
  for tower in ("image", "text"):
    if m[tower].act not in _HF_ACT:
      out.append(f"model.{tower}.act={m[tower].act!r} has no Hugging Face equivalent")
  return out


# ------------------------------------------------------------------------------------------------
# Mapping vlm_jax params -> PyTorch state dicts (the inverses of vlm_jax.convert's mappings).


def _linear(p: dict, prefix: str, bias: bool = True) -> dict:
  """{'kernel' [in, out], 'bias'} -> torch Linear weight [out, in] (+ bias)."""
  out = {f"{prefix}.weight": np.ascontiguousarray(np.asarray(p["kernel"]).T)}
  if bias:
    out[f"{prefix}.bias"] = np.asarray(p["bias"])
  return out


def _norm(p: dict, prefix: str) -> dict:
  return {f"{prefix}.weight": np.asarray(p["scale"]), f"{prefix}.bias": np.asarray(p["bias"])}


def _attention_parts(p: dict) -> dict:
  """Our query/key/value [W, H, D] and out [H, D, W] -> torch (weight [W, W], bias [W])."""
  parts = {}
  for name in ("query", "key", "value"):
    k = np.asarray(p[name]["kernel"])
    parts[name] = (np.ascontiguousarray(k.reshape(k.shape[0], -1).T),
                   np.asarray(p[name]["bias"]).reshape(-1))
  k = np.asarray(p["out"]["kernel"])
  parts["out"] = (np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T), np.asarray(p["out"]["bias"]))
  return parts


def _hf_layer(p: dict, prefix: str) -> dict:
  out = {}
  parts = _attention_parts(p["attn"])
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                       ("out", "out_proj")):
    out[f"{prefix}.self_attn.{theirs}.weight"], out[f"{prefix}.self_attn.{theirs}.bias"] = \
        parts[ours]
  out.update(_norm(p["ln_1"], f"{prefix}.layer_norm1"))
  out.update(_norm(p["ln_2"], f"{prefix}.layer_norm2"))
  out.update(_linear(p["mlp"]["fc1"], f"{prefix}.mlp.fc1"))
  out.update(_linear(p["mlp"]["fc2"], f"{prefix}.mlp.fc2"))
  return out


def _hf_encoder(enc: dict, tower: str, depth: int, norm_name: str) -> dict:
  out = {}
  for i in range(depth):
    out.update(_hf_layer(enc[f"block_{i}"], f"{tower}.encoder.layers.{i}"))
  out.update(_norm(enc["encoder_norm"], f"{tower}.{norm_name}"))
  return out


def _identity_norm(width: int) -> dict:
  return {"scale": np.ones((width,), np.float32), "bias": np.zeros((width,), np.float32)}


def _patch_weight(kernel) -> np.ndarray:
  """Flax Conv kernel [p, p, 3, W] -> torch Conv2d weight [W, 3, p, p]."""
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def to_hf_clip(params: dict, config) -> dict:
  m, img, txt = config.model, params["image"], params["text"]
  width = int(np.asarray(img["pos_embedding"]).shape[-1])
  e = "vision_model.embeddings"
  state = {f"{e}.patch_embedding.weight": _patch_weight(img["embedding"]["kernel"]),
           f"{e}.class_embedding": np.asarray(img["cls"]),
           f"{e}.position_embedding.weight": np.asarray(img["pos_embedding"])}
  state.update(_norm(img.get("ln_pre") or _identity_norm(width), "vision_model.pre_layrnorm"))
  state.update(_hf_encoder(img["encoder"], "vision_model", _sizes(config)["depth"],
                           "post_layernorm"))
  state.update(_linear(params["image_projection"], "visual_projection", bias=False))
  state["text_model.embeddings.token_embedding.weight"] = np.asarray(
      txt["token_embedding"]["embedding"])
  state["text_model.embeddings.position_embedding.weight"] = np.asarray(txt["pos_embedding"])
  state.update(_hf_encoder(txt["encoder"], "text_model", int(m.text.depth), "final_layer_norm"))
  state.update(_linear(params["text_projection"], "text_projection", bias=False))
  state["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
  return state


def to_hf_siglip(params: dict, config) -> dict:
  m, img, txt = config.model, params["image"], params["text"]
  width = int(np.asarray(img["pos_embedding"]).shape[-1])
  e = "vision_model.embeddings"
  state = {f"{e}.patch_embedding.weight": _patch_weight(img["embedding"]["kernel"]),
           f"{e}.patch_embedding.bias": np.asarray(img["embedding"].get(
               "bias", np.zeros((width,), np.float32))),
           f"{e}.position_embedding.weight": np.asarray(img["pos_embedding"])}
  state.update(_hf_encoder(img["encoder"], "vision_model", _sizes(config)["depth"],
                           "post_layernorm"))
  head, h = img["map_head"], "vision_model.head"
  parts = _attention_parts(head["attn"])
  state[f"{h}.probe"] = np.asarray(head["probe"]).reshape(1, 1, width)
  state[f"{h}.attention.in_proj_weight"] = np.concatenate(
      [parts[n][0] for n in ("query", "key", "value")])
  state[f"{h}.attention.in_proj_bias"] = np.concatenate(
      [parts[n][1] for n in ("query", "key", "value")])
  state[f"{h}.attention.out_proj.weight"], state[f"{h}.attention.out_proj.bias"] = parts["out"]
  state.update(_norm(head["ln"], f"{h}.layernorm"))
  state.update(_linear(head["mlp"]["fc1"], f"{h}.mlp.fc1"))
  state.update(_linear(head["mlp"]["fc2"], f"{h}.mlp.fc2"))
  state["text_model.embeddings.token_embedding.weight"] = np.asarray(
      txt["token_embedding"]["embedding"])
  state["text_model.embeddings.position_embedding.weight"] = np.asarray(txt["pos_embedding"])
  state.update(_hf_encoder(txt["encoder"], "text_model", int(m.text.depth), "final_layer_norm"))
  proj = dict(params["text_projection"])
  proj.setdefault("bias", np.zeros((int(m.embed_dim),), np.float32))
  state.update(_linear(proj, "text_model.head"))
  state["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(1)
  state["logit_bias"] = np.asarray(params.get("logit_bias", 0.0), np.float32).reshape(1)
  return state


def _openclip_block(p: dict, prefix: str) -> dict:
  parts = _attention_parts(p["attn"])
  out = {f"{prefix}.attn.in_proj_weight": np.concatenate(
             [parts[n][0] for n in ("query", "key", "value")]),
         f"{prefix}.attn.in_proj_bias": np.concatenate(
             [parts[n][1] for n in ("query", "key", "value")])}
  out[f"{prefix}.attn.out_proj.weight"], out[f"{prefix}.attn.out_proj.bias"] = parts["out"]
  out.update(_norm(p["ln_1"], f"{prefix}.ln_1"))
  out.update(_norm(p["ln_2"], f"{prefix}.ln_2"))
  out.update(_linear(p["mlp"]["fc1"], f"{prefix}.mlp.c_fc"))
  out.update(_linear(p["mlp"]["fc2"], f"{prefix}.mlp.c_proj"))
  return out


def to_openclip(params: dict, config) -> dict:
  m, img, txt = config.model, params["image"], params["text"]
  state = {"visual.conv1.weight": _patch_weight(img["embedding"]["kernel"]),
           "visual.class_embedding": np.asarray(img["cls"]),
           "visual.positional_embedding": np.asarray(img["pos_embedding"])}
  if "ln_pre" in img:
    state.update(_norm(img["ln_pre"], "visual.ln_pre"))
  for i in range(_sizes(config)["depth"]):
    state.update(_openclip_block(img["encoder"][f"block_{i}"],
                                 f"visual.transformer.resblocks.{i}"))
  state.update(_norm(img["encoder"]["encoder_norm"], "visual.ln_post"))
  state["visual.proj"] = np.asarray(params["image_projection"]["kernel"])
  state["token_embedding.weight"] = np.asarray(txt["token_embedding"]["embedding"])
  state["positional_embedding"] = np.asarray(txt["pos_embedding"])
  for i in range(int(m.text.depth)):
    state.update(_openclip_block(txt["encoder"][f"block_{i}"], f"transformer.resblocks.{i}"))
  state.update(_norm(txt["encoder"]["encoder_norm"], "ln_final"))
  state["text_projection"] = np.asarray(params["text_projection"]["kernel"])
  state["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
  return state


# ------------------------------------------------------------------------------------------------
# Model descriptions.


def _sizes(config):
  from vlm_jax.models import vit  # pylint: disable=g-import-not-at-top
  return vit.sizes(config.model.image)


def text_eos_id(config, tokenizer) -> int:
  """The id the exported text tower pools at: the largest id for pool='eos' (argmax), else the
  tokenizer's eos."""
  if config.model.text.pool == "eos":
    return int(config.model.text.vocab_size) - 1
  return int(tokenizer.eos_id)


def _hf_towers(config, family: str) -> tuple[dict, dict]:
  """The fields CLIPModel's and SiglipModel's text / vision configs share."""
  m, s = config.model, _sizes(config)
  text = {"model_type": f"{family}_text_model", "vocab_size": int(m.text.vocab_size),
          "hidden_size": int(m.text.width), "intermediate_size": int(m.text.mlp_dim),
          "num_hidden_layers": int(m.text.depth), "num_attention_heads": int(m.text.num_heads),
          "max_position_embeddings": int(m.text.context_length),
          "hidden_act": _HF_ACT[m.text.act], "layer_norm_eps": float(m.text.ln_eps)}
  vision = {"model_type": f"{family}_vision_model", "hidden_size": s["width"],
            "intermediate_size": s["mlp_dim"], "num_hidden_layers": s["depth"],
            "num_attention_heads": s["num_heads"], "image_size": int(m.image.image_size),
            "patch_size": s["patch_size"], "hidden_act": _HF_ACT[m.image.act],
            "layer_norm_eps": float(m.image.ln_eps)}
  return text, vision


def hf_clip_config(config, tokenizer) -> dict:
  m = config.model
  text, vision = _hf_towers(config, "clip")
  text.update(projection_dim=int(m.embed_dim), eos_token_id=text_eos_id(config, tokenizer),
              bos_token_id=int(getattr(tokenizer, "bos_id", -1)) if tokenizer else None,
              pad_token_id=int(getattr(tokenizer, "pad_id", 0)) if tokenizer else 0)
  vision.update(projection_dim=int(m.embed_dim))
  return {"architectures": ["CLIPModel"], "model_type": "clip",
          "projection_dim": int(m.embed_dim), "logit_scale_init_value": float(m.logit_scale_init),
          "text_config": text, "vision_config": vision}


def hf_siglip_config(config, tokenizer) -> dict:
  text, vision = _hf_towers(config, "siglip")
  text.update(projection_size=int(config.model.embed_dim),
              eos_token_id=int(tokenizer.eos_id) if tokenizer else None,
              pad_token_id=int(tokenizer.pad_id) if tokenizer else None)
  vision.update(vision_use_head=True)
  return {"architectures": ["SiglipModel"], "model_type": "siglip",
          "text_config": text, "vision_config": vision}


def openclip_config(config, tokenizer) -> dict:
  m, s = config.model, _sizes(config)
  text_cfg = {"context_length": int(m.text.context_length),
              "vocab_size": int(m.text.vocab_size), "width": int(m.text.width),
              "heads": int(m.text.num_heads), "layers": int(m.text.depth),
              "mlp_ratio": int(m.text.mlp_dim) / int(m.text.width)}
  if m.text.pool == "last":
    text_cfg.update(pool_type="eos", eos_id=text_eos_id(config, tokenizer))
  vision_cfg = {"image_size": int(m.image.image_size), "layers": s["depth"],
                "width": s["width"], "patch_size": s["patch_size"],
                "head_width": s["width"] // s["num_heads"],
                "mlp_ratio": s["mlp_dim"] / s["width"]}
  if not m.image.ln_pre:
    vision_cfg["no_ln_pre"] = True
  return {"embed_dim": int(m.embed_dim), "quick_gelu": m.image.act == "quick_gelu",
          "vision_cfg": vision_cfg, "text_cfg": text_cfg}


# ------------------------------------------------------------------------------------------------
# Loading a run and writing the export.


def load_run(workdir: str, step=None, ema: bool = False):
  """(config, numpy params in the plain block layout, tokenizer or None, checkpoint step)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  from vlm_jax.models import layers  # pylint: disable=g-import-not-at-top
  loaded = inference.load(workdir, step, ema=ema)
  params = jax.tree.map(np.asarray, jax.device_get(loaded.params))
  return loaded.config, layers.unstack_block_params(params), loaded.tokenizer, loaded.step


def _tokenizer_files(tokenizer, family: str, config) -> dict:
  """{filename: bytes} of the tokenizer in the Hugging Face folder, where its kind has files
  transformers reads for the target (tokenizer.json; OpenAI's BPE as CLIPTokenizer's vocab.json
  and merges.txt; a SigLIP's SentencePiece spiece.model)."""
  if tokenizer is None:
    return {}
  from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  inner = getattr(tokenizer, "tok", tokenizer)
  if getattr(inner, "kind", None) == "hf":
    return {"tokenizer.json": tokenizers.to_bytes(inner)}
  if family == "clip" and isinstance(inner, bpe.BPETokenizer):
    return bpe.hf_files(inner, int(config.model.text.context_length))
  if family == "siglip" and getattr(inner, "model_proto", None):
    return {"spiece.model": tokenizers.to_bytes(inner)}
  return {}


def export(workdir: str, fmt: str, out: str, *, step=None, ema: bool = False,
           towers_only: bool = False) -> dict:
  """Writes the export of `workdir`'s checkpoint into `out` (a new directory); returns the
  report written as out/export.json. Nothing is written when the model cannot be exported."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import common  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ExportError(f"export: --format {fmt!r}: expected one of {', '.join(FORMATS)}")
  try:
    out = common.check_out_dir(out)
  except common.ConversionError as e:
    raise ExportError(str(e).replace("convert:", "export:", 1)) from e
  config, params, tokenizer, saved_step = load_run(workdir, step, ema)
  reasons = problems(config, fmt, tokenizer, towers_only)
  if reasons:
    raise ExportError(f"export: {workdir} cannot be written as --format {fmt} exactly:\n  " +
                      "\n  ".join(reasons) + "\nNothing was written")
  family = target_family(config)
  dropped = sorted(k for k in params if k not in
                   ("image", "text", "image_projection", "text_projection", "logit_scale",
                    "logit_bias"))
  files: dict[str, bytes] = {}
  if fmt == "hf":
    state = (to_hf_siglip if family == "siglip" else to_hf_clip)(params, config)
    description = (hf_siglip_config if family == "siglip" else hf_clip_config)(config, tokenizer)
    weights_name, config_name = "model.safetensors", "config.json"
    files.update(_tokenizer_files(tokenizer, family, config))
  else:
    state = to_openclip(params, config)
    description = {"model_cfg": openclip_config(config, tokenizer)}
    weights_name, config_name = "open_clip_model.safetensors", "open_clip_config.json"
  report = {"format": fmt, "target": description.get("architectures", ["OpenCLIP"])[0],
            "workdir": os.path.abspath(workdir), "step": saved_step, "ema": ema,
            "tensors": len(state), "dropped": dropped,
            "tokenizer_files": sorted(files)}
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    # np.array (not ascontiguousarray, which makes scalars 1-D) keeps 0-d tensors 0-d.
    save_file({k: np.array(v, np.float32, order="C") for k, v in state.items()},
              os.path.join(tmp, weights_name), metadata={"format": "pt"})
    with open(os.path.join(tmp, config_name), "w") as f:
      json.dump(description, f, indent=2)
    for name, data in files.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(data)
    with open(os.path.join(tmp, "export.json"), "w") as f:
      json.dump(report, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m vlm_jax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training or conversion workdir")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--out", required=True, help="output directory (must not exist yet)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--ema", action="store_true", help="export the EMA weights (config.ema_decay)")
  p.add_argument("--towers-only", action="store_true",
                 help="a CoCa: export its two towers and leave the caption decoder out")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    report = export(args.workdir, args.format, args.out, step=args.step, ema=args.ema,
                    towers_only=args.towers_only)
  except (ExportError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  left_out = f"; left out: {', '.join(report['dropped'])}" if report["dropped"] else ""
  print(f"wrote {args.out} ({report['target']}, {report['tensors']} tensors, step "
        f"{report['step']}{', EMA' if args.ema else ''}{left_out})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
