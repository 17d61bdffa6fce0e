"""Import OpenAI / OpenCLIP / Hugging Face CLIP and Hugging Face / big_vision SigLIP weights into
vlm_jax checkpoints.

    python -m vlm_jax.convert --format openclip --model ViT-B-32-quickgelu \
        --checkpoint open_clip_pytorch_model.bin --tokenizer bpe_simple_vocab_16e6.txt.gz --out DIR
    python -m vlm_jax.convert --format hf --checkpoint clip-vit-base-patch32/model.safetensors \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --out DIR
    python -m vlm_jax.convert --format hf --checkpoint siglip-base-patch16-224/model.safetensors \
        --out DIR                       # SiglipModel: spiece.model beside it is the tokenizer
    python -m vlm_jax.convert --format big_vision --checkpoint webli_en_b16_224.npz \
        --tokenizer c4_en.model --out DIR

`convert_checkpoint` reads the file (never unpickling arbitrary objects), checks the architecture
and every key and shape, maps the weights onto the TwoTower parameter tree, checks that tree
against the model the written config builds, and writes a workdir (Orbax checkpoint + config)
that `vlm_jax.inference`, `vlm_jax.evaluate` and `train --config.init_from` read.
"""
from __future__ import annotations

import os

import json

from vlm_jax.convert import (big_vision, configs, hf, hf_bert, hf_lm, hf_resnet, hf_vit,
                             openclip)
from vlm_jax.convert.common import (ConversionError, check_out_dir, read_checkpoint,
                                    write_output)
from vlm_jax.convert.configs import NAMED_MODELS, ClipArch

FORMATS = {"openclip": openclip, "hf": hf, "big_vision": big_vision}


def convert_state(state: dict, fmt: str, arch: ClipArch, *, source: str = "checkpoint",
                  model: str = "the model") -> dict:
  """A state dict (name -> numpy array) in format `fmt` -> TwoTower params (numpy)."""
  if fmt not in FORMATS:
    raise ConversionError(f"convert: --format {fmt!r}: expected one of {', '.join(FORMATS)}")
  return FORMATS[fmt].convert(state, arch, source=source, model=model)


