"""Command line: `python -m vlm_jax.convert --format openclip|hf|big_vision [--model NAME]
--checkpoint FILE --out DIR [--tokenizer bpe_simple_vocab_16e6.txt.gz | tokenizer.json | X.model]`. Exit status 1 with a one-paragraph
reason (and nothing written) when the checkpoint cannot be converted."""
from __future__ import annotations

import argparse
import sys

from vlm_jax import convert


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m vlm_jax.convert", description=__doc__)
  p.add_argument("--format", required=True, choices=sorted(convert.FORMATS),
                 help="openclip: OpenAI/OpenCLIP key names; hf: Hugging Face CLIPModel or "
                      "SiglipModel; big_vision: a big_vision SigLIP .npz")
  p.add_argument("--model", default=None,
                 help=f"one of {', '.join(convert.NAMED_MODELS)}, or a JSON model description "
                      "(OpenCLIP model config or HF config.json; hf default: the config.json "
                      "beside the checkpoint)")
  p.add_argument("--checkpoint", required=True,
                 help=".safetensors, .npz (big_vision), or .pt/.pth/.bin/.ckpt (state dict or "
                      "OpenAI TorchScript)")
  p.add_argument("--out", required=True, help="output workdir (must not exist yet)")
  p.add_argument("--tokenizer", default=None,
                 help="OpenAI CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz), a "
                      "SentencePiece .model (SigLIP) or Hugging Face tokenizer files "
                      "(tokenizer.json or its folder), stored in --out; default: for hf the "
                      "files beside the checkpoint, else for a CLIP the vocabulary inside an "
                      "installed open_clip_torch / openai-clip package; 'none': the weights "
                      "alone (for init_from)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    out = convert.convert_checkpoint(args.format, args.checkpoint, args.out, model=args.model,
                                     tokenizer=args.tokenizer)
  except (convert.ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
