"""Captioning: generate captions (greedy / beam search with the decoder's KV cache), score them
with the COCO caption metrics, and measure the log-likelihood of the reference captions.

Scoring uses pycocoevalcap's own scorers (BLEU-1..4, CIDEr, ROUGE-L, and METEOR when Java is
available) on captions tokenised the COCO way: with the Stanford PTB tokenizer (Java) when Java is
installed, otherwise with `simple_ptb_tokenize`, a Python approximation that agrees with it on
ordinary lower-case English (no quotes, contractions or hyphenated words). SPICE is never run: it
downloads Stanford models on first use.

Metric names: caption/<name>/{bleu1,bleu2,bleu3,bleu4,cider,rouge_l,meteor,loglik,perplexity}.
"""
import functools
import re
import shutil
from typing import Dict, List, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.evals import common
from vlm_jax.evals import decode as decode_lib

CAPTION_METRICS = ("bleu", "cider", "rouge", "meteor")

# Tokens pycocoevalcap's PTB wrapper drops after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
              "-", "--", "...", ";"}


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
  return shutil.which("java") is not None


def simple_ptb_tokenize(caption: str) -> str:
  """A Python approximation of pycocoevalcap's tokenisation (Stanford PTB tokenizer with
  -lowerCase, then its punctuation tokens dropped): lower-case, split off punctuation and the
  clitics 's 're 've 'll 'd 'm n't, brackets as -lrb- / -rrb-, drop the punctuation tokens."""
  text = caption.replace("\n", " ").lower()
  text = re.sub(r"([a-z0-9])(n't)\b", r"\1 \2", text)
  text = re.sub(r"([a-z0-9])('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)
  text = text.replace("(", " -lrb- ").replace(")", " -rrb- ")
  text = text.replace("[", " -lsb- ").replace("]", " -rsb- ")
  text = text.replace("{", " -lcb- ").replace("}", " -rcb- ")
  text = re.sub(r"\.\.\.", " ... ", text)
  text = re.sub(r"([,;:?!\"`])", r" \1 ", text)
  text = re.sub(r"(?<!\.)\.(\s|$)", r" . \1", text)   # sentence-final / word-final periods only
  return " ".join(t for t in text.split() if t not in _PTB_PUNCT and t != '"')


def tokenize_captions(captions: Mapping[int, List[str]], use_java=None) -> Dict[int, List[str]]:
  """{id: [caption, ...]} -> the same with COCO-tokenised captions."""
  if use_java is None:
    use_java = java_available()
  if use_java:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
  return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                   metrics: Sequence[str] = CAPTION_METRICS, use_java=None
                   ) -> Dict[str, float]:
  """COCO caption metrics of one predicted caption per image against its references.

  Args:
    predictions: N generated captions (plain text).
    references: N lists of reference captions (at least one each).
    metrics: any of 'bleu' (bleu1..bleu4), 'cider', 'rouge' (rouge_l), 'meteor' (needs Java;
      skipped without it).
    use_java: PTB tokenizer / METEOR via Java; None = when `java` is on PATH.

  Returns a dict of corpus-level scores (CIDEr on pycocoevalcap's scale, i.e. 1.0 = 100 CIDEr).
  """
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top

  unknown = [m for m in metrics if m not in CAPTION_METRICS]
  if unknown:
    raise ValueError(f"caption metrics: unknown {unknown}; expected some of "
                     f"{', '.join(CAPTION_METRICS)}")
  if len(predictions) != len(references):
    raise ValueError(f"score_captions: {len(predictions)} predictions but {len(references)} "
                     "reference lists")
  if not predictions:
    return {}
  for i, refs in enumerate(references):
    if not refs:
      raise ValueError(f"score_captions: image {i} has no reference caption")
  if use_java is None:
    use_java = java_available()
  elif use_java and not java_available():
    raise ValueError("caption scoring: Java tokenisation / METEOR asked for, but no `java` "
                     "on PATH; use the 'python' tokenizer or install a Java runtime")
  res = tokenize_captions({i: [p] for i, p in enumerate(predictions)}, use_java)
  gts = tokenize_captions({i: list(r) for i, r in enumerate(references)}, use_java)

  out = {}
  if "bleu" in metrics:
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{i + 1}": float(s) for i, s in enumerate(scores)})
  if "cider" in metrics:
    out["cider"] = float(Cider().compute_score(gts, res)[0])
  if "rouge" in metrics:
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
  if "meteor" in metrics and use_java:
    from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
    scorer = Meteor()
    try:
      out["meteor"] = float(scorer.compute_score(gts, res)[0])
    finally:
      del scorer   # stops the Java subprocess
  return out


# ---- the model side --------------------------------------------------------------------------------


def check_decoder(ctx: "common.EvalContext", what="captioning"):
  if not hasattr(ctx.model, "decode") or getattr(ctx.model, "decoder", None) is None:
    raise ValueError(f"evals: {what} needs a caption decoder, but model.kind="
                     f"{ctx.config.model.kind!r} has none (use a 'coca' model)")
  if ctx.tokenizer.bos_id < 0:
    raise ValueError("evals: captioning needs a tokenizer with a bos token to start decoding")


def max_decode_len(config, requested=None) -> int:
  """Generated tokens (eos included): at most context_length - 1, so bos + caption fits."""
  limit = int(config.model.text.context_length) - 1
  if requested is None or requested <= 0:
    return limit
  if requested > limit:
    raise ValueError(f"max_len={requested} exceeds model.text.context_length - 1 = {limit}")
  return int(requested)