def check_against_model(params: dict, config) -> None:
  """The converted tree must be exactly the tree the config's model initialises."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top

  task = tasks.get(config.task)
  model = task.build_model(config)
  abstract = jax.eval_shape(lambda: task.init_params(model, config, jax.random.key(0)))
  want = checkpoint.flatten(flax.linen.unbox(abstract))
  got = checkpoint.flatten(params)
  problems = [f"missing {k}" for k in want if k not in got]
  problems += [f"extra {k}" for k in got if k not in want]
  problems += [f"{k}: {tuple(got[k].shape)} vs model {tuple(want[k].shape)}"
               for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
  if problems:
    raise ConversionError("convert: the converted params do not fit the model built from the "
                          "written config (a converter bug): " + "; ".join(problems[:20]))


def convert_checkpoint(fmt: str, checkpoint: str, out: str, *, model: str | None = None,
                       tokenizer: str | None = None) -> str:
  """Converts `checkpoint` and writes the workdir `out`; returns its absolute path.

  Args:
    fmt: 'openclip' (OpenAI / OpenCLIP key names), 'hf' (Hugging Face CLIPModel / SiglipModel)
      or 'big_vision' (a big_vision SigLIP .npz).
    checkpoint: .safetensors, .npz (big_vision; read without pickle), or .pt / .pth / .bin /
      .ckpt: a state dict (read with torch.load(weights_only=True)) or a TorchScript archive
      such as OpenAI's original release (read by a restricted unpickler that never runs code
      from the file).
    out: the output directory; must not exist (or be empty). Nothing is written on error.
    model: a name in NAMED_MODELS or a JSON description (OpenCLIP model config or HF
      config.json); for 'hf' it defaults to the config.json beside the checkpoint; big_vision
      checkpoints describe themselves (the shapes hold the whole architecture).
    tokenizer: OpenAI CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz), a SentencePiece
      .model (SigLIP) or Hugging Face tokenizer files (tokenizer.json or its folder); default
      (`find_tokenizer`): for 'hf' the tokenizer files beside the checkpoint, else for a CLIP the
      BPE vocabulary inside an installed open_clip / clip package. Stored in `out` (WORKDIR/tokenizer.model), so the workdir loads
      on its own; with none found, nothing is read or written and the error says what to pass.
      'none': weights only (for `train --config.init_from`; evaluating the workdir then needs
      --config.tokenizer.model_path).
  """
  if fmt not in FORMATS:
    raise ConversionError(f"convert: --format {fmt!r}: expected one of {', '.join(FORMATS)}")
  check_out_dir(out)
  source = os.path.basename(checkpoint)
  hf_config = _hf_model_config(fmt, checkpoint, model)
  if hf_config is not None and hf_lm.is_lm_config(hf_config[0]):
    return _convert_lm(*hf_config, checkpoint, out, tokenizer)
  if hf_config is not None and hf_vit.is_vit_config(hf_config[0]):
    return _convert_vit(*hf_config, checkpoint, out)
  if hf_config is not None and hf_bert.is_bert_config(hf_config[0]):
    return _convert_bert(*hf_config, checkpoint, out, tokenizer)
  if hf_config is not None and hf_resnet.is_resnet_config(hf_config[0]):
    return _convert_resnet(*hf_config, checkpoint, out)
  if fmt == "big_vision" and not model:
    # Prepared once here (its own convert's prepare is then a no-op over plain names).
    state = big_vision.prepare(read_checkpoint(checkpoint), source)
    arch = big_vision.infer_arch(state, source)
    model_name = "the checkpoint's shapes"
  else:
    arch, model_name = configs.resolve_arch(model, fmt, checkpoint)
    state = None
  kind, tok_path = find_tokenizer(fmt, checkpoint, tokenizer, arch.family)
  tok = _read_tokenizer(kind, tok_path, arch) if kind else None
  if state is None:
    state = read_checkpoint(checkpoint)
  params = convert_state(state, fmt, arch, source=source, model=model_name)
  config = configs.to_config(arch)
  if kind and kind != config.tokenizer.kind:
    # A tokenizer.json carries its own normalisation and special tokens (SigLIP 2's Gemma
    # tokenizer); SigLIP's SentencePiece text rules apply to its .model only.
    config.tokenizer.kind, config.tokenizer.pad, config.tokenizer.canonicalize = kind, "pad", False
  check_against_model(params, config)
  report = {"format": fmt, "checkpoint": os.path.abspath(checkpoint), "model": model_name,
            "arch": arch.describe(), "tensors": len(state),
            "tokenizer": {"kind": kind, "from": os.path.abspath(tok_path)} if kind else None}
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  return write_output(out, params, config, report=report,
                      tokenizer_bytes=tokenizers.to_bytes(tok) if tok is not None else None)


def _hf_model_config(fmt: str, checkpoint: str, model: str | None):
  """(config.json dict, its path) when --format hf names a GPT-2 / Llama / ViT model, else None
  (CLIP and SigLIP are resolved by `configs.resolve_arch`)."""
  if fmt != "hf":
    return None
  path = model or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
  if not (path.endswith(".json") and os.path.isfile(path)):
    return None
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None       # resolve_arch reports an unreadable file
  if isinstance(d, dict) and (hf_lm.is_lm_config(d) or hf_vit.is_vit_config(d)
                              or hf_bert.is_bert_config(d) or hf_resnet.is_resnet_config(d)):
    return d, path
  return None


def _record_class_names(config, d: dict, classes: int, num_labels: int) -> None:
  """A classifier's label names (config.json's id2label) into `data.classnames`."""
  if classes and num_labels == classes:
    labels = d.get("id2label") or {}
    names = [str(labels.get(str(i), labels.get(i, i))) for i in range(classes)]
    config.data.classnames = ",".join(n.replace(",", " ") for n in names)


def _convert_vit(d: dict, model_path: str, checkpoint: str, out: str) -> str:
  """A Hugging Face ViTModel / ViTForImageClassification -> a classification workdir."""
  source = os.path.basename(checkpoint)
  fields = hf_vit.fields(d, model_path)
  state = read_checkpoint(checkpoint)
  params, classes, dropped = hf_vit.convert(state, fields, source=source, model=model_path)
  config = hf_vit.to_config(fields, classes)
  _record_class_names(config, d, classes, fields["num_labels"])
  check_against_model(params, config)
  report = {"format": "hf", "checkpoint": os.path.abspath(checkpoint), "model": model_path,
            "arch": fields, "tensors": len(state), "classes": classes,
            "left_out": dropped and ["the pooler (Dense + tanh over the class token): "
                                     + ", ".join(dropped)]}
  return write_output(out, params, config, report=report)


def _convert_resnet(d: dict, model_path: str, checkpoint: str, out: str) -> str:
  """A Hugging Face ResNetModel / ResNetForImageClassification -> a classification workdir."""
  source = os.path.basename(checkpoint)
  fields = hf_resnet.fields(d, model_path)
  state = read_checkpoint(checkpoint)
  params, classes = hf_resnet.convert(state, fields, source=source, model=model_path)
  config = hf_resnet.to_config(fields, classes)
  _record_class_names(config, d, classes, fields["num_labels"])
  check_against_model(params, config)
  report = {"format": "hf", "checkpoint": os.path.abspath(checkpoint), "model": model_path,
            "arch": fields, "tensors": len(state), "classes": classes}
  return write_output(out, params, config, report=report)


def _beside_tokenizer(checkpoint: str, tokenizer: str | None, family: str):
  """(kind, path, tokenizer) of a Hugging Face model's tokenizer (`find_tokenizer`), read;
  (None, None, None) for --tokenizer none."""
  kind, tok_path = find_tokenizer("hf", checkpoint, tokenizer, family)
  if not kind:
    return None, None, None
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    return kind, tok_path, tokenizers.read(kind, tok_path)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(f"convert: tokenizer {tok_path}: {e}") from e


def _convert_bert(d: dict, model_path: str, checkpoint: str, out: str,
                  tokenizer: str | None) -> str:
  """A Hugging Face BertModel / BertForMaskedLM -> a masked_lm workdir."""
  source = os.path.basename(checkpoint)
  fields = hf_bert.fields(d, model_path)
  kind, tok_path, tok = _beside_tokenizer(checkpoint, tokenizer, "bert")
  if tok is not None and tok.vocab_size != fields["vocab_size"]:
    raise ConversionError(f"convert: the vocabulary {tok_path} has {tok.vocab_size} tokens but "
                          f"the checkpoint's word embedding has {fields['vocab_size']} rows "
                          f"({model_path}: vocab_size); they must match. Nothing was written")
  state = read_checkpoint(checkpoint)
  params, pooler, head = hf_bert.convert(state, fields, source=source, model=model_path)
  if not head:
    params.update(hf_bert.fresh_head(fields["width"], fields["vocab_size"]))
  config = hf_bert.to_config(fields, pooler)
  check_against_model(params, config)
  report = {"format": "hf", "checkpoint": os.path.abspath(checkpoint), "model": model_path,
            "arch": fields, "tensors": len(state), "pooler": pooler,
            "mlm_head": "converted" if head else "none in the checkpoint: freshly initialised",
            "tokenizer": {"kind": kind, "from": os.path.abspath(tok_path)} if kind else None}
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  return write_output(out, params, config, report=report,
                      tokenizer_bytes=tokenizers.to_bytes(tok) if tok is not None else None)


def _convert_lm(d: dict, model_path: str, checkpoint: str, out: str,
                tokenizer: str | None) -> str:
  """A Hugging Face GPT2LMHeadModel / LlamaForCausalLM -> a causal_lm workdir."""
  source = os.path.basename(checkpoint)
  fields = hf_lm.lm_fields(d, model_path)
  kind, tok_path, tok = _beside_tokenizer(checkpoint, tokenizer, "lm")
  if tok is not None and tok.vocab_size > fields["vocab_size"]:
    raise ConversionError(f"convert: tokenizer {tok_path} has {tok.vocab_size} ids but the "
                          f"model's vocabulary is {fields['vocab_size']}")
  state = read_checkpoint(checkpoint)
  params = hf_lm.convert(state, fields, source=source, model=model_path)
  config = hf_lm.to_config(fields, context_length=fields["max_length"])
  if kind:
    config.tokenizer.kind = kind
  check_against_model(params, config)
  report = {"format": "hf", "checkpoint": os.path.abspath(checkpoint), "model": model_path,
            "arch": {k: v for k, v in fields.items()}, "tensors": len(state),
            "tokenizer": {"kind": kind, "from": os.path.abspath(tok_path)} if kind else None}
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  return write_output(out, params, config, report=report,
                      tokenizer_bytes=tokenizers.to_bytes(tok) if tok is not None else None)


CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
HF_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def installed_clip_bpe() -> str | None:
  """OpenAI CLIP's BPE vocabulary as shipped inside the open_clip_torch or openai-clip package
  (found without importing them), or None."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  for package in ("open_clip", "clip"):
    try:
      spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
      spec = None
    if spec is not None and spec.origin:
      path = os.path.join(os.path.dirname(spec.origin), CLIP_BPE_FILE)
      if os.path.isfile(path):
        return path
  return None


