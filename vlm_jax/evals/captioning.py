"""Captioning: generate captions (greedy / beam search with the decoder's KV cache), score them
with the COCO caption metrics, and measure the log-likelihood of the reference captions.

Scoring uses pycocoevalcap's own scorers (BLEU-1..4, CIDEr, ROUGE-L, and METEOR when Java is
available) on captions tokenised the COCO way: with the Stanford PTB tokenizer (Java) when Java is
installed, otherwise with `simple_ptb_tokenize`, a Python approximation that agrees with it on
ordinary lower-case English (no quotes, contractions or hyphenated words). SPICE is never run: it
downloads Stanford models on first use.

Metric names: caption/<name>/{bleu1,bleu2,bleu3,bleu4,cider,rouge_l,meteor,loglik,perplexity}.
"""
import contextlib
import functools
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, List, Mapping, Sequence

from absl import logging
import numpy as np

from vlm_jax import decoding
from vlm_jax.data import ops
from vlm_jax.data import retrieval
from vlm_jax.evals import common

CAPTION_METRICS = ("bleu", "cider", "rouge", "meteor")
CAPTION_TOKENIZERS = ("auto", "java", "python")


def predict_fns(entry):
  """The task's predict functions this evaluator calls."""
  return ("generate", "caption_nll") if entry.get("loglik", True) else ("generate",)


def splits(config, entry, tokenizer=None):
  """[(data config, field ops)] this evaluator reads (checked before training)."""
  length = common.text_length(config)
  field_ops = [ops.AllCaptions(tokenizer, length, entry.max_captions)]
  if entry.get("neighbours"):
    field_ops.append(ops.RetrievalPrompt(tokenizer, retrieval_prompt_length(config, entry),
                                         load_entry_neighbours(config, entry)))
  return [(common.eval_data_config(config, entry), field_ops)]


def retrieval_prompt_length(config, entry) -> int:
  """Prompt tokens of retrieval-augmented generation: what max_len leaves of the context."""
  return common.text_length(config) - int(entry.max_len)


def load_entry_neighbours(config, entry):
  k = entry.get("neighbours_k") or config.data.get("neighbours_k") or 3
  return retrieval.load_neighbours(entry.neighbours, int(k), field="evals.<caption>.neighbours")


def check(config, entry) -> list:
  """Problems with the entry's own fields."""
  problems = []
  if (entry.get("tokenizer") or "auto") not in CAPTION_TOKENIZERS:
    problems.append(f"tokenizer: unknown caption tokenizer {entry.tokenizer!r}; expected one of "
                    f"{', '.join(CAPTION_TOKENIZERS)}")
  unknown = [m.strip() for m in str(entry.metrics).split(",")
             if m.strip() and m.strip() not in CAPTION_METRICS]
  if unknown:
    problems.append(f"metrics: unknown {unknown}; expected some of {', '.join(CAPTION_METRICS)}")
  if entry.get("beam_size") is not None and entry.beam_size < 1:
    problems.append(f"beam_size: {entry.beam_size} must be >= 1")
  limit = common.text_length(config) - 1
  if entry.get("max_len") and entry.max_len > limit:
    problems.append(f"max_len: {entry.max_len} exceeds the model's context length - 1 = {limit}")
  if entry.get("neighbours"):
    if not entry.get("max_len"):
      problems.append("max_len: must be set with neighbours (the prompt of retrieved captions "
                      "gets the rest of the context length)")
    elif retrieval_prompt_length(config, entry) < 8:
      problems.append(f"max_len: {entry.max_len} leaves "
                      f"{retrieval_prompt_length(config, entry)} of the context length for the "
                      "retrieved captions; at least 8 are needed")
    if entry.get("loglik", True):
      problems.append("loglik: the references' likelihood is measured without a prompt, so it "
                      "does not combine with neighbours; set loglik=False")
    try:
      load_entry_neighbours(config, entry)
    except ValueError as e:
      problems.append(str(e))
  return problems


def default_config(**fields):
  c = common.entry_config("caption")
  c.max_captions = 5               # reference captions per image
  c.max_len = common.placeholder(int)   # generated tokens incl. eos; None: context_length - 1
  c.beam_size = 1                  # 1 = greedy
  c.length_penalty = 0.0           # GNMT alpha for beam search
  c.metrics = "bleu,cider,rouge"   # add ",meteor" for METEOR (needs Java, ~10-30 s per eval)
  c.tokenizer = "auto"             # caption tokenisation for scoring: 'auto' | 'java' | 'python'
  c.loglik = True                  # also the references' per-token NLL / perplexity
  c.log_examples = 3
  # Retrieval-augmented captioning: `python -m vlm_jax.index neighbours` output for the evaluated
  # images (from any datastore: swap it without retraining); needs max_len and loglik=False.
  c.neighbours = common.placeholder(str)
  c.neighbours_k = common.placeholder(int)   # None: data.neighbours_k
  c.update(fields)
  return c

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
    with _java_stderr_kept_back():
      return PTBTokenizer().tokenize({k: [{"caption": c} for c in v]
                                      for k, v in captions.items()})
  return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}


