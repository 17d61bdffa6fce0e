"""Masked-token accuracy of a masked language model on held-out text.

The first caption of every example of the eval split (or, with `document='all_captions'`, all
its captions joined) is corrupted as in training (the entry's `mask_rate`; the positions are drawn from an rng seeded by the caption, so every evaluation of a
split masks the same tokens), the task's 'mlm_logits' predict function fills the masked
positions, and

    masked_lm/<ds>/accuracy     argmax == original id, over the masked positions
    masked_lm/<ds>/loss         their mean cross-entropy (nats)
    masked_lm/<ds>/num_masked   how many positions were scored
"""
from typing import Dict


from vlm_jax.data import ops
from vlm_jax.evals import common

PREDICT_FNS = ("mlm_logits",)


def default_config(**fields):
  c = common.entry_config("masked_lm")
  c.mask_rate = 0.15
  c.document = "caption"         # 'caption' (the first) | 'all_captions' (joined, stored order)
  c.update(fields)
  return c


def _field_op(config, entry, tokenizer):
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top  (tasks import evals)
  spec = tasks.get(config.task).text_spec(config)
  mask_id = ops.mask_token_id(tokenizer, spec.vocab_size) if tokenizer is not None else 0
  return ops.MaskedTokens(tokenizer, spec.context_length, mask_id, rate=float(entry.mask_rate),
                          document=entry.document)


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  return [(common.eval_data_config(config, entry), [_field_op(config, entry, tokenizer)])]


def check(config, entry) -> list:
  del config
  problems = []
  if not 0 < float(entry.mask_rate) <= 1:
    problems.append(f"mask_rate: {entry.mask_rate} must be in (0, 1]")
  if entry.document not in ops.DOCUMENTS:
    problems.append(f"document: unknown {entry.document!r}; expected one of "
                    f"{', '.join(ops.DOCUMENTS)}")
  return problems


def _scores(logits, target, mask):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == target
  return (jnp.sum(jnp.where(mask, correct, False)), jnp.sum(jnp.where(mask, nll, 0.0)),
          jnp.sum(mask))


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  who = f"evals: masked_lm on {tag!r}"
  mlm_logits = ctx.predict_fn("mlm_logits", who)

  def fn(params, batch):
    mask = batch["mlm_mask"] & batch["mask"][:, None]
    return _scores(mlm_logits(params, batch), batch["mlm_target"], mask)

  (data, field_ops), = splits(ctx.config, eval_config, ctx.tokenizer)
  correct = nll = count = 0.0
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      common.entry_batch_size(ctx.config, eval_config), who=who):
    c, s, n = ctx.call("masked_lm/scores", fn, batch)
    correct, nll, count = correct + float(c), nll + float(s), count + float(n)
  if not count:
    raise ValueError(f"{who}: no token was masked (an empty split or empty captions)")
  return {f"masked_lm/{tag}/accuracy": correct / count, f"masked_lm/{tag}/loss": nll / count,
          f"masked_lm/{tag}/num_masked": count}