def _has_hf_tokenizer(folder: str) -> bool:
  return any(all(os.path.isfile(os.path.join(folder, f)) for f in files)
             for files in HF_TOKENIZER_FILES)


SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")   # Hugging Face's names for it


def find_tokenizer(fmt: str, checkpoint: str, tokenizer: str | None = None,
                   family: str = "clip") -> tuple[str, str]:
  """(tokenizer.kind, path) of the converted model's tokenizer, or (None, None) for 'none'; see
  `convert_checkpoint`."""
  if tokenizer == "none":
    return None, None
  folder = os.path.dirname(os.path.abspath(checkpoint))
  if tokenizer:
    if not os.path.exists(tokenizer):
      raise ConversionError(f"convert: --tokenizer {tokenizer} does not exist")
  elif fmt == "hf" and _has_hf_tokenizer(folder):
    tokenizer = folder
  elif fmt == "hf" and any(os.path.isfile(os.path.join(folder, f)) for f in SENTENCEPIECE_FILES):
    tokenizer = next(os.path.join(folder, f) for f in SENTENCEPIECE_FILES
                     if os.path.isfile(os.path.join(folder, f)))
  elif family in ("lm", "bert"):
    raise ConversionError(
        "convert: no tokenizer beside the model (tokenizer.json, vocab.json + merges.txt, "
        "vocab.txt or tokenizer.model); pass --tokenizer, or --tokenizer none for the weights "
        "alone. Nothing was written")
  elif family == "siglip":
    raise ConversionError(
        "convert: no tokenizer for the converted SigLIP, and a workdir without one cannot be "
        "evaluated; pass --tokenizer with its SentencePiece .model (big_vision: the vocabulary "
        "its config names, e.g. c4_en) or tokenizer.json (or --tokenizer none for the weights "
        "alone). Nothing was written")
  else:
    tokenizer = installed_clip_bpe()
    if tokenizer is None:
      raise ConversionError(
          "convert: no tokenizer for the converted model, and a workdir without one cannot "
          f"be evaluated; pass --tokenizer: OpenAI CLIP's {CLIP_BPE_FILE} (it ships inside the "
          "open_clip_torch and openai-clip packages) or the model's Hugging Face tokenizer.json "
          "(or --tokenizer none for the weights alone). Nothing was written")
  if tokenizer.endswith(".model"):
    return "sentencepiece", tokenizer
  hf_files = os.path.isdir(tokenizer) or tokenizer.endswith(".json")
  return ("hf" if hf_files else "bpe"), tokenizer


def _read_tokenizer(kind: str, path: str, arch: ClipArch):
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    tok = tokenizers.read(kind, path)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(f"convert: tokenizer {path}: {e}") from e
  if tok.vocab_size != arch.vocab_size:
    raise ConversionError(f"convert: tokenizer {path} has {tok.vocab_size} ids but the model's "
                          f"vocabulary is {arch.vocab_size}")
  return tok


__all__ = ["ConversionError", "ClipArch", "NAMED_MODELS", "FORMATS", "convert_checkpoint",
           "find_tokenizer", "installed_clip_bpe",
           "convert_state", "check_against_model", "read_checkpoint"]