@contextlib.contextmanager
def _java_stderr_kept_back():
  """The Java tokenizer prints a line per call on the process's stderr; keep it back (file
  descriptor 2 goes to a temporary file) and show it only if the call fails."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


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


def check_generation(ctx: "common.EvalContext", who="evals: captioning"):
  """The task must generate captions and the tokenizer must have a bos to start from."""
  ctx.predict_fn("generate", who)
  if ctx.tokenizer is None or ctx.tokenizer.bos_id < 0:
    raise ValueError(f"{who}: needs a tokenizer with a bos token to start decoding")


def max_decode_len(ctx: "common.EvalContext", requested=None) -> int:
  """Generated tokens (eos included): at most context_length - 1, so bos + caption fits."""
  limit = ctx.context_length - 1
  if requested is None or requested <= 0:
    return limit
  if requested > limit:
    raise ValueError(f"max_len={requested} exceeds the model's context length - 1 = {limit}")
  return int(requested)


def generate_kwargs(ctx: "common.EvalContext", max_len, beam_size, length_penalty,
                    prompt_len: int = 0) -> tuple:
  """(the static arguments of the task's 'generate' predict function, the tokens to generate).

  The static `max_len` is the token buffer: the request rounded up to a power of two that fits
  the context after a prompt of `prompt_len` tokens (`decoding.buffer_length`); the request
  itself is passed as `stop_at`, a traced argument. So requests for different lengths share one
  compiled function. Callers cut the outputs to the request."""
  tok = ctx.tokenizer
  requested = max_decode_len(ctx, max_len)
  buffer = decoding.buffer_length(requested, ctx.context_length - 1 - int(prompt_len))
  return dict(max_len=buffer, beam_size=int(beam_size or 1),
              length_penalty=float(length_penalty or 0.0), bos_id=int(tok.bos_id),
              eos_id=int(tok.eos_id), pad_id=int(tok.pad_id)), requested


def evaluate(ctx: "common.EvalContext", tag: str, eval_config) -> Dict[str, float]:
  """Captions every image of the split, scores them against its reference captions, and (with
  eval.loglik) measures the references' per-token log-likelihood. Metrics:
  caption/<tag>/{bleu1..4, cider, rouge_l, meteor, nll, perplexity, num_images}."""
  who = f"evals: captioning on {tag!r}"
  check_generation(ctx, who)
  tok = ctx.tokenizer
  metrics_list = [m.strip() for m in str(eval_config.metrics).split(",") if m.strip()]
  scorer_tok = eval_config.get("tokenizer") or "auto"
  if scorer_tok not in CAPTION_TOKENIZERS:
    raise ValueError(f"evals.<caption>.tokenizer: unknown caption tokenizer {scorer_tok!r}; "
                     f"expected one of {', '.join(CAPTION_TOKENIZERS)}")
  use_java = {"auto": None, "java": True, "python": False}[scorer_tok]
  with_nll = bool(eval_config.get("loglik", True))
  prompt_len = (retrieval_prompt_length(ctx.config, eval_config)
                if eval_config.get("neighbours") else 0)
  static, requested = generate_kwargs(ctx, eval_config.get("max_len"),
                                      eval_config.get("beam_size"),
                                      eval_config.get("length_penalty"), prompt_len)
  generate = ctx.predict_fn("generate", who)
  caption_nll = ctx.predict_fn("caption_nll", who) if with_nll else None

  def fn(params, batch, stop_at):
    tokens, _ = generate(params, batch, stop_at=stop_at, **static)
    out = dict(tokens=tokens, mask=batch["mask"], captions=batch["captions"],
               captions_mask=batch["captions_mask"])
    if with_nll:
      out["nll"], out["ntok"] = caption_nll(params, batch)
    if "prompt_truncated" in batch:
      out["prompt_truncated"] = batch["prompt_truncated"]
    return out

  key = ("caption", with_nll, tuple(sorted(static.items())))
  (data, field_ops), = splits(ctx.config, eval_config, tok)
  predictions, references = [], []
  nll_sum, ntok_sum, prompts_cut = 0.0, 0.0, 0
  for batch in common.iterate_batches(ctx, data, field_ops,
                                      common.entry_batch_size(ctx.config, eval_config), who=who):
    out = ctx.call(key, fn, batch, np.int32(requested))
    mask = out["mask"]
    predictions.extend(tok.decode(out["tokens"][mask][:, :requested]))
    for caps, cmask in zip(out["captions"][mask], out["captions_mask"][mask]):
      references.append(tok.decode(caps[cmask]))
    if "prompt_truncated" in out:
      prompts_cut += int(np.sum(out["prompt_truncated"][mask]))
    if with_nll:
      valid = mask[:, None] & out["captions_mask"]
      nll_sum += float(np.sum(np.where(valid, out["nll"], 0.0), dtype=np.float64))
      ntok_sum += float(np.sum(np.where(valid, out["ntok"], 0.0), dtype=np.float64))

  if not predictions and eval_config.get("neighbours"):
    raise ValueError(f"{who}: no image of the split has retrieved captions in "
                     f"{eval_config.neighbours} (are its ids those of this split's images? "
                     "embed this split with the retrieval model and run `index neighbours` on it)")
  metrics = score_captions(predictions, references, metrics_list, use_java=use_java)
  if with_nll and ntok_sum:
    metrics["nll"] = nll_sum / ntok_sum
    metrics["perplexity"] = float(np.exp(nll_sum / ntok_sum))
  metrics["num_images"] = float(len(predictions))
  if eval_config.get("neighbours"):
    metrics["prompts_truncated"] = float(prompts_cut)
  ctx.artifacts[f"caption/{tag}"] = [{"prediction": p, "references": r}
                                     for p, r in zip(predictions, references)]
  for p, r in list(zip(predictions, references))[:int(eval_config.get("log_examples", 3))]:
    logging.info("caption/%s: %r  (reference: %r)", tag, p, r[0] if r else "")
  return {f"caption/{tag}/{k}": v for k, v in metrics.items()}