def make_generate_fn(model, *, max_len: int, beam_size: int, alpha: float, bos_id: int,
                     eos_id: int, pad_id: int):
  """fn(params, images [B, H, W, 3]) -> (tokens int32 [B, max_len], scores float32 [B]).

  Greedy when beam_size == 1, else beam search (best hypothesis); both decode with the
  decoder's KV cache (`models.init_cache`, one token per `decode=True` call).
  """
  from vlm_jax import models  # pylint: disable=g-import-not-at-top

  def fn(params, images):
    image_tokens = model.apply({"params": params}, images, method="image_tokens")
    batch = images.shape[0]
    if beam_size > 1:   # example-major beams: rows i*K .. i*K+K-1 belong to example i
      image_tokens = jnp.repeat(image_tokens, beam_size, axis=0)
    cache = models.init_cache(model, {"params": params}, image_tokens, max_len)

    def logits_fn(tokens, cache):
      logits, mutated = model.apply({"params": params, "cache": cache}, image_tokens,
                                    tokens[:, None], decode=True, method="decode",
                                    mutable=["cache"])
      return logits[:, 0], mutated["cache"]

    kw = dict(batch_size=batch, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if beam_size == 1:
      res = decode_lib.greedy(logits_fn, cache, **kw)
      return res.tokens, res.scores
    res = decode_lib.beam_search(logits_fn, cache, beam_size=beam_size, alpha=alpha, **kw)
    return res.tokens[:, 0], res.scores[:, 0]
  return fn


def _caption_nll(model, params, image_tokens, captions, pad_id):
  """Teacher-forced NLL of captions [B, K, L] given image tokens [B, N, W]: per-caption summed
  negative log-likelihood and real-token counts, both [B, K]."""
  b, k, length = captions.shape
  tokens = jnp.repeat(image_tokens, k, axis=0)
  text = captions.reshape(b * k, length)
  logits = model.apply({"params": params}, tokens, text, method="decode")
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = text[:, 1:]
  mask = (targets != pad_id).astype(jnp.float32)
  token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  nll = -jnp.sum(token_logp * mask, axis=-1)
  return nll.reshape(b, k), jnp.sum(mask, axis=-1).reshape(b, k)


def _batch_fn(model, generate, pad_id, with_nll):
  def fn(params, batch):
    tokens, _ = generate(params, batch["image"])
    out = dict(tokens=tokens, mask=batch["mask"], captions=batch["captions"],
               captions_mask=batch["captions_mask"])
    if with_nll:
      image_tokens = model.apply({"params": params}, batch["image"], method="image_tokens")
      out["nll"], out["ntok"] = _caption_nll(model, params, image_tokens, batch["captions"],
                                             pad_id)
    return out
  return fn


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  """Captions every image of the split, scores them against its reference captions, and (with
  eval.loglik) measures the references' per-token log-likelihood. Metrics:
  caption/<tag>/{bleu1..4, cider, rouge_l, meteor, nll, perplexity, num_images}."""
  check_decoder(ctx)
  tok = ctx.tokenizer
  max_len = max_decode_len(ctx.config, eval_config.get("max_len"))
  beam = int(eval_config.get("beam_size") or 1)
  alpha = float(eval_config.get("length_penalty") or 0.0)
  metrics_list = [m.strip() for m in str(eval_config.metrics).split(",") if m.strip()]
  scorer_tok = eval_config.get("tokenizer") or "auto"
  if scorer_tok not in ("auto", "java", "python"):
    raise ValueError(f"evals.<caption>.tokenizer: unknown caption tokenizer {scorer_tok!r}; "
                     "expected auto, java or python")
  use_java = {"auto": None, "java": True, "python": False}[scorer_tok]
  with_nll = bool(eval_config.get("loglik", True))
  generate = make_generate_fn(ctx.model, max_len=max_len, beam_size=beam, alpha=alpha,
                              bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  key = ("caption", max_len, beam, alpha, with_nll, tok.bos_id, tok.eos_id, tok.pad_id)
  fn = _batch_fn(ctx.model, generate, tok.pad_id, with_nll)

  data = common.eval_data_config(ctx.config, eval_config, all_captions=True)
  predictions, references = [], []
  nll_sum, ntok_sum = 0.0, 0.0
  for batch in common.iterate_batches(ctx, data, common.entry_batch_size(ctx.config, eval_config)):
    out = ctx.call(key, fn, batch)
    mask = out["mask"]
    predictions.extend(tok.decode(out["tokens"][mask]))
    for caps, cmask in zip(out["captions"][mask], out["captions_mask"][mask]):
      references.append(tok.decode(caps[cmask]))
    if with_nll:
      valid = mask[:, None] & out["captions_mask"]
      nll_sum += float(np.sum(np.where(valid, out["nll"], 0.0), dtype=np.float64))
      ntok_sum += float(np.sum(np.where(valid, out["ntok"], 0.0), dtype=np.float64))

  metrics = score_captions(predictions, references, metrics_list, use_java=use_java)
  if with_nll and ntok_sum:
    metrics["nll"] = nll_sum / ntok_sum
    metrics["perplexity"] = float(np.exp(nll_sum / ntok_sum))
  metrics["num_images"] = float(len(predictions))
  ctx.artifacts[f"caption/{tag}"] = [{"prediction": p, "references": r}
                                     for p, r in zip(predictions, references)]
  for p, r in list(zip(predictions, references))[:int(eval_config.get("log_examples", 3))]:
    logging.info("caption/%s: %r  (reference: %r)", tag, p, r[0] if r else "")
  return {f"caption/{tag}/{k}": v for k, v in metrics.items()}
