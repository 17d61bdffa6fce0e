"""Prefix-LM captioning + VQA on the embedded `shapes` dataset: the demo's ViT, an MLP projector
and a small GPT-2-style LM that reads the 64 image tokens as a prefix, trained on a 50/50 mixture
of captions and visual questions. arg: 'demo' (default) or 'tiny'.

  python -m vlm_jax.train --config configs/shapes_prefixlm.py --workdir runs/shapes_prefixlm
  python -m vlm_jax.demo --config configs/shapes_prefixlm.py

`--config.model.lm.style=llama` trains the Llama-style LM (RoPE, RMSNorm, gated SiLU MLP) instead.
"""
from . import shapes_common

LENGTH = 32      # prompt (question) + bos + answer (caption) + eos


def get_config(arg=None):
  c = shapes_common.shapes_config("prefix_lm", arg)
  c.data.questions_key = "questions"
  c.model.projector = "mlp"
  c.model.context_length = LENGTH
  c.model.lm = dict(name="decoder_only", style="gpt2", vocab_size=shapes_common.VOCAB,
                    **shapes_common.TOWER)
  c.tokenizer = dict(vocab_size=shapes_common.VOCAB, context_length=LENGTH)
  c.loss = dict(caption_weight=1.0, vqa_weight=1.0)
  return c
