"""Import OpenAI / OpenCLIP / Hugging Face CLIP weights into vlm_jax checkpoints.

    python -m vlm_jax.convert --format openclip --model ViT-B-32-quickgelu \
        --checkpoint open_clip_pytorch_model.bin --tokenizer bpe_simple_vocab_16e6.txt.gz --out DIR
    python -m vlm_jax.convert --format hf --checkpoint clip-vit-base-patch32/model.safetensors \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --out DIR

`convert_checkpoint` reads the file (never unpickling arbitrary objects), checks the architecture
and every key and shape, maps the weights onto the TwoTower parameter tree, checks that tree
against the model the written config builds, and writes a workdir (Orbax checkpoint + config)
that `vlm_jax.inference`, `vlm_jax.evaluate` and `train --config.init_from` read.
"""
from __future__ import annotations

import os

from vlm_jax.convert import configs, hf, openclip
from vlm_jax.convert.common import ConversionError, read_checkpoint, write_output
from vlm_jax.convert.configs import NAMED_MODELS, ClipArch

FORMATS = {"openclip": openclip, "hf": hf}


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
    fmt: 'openclip' (OpenAI / OpenCLIP key names) or 'hf' (Hugging Face CLIPModel).
    checkpoint: .safetensors, or .pt / .pth / .bin / .ckpt: a state dict (read with
      torch.load(weights_only=True)) or a TorchScript archive such as OpenAI's original release
      (read by a restricted unpickler that never runs code from the file).
    out: the output directory; must not exist (or be empty). Nothing is written on error.
    model: a name in NAMED_MODELS or a JSON description (OpenCLIP model config or HF
      config.json); for 'hf' it defaults to the config.json beside the checkpoint.
    tokenizer: the BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz); copied into `out` and
      named by the config (tokenizer.kind='bpe'). Without it the config's tokenizer.model_path
      stays unset and must be given when evaluating.
  """
  if fmt not in FORMATS:
    raise ConversionError(f"convert: --format {fmt!r}: expected one of {', '.join(FORMATS)}")
  arch, model_name = configs.resolve_arch(model, fmt, checkpoint)
  if tokenizer is not None:
    from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
    vocab = bpe.load(tokenizer).vocab_size
    if vocab != arch.vocab_size:
      raise ConversionError(f"convert: --tokenizer {tokenizer} has {vocab} ids but the model's "
                            f"vocabulary is {arch.vocab_size}")
  source = os.path.basename(checkpoint)
  state = read_checkpoint(checkpoint)
  params = convert_state(state, fmt, arch, source=source, model=model_name)
  config = configs.to_config(arch)
  check_against_model(params, config)
  report = {"format": fmt, "checkpoint": os.path.abspath(checkpoint), "model": model_name,
            "arch": arch.describe(), "tensors": len(state)}
  return write_output(out, params, config, tokenizer_file=tokenizer, report=report)


__all__ = ["ConversionError", "ClipArch", "NAMED_MODELS", "FORMATS", "convert_checkpoint",
           "convert_state", "check_against_model", "read_checkpoint"]
