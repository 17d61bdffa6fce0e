"""Prefix-LM vision-language model (PaliGemma / LLaVA shape): captioning and visual question
answering with one decoder-only LM that reads the image tokens as a prefix.

Batch fields (`ops.PrefixLMText`): `image`, `text` [B, L] (`prompt, bos, answer, eos, pad`),
`prompt_len` [B], `target_mask` [B, L] (answer and eos: the only tokens the loss predicts),
`is_vqa` [B], `truncated` [B]. Captions and questions are mixed per example with probabilities
proportional to `loss.caption_weight` / `loss.vqa_weight`. With `data.neighbours` (retrieval-
augmented captioning, `vlm_jax.data.retrieval`) a caption's prompt is its image's retrieved
captions.

Model: `models.PrefixLM` (image tower from `model.image`, projector `model.projector`, LM from
`model.lm`, GPT-2 or Llama-style). `model.context_length` is the text row length L; the LM's
positions must cover the image tokens plus L.

Loss: next-token cross-entropy over the target tokens of the global batch ('lm_loss'); the
caption and VQA shares are logged apart ('caption_loss', 'vqa_loss'), as is the fraction of
questions cut to fit ('truncated').

Predict functions: generate (prefill of [image tokens; prompt] in one pass, then greedy / beam
search with the KV cache; batch['prompt'] [B, P] left-padded prompts, absent for captions),
answer (batch['questions'] [B, Q, P] -> answers [B, Q, max_len]), caption_nll, image_features.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from vlm_jax import decoding
from vlm_jax import losses
from vlm_jax import models
from vlm_jax.data import ops
from vlm_jax.data import retrieval
from vlm_jax.models import lm as lm_lib
from vlm_jax.models import prefix_lm
from vlm_jax.tasks import base
from vlm_jax.tasks import captioning
from vlm_jax.tasks.captioning import PAD_ID


def _image_tokens(config) -> int:
  return int(models.tower_module("image", config.model.image.name,
                                 "model.image.name").num_tokens(config.model.image))


def lm_max_length(config) -> int:
  """Positions the LM needs: image tokens + the text row (or `model.lm.max_length` if set)."""
  m = config.model
  return int(m.lm.get("max_length") or (_image_tokens(config) + int(m.context_length)))


def generate_fn(model):
  """generate(params, batch, ...) of any PrefixLM."""

  def generate(params, batch, *, max_len: int, bos_id: int, eos_id: int, pad_id: int = PAD_ID,
               beam_size: int = 1, length_penalty: float = 0.0, stop_at=None):
    """batch['image'] [B, ...] and optionally batch['prompt'] int32 [B, P] (left-padded with
    pad_id) -> (tokens int32 [B, max_len], scores float32 [B]). `max_len` sizes the buffers;
    `stop_at` (may be traced) is the number of generated tokens, default max_len."""
    p = {"params": params}
    prefix = model.apply(p, batch["image"], method="image_prefix")
    b, n = prefix.shape[:2]
    prompt = batch.get("prompt")
    if prompt is None:
      prompt = jnp.zeros((b, 0), jnp.int32)
    if beam_size > 1:   # example-major beams: rows i*K .. i*K+K-1 belong to example i
      prefix = jnp.repeat(prefix, beam_size, axis=0)
      prompt = jnp.repeat(prompt, beam_size, axis=0)
    rows, plen = prompt.shape
    total = plen + max_len
    cache = lm_lib.init_cache(model, params, dict(prefix=prefix,
                                                  tokens=jnp.zeros((rows, total), jnp.int32)),
                              method="lm_step")
    valid = jnp.concatenate([jnp.ones((rows, n), bool), prompt != pad_id], axis=1)
    _, mutated = model.apply({"params": params, "cache": cache}, prefix, prompt,
                             prefix_len=jnp.full((rows,), n + plen, jnp.int32), valid=valid,
                             decode=True, method="lm_step", mutable=["cache"])
    cache = mutated["cache"]

    def logits_fn(tokens, cache):
      logits, mutated = model.apply({"params": params, "cache": cache}, None, tokens[:, None],
                                    decode=True, method="lm_step", mutable=["cache"])
      return logits[:, 0], mutated["cache"]

    kw = dict(batch_size=b, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
              stop_at=stop_at)
    if beam_size == 1:
      res = decoding.greedy(logits_fn, cache, **kw)
      return res.tokens, res.scores
    res = decoding.beam_search(logits_fn, cache, beam_size=beam_size, alpha=length_penalty, **kw)
    return res.tokens[:, 0], res.scores[:, 0]

  return generate


class PrefixLMTask(base.Task):
  name = "prefix_lm"
  description = "image tokens -> projector -> prefix of a decoder-only LM (captioning + VQA)"
  default_evals = "caption,vqa"
  towers = {"image": ("image", "vit"), "lm": ("lm", "decoder_only")}

  def head_config(self):
    c = ml_collections.ConfigDict()
    c.projector = "mlp"            # image tokens -> LM width: 'linear' | 'mlp' (Dense-GELU-Dense)
    c.context_length = ml_collections.config_dict.placeholder(int)   # text row: prompt + bos + answer + eos
    return c

  def loss_config(self):
    c = ml_collections.ConfigDict()
    c.caption_weight = 1.0         # share of caption examples in the mixture (relative)
    c.vqa_weight = 1.0             # share of VQA examples in the mixture (relative)
    c.label_smoothing = 0.0
    return c

  def reads_questions(self, config):
    return float(config.loss.vqa_weight) > 0

  def validate(self, config):
    m = config.model
    problems = []
    for field in ("vocab_size",):
      if m.lm.get(field) is None:
        problems.append(f"model.lm.{field}: must be set for the prefix_lm task")
    if m.get("context_length") is None:
      problems.append("model.context_length: must be set for the prefix_lm task (text row "
                      "length: prompt + bos + answer + eos)")
    elif int(m.context_length) < 3:
      problems.append(f"model.context_length: {m.context_length} leaves no room for a prompt, "
                      "bos and eos")
    if m.get("projector") not in prefix_lm.PROJECTORS:
      problems.append(f"model.projector: unknown projector {m.get('projector')!r}; expected "
                      f"one of {', '.join(prefix_lm.PROJECTORS)}")
    problems += lm_lib.validate(m.lm)
    if float(m.image.get("patch_dropout") or 0.0) > 0:
      problems.append(f"model.image.patch_dropout: {m.image.patch_dropout}: the LM reads the "
                      "image tokens at its first positions, so training on fewer of them than "
                      "evaluation sees would move the text to other positions; use 0 here "
                      "(patch dropout suits contrastive and cross-attention captioning towers)")
    if not problems and m.lm.get("max_length") and (
        int(m.lm.max_length) < _image_tokens(config) + int(m.context_length)):
      problems.append(f"model.lm.max_length: {m.lm.max_length} positions cannot hold "
                      f"{_image_tokens(config)} image tokens + model.context_length "
                      f"{m.context_length}")
    cw, vw = float(config.loss.caption_weight), float(config.loss.vqa_weight)
    if cw < 0 or vw < 0 or cw + vw <= 0:
      problems.append(f"loss.caption_weight / loss.vqa_weight: must be >= 0 with a positive "
                      f"sum, got {cw} / {vw}")
    if config.data.get("neighbours"):
      if cw <= 0:
        problems.append("data.neighbours: retrieved captions prompt the caption examples, but "
                        "loss.caption_weight is 0")
      try:    # read now, so that a missing or empty datastore fails before training
        retrieval.load_neighbours(config.data.neighbours, int(config.data.neighbours_k))
      except ValueError as e:
        problems.append(str(e))
    return problems

  def text_spec(self, config):
    return base.TextSpec(vocab_size=int(config.model.lm.vocab_size),
                         context_length=int(config.model.context_length))

  def train_ops(self, config, tokenizer):
    neighbours = None
    if config.data.get("neighbours"):
      neighbours = retrieval.load_neighbours(config.data.neighbours, int(config.data.neighbours_k))
    return [ops.PrefixLMText(tokenizer, self.text_spec(config).context_length,
                             caption_weight=float(config.loss.caption_weight),
                             vqa_weight=float(config.loss.vqa_weight), neighbours=neighbours,
                             same_phrasing=bool(config.data.get("neighbours_same_phrasing")))]

  def build_model(self, config):
    m = config.model
    kw = models.common_kwargs(m)
    image = models.build_tower("image", m.image, "model.image", **kw)
    lm = models.build_tower("lm", m.lm, "model.lm", vocab_size=int(m.lm.vocab_size),
                            max_length=lm_max_length(config), **kw)
    projector = models.Projector(width=int(m.lm.width), kind=m.projector, dtype=kw["dtype"],
                                 param_dtype=kw["param_dtype"])
    return models.PrefixLM(image=image, projector=projector, lm=lm)

  def model_args(self, batch):
    text = batch["text"]
    prompt_len = batch.get("prompt_len")
    if prompt_len is None:
      prompt_len = jnp.zeros((text.shape[0],), jnp.int32)
    return batch["image"], text, prompt_len

  def objective(self, config, model):
    smoothing = float(config.loss.get("label_smoothing", 0.0))

    def local_terms(outputs, batch):
      logits = outputs["caption_logits"][:, :-1]
      targets = batch["text"][:, 1:]
      mask = batch["target_mask"][:, 1:]
      vqa = batch["is_vqa"][:, None]
      total, count = losses.caption_xent_sum(logits, targets, mask, label_smoothing=smoothing)
      cap = losses.caption_xent_sum(logits, targets, mask & ~vqa, label_smoothing=smoothing)
      q = losses.caption_xent_sum(logits, targets, mask & vqa, label_smoothing=smoothing)
      truncated = jnp.sum(batch["truncated"] & batch["is_vqa"]).astype(jnp.float32)
      return {"lm_loss": (total, count), "caption_loss": cap, "vqa_loss": q,
              "truncated": (truncated, jnp.sum(batch["is_vqa"]).astype(jnp.float32))}

    return base.Objective(forward=self.forward_fn(model), weights={"lm_loss": 1.0},
                          local_terms=local_terms)

  def predict_fns(self, config, model):
    generate = generate_fn(model)

    def answer(params, batch, **static):
      """batch['questions'] int32 [B, Q, P] (left-padded) -> (answers [B, Q, max_len],
      scores [B, Q])."""
      questions = batch["questions"]
      b, q, p = questions.shape
      images = jnp.repeat(batch["image"], q, axis=0)
      tokens, scores = generate(params, {"image": images, "prompt": questions.reshape(b * q, p)},
                                **static)
      return tokens.reshape(b, q, -1), scores.reshape(b, q)

    def caption_nll(params, batch):
      """Teacher-forced NLL of batch['captions'] [B, K, L] (empty prompt): per caption the
      summed negative log-likelihood and the number of real tokens, both [B, K]."""
      captions = batch["captions"]
      b, k, length = captions.shape
      images = jnp.repeat(batch["image"], k, axis=0)
      text = captions.reshape(b * k, length)
      logits = model.apply({"params": params}, images, text,
                           jnp.zeros((b * k,), jnp.int32))["caption_logits"]
      nll, count = captioning.sequence_nll(logits, text)
      return nll.reshape(b, k), count.reshape(b, k)

    return {"generate": generate, "answer": answer, "caption_nll": caption_nll,
            "image_features": base.image_features_fn(model)}

  def forward_flops(self, config):
    m = config.model
    image = models.tower_module("image", m.image.name, "model.image.name")
    n = _image_tokens(config)
    proj = 2 * n * image.width(m.image) * int(m.lm.width)
    if m.projector == "mlp":
      proj += 2 * n * int(m.lm.width) ** 2
    return (image.forward_flops(m.image) + proj
            + lm_lib.forward_flops(m.lm, vocab_size=int(m.lm.vocab_size),
                                   length=n + int(m.context_length)))


TASK = PrefixLMTask()
