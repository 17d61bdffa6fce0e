"""Prefix-LM captioning + VQA on the embedded `shapes` dataset: a ViT 2x64 with 8x8 patches and
fixed 2-D sin-cos positions (16 image tokens), an MLP projector and a small GPT-2-style LM that
reads the image tokens as a prefix, trained on captions and visual questions (1 : 2) for 2500
steps of 64. arg: 'demo' (default) or 'tiny'.

Why these choices (measured on the demo split, 2-core CPU): with the CoCa demo's 4x4 patches
(64 image tokens) and learned positions, 1500 steps reached VQA 0.79-0.82 with the position and
shape questions lagging (0.46 / 0.64); fixed positions lifted those, and 16 tokens made a step
2x cheaper, so the same minutes buy 2500 steps.

  python -m vlm_jax.train --config configs/shapes_prefixlm.py --workdir runs/shapes_prefixlm
  python -m vlm_jax.demo --config configs/shapes_prefixlm.py

`--config.model.lm.style=llama` trains the Llama-style LM (RoPE, RMSNorm, gated SiLU MLP) instead.
"""
from . import shapes_common

LENGTH = 32      # prompt (question) + bos + answer (caption) + eos


def get_config(arg=None):
  c = shapes_common.shapes_config("prefix_lm", arg)
  c.model.image.update(variant="mu/8", posemb="sincos2d")
  if shapes_common.variant(arg) == "demo":
    c.total_steps = 2500
  c.data.questions_key = "questions"
  c.model.projector = "mlp"
  c.model.context_length = LENGTH
  c.model.lm = dict(name="decoder_only", style="gpt2", vocab_size=shapes_common.VOCAB,
                    **shapes_common.TOWER)
  c.tokenizer = dict(vocab_size=shapes_common.VOCAB, context_length=LENGTH)
  c.loss = dict(caption_weight=1.0, vqa_weight=2.0)
  return c
