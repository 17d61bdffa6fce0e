"""Causal language modelling with a decoder-only LM alone (no image): the task of an imported
GPT-2 / Llama checkpoint (`python -m vlm_jax.convert --format hf` on GPT2LMHeadModel or
LlamaForCausalLM), and a way to adapt such an LM to a domain's text before it becomes the LM of
a prefix-LM (`init_from` takes its `lm/...` params).

Batch fields: `text` [B, L] (`bos caption eos pad...`, `ops.Caption`). Model: `models.lm.TextLM` (params `lm/...`, as in a prefix-LM).
Loss: next-token cross-entropy over the real tokens ('caption_loss').
Predict functions: logits (batch['text'] [B, L] -> next-token logits [B, L, vocab]).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from vlm_jax import models
from vlm_jax.data import ops
from vlm_jax.models import lm as lm_lib
from vlm_jax.tasks import base
from vlm_jax.tasks import captioning


class CausalLMTask(base.Task):
  name = "causal_lm"
  description = "a decoder-only LM on text alone (GPT-2 / Llama-style)"
  default_evals = ""
  reads_images = False
  towers = {"lm": ("lm", "decoder_only")}

  def head_config(self):
    c = ml_collections.ConfigDict()
    c.context_length = ml_collections.config_dict.placeholder(int)   # tokens per training row
    return c

  def loss_config(self):
    return captioning.caption_loss_config(1.0)

  def validate(self, config):
    m = config.model
    problems = [f"model.{f}: must be set for the causal_lm task"
                for f, v in (("lm.vocab_size", m.lm.get("vocab_size")),
                             ("context_length", m.get("context_length"))) if v is None]
    problems += lm_lib.validate(m.lm)
    if not problems and m.lm.get("max_length") and int(m.lm.max_length) < int(m.context_length):
      problems.append(f"model.lm.max_length: {m.lm.max_length} < model.context_length "
                      f"{m.context_length}")
    return problems

  def text_spec(self, config):
    return base.TextSpec(vocab_size=int(config.model.lm.vocab_size),
                         context_length=int(config.model.context_length))

  def train_ops(self, config, tokenizer):
    return [ops.Caption(tokenizer, self.text_spec(config).context_length)]

  def build_model(self, config):
    m = config.model
    return lm_lib.TextLM(lm=models.build_tower(
        "lm", m.lm, "model.lm", vocab_size=int(m.lm.vocab_size),
        max_length=int(m.lm.get("max_length") or m.context_length), **models.common_kwargs(m)))

  def model_args(self, batch):
    return (batch["text"],)

  def forward_fn(self, model):
    def forward(params, batch, rng):
      logits = model.apply({"params": params}, batch["text"], train=True,
                           rngs={"dropout": rng})
      return {"caption_logits": logits}
    return forward

  def objective(self, config, model):
    return base.Objective(forward=self.forward_fn(model),
                          weights={"caption_loss": float(config.loss.caption_weight)},
                          local_terms=captioning.caption_terms(config.loss))

  def predict_fns(self, config, model):
    def logits(params, batch):
      return model.apply({"params": params}, batch["text"])
    return {"logits": logits}

  def forward_flops(self, config):
    m = config.model
    return lm_lib.forward_flops(m.lm, vocab_size=int(m.lm.vocab_size),
                                length=int(m.context_length))


TASK = CausalLMTask()
