"""Autoregressive decoding: greedy and beam search over a generic one-step logits function.

Both searches are written against one small interface so they can be tested with any model:

    logits_fn(tokens, cache) -> (logits, cache)

`tokens` int32 [N] holds the last token of each of N running sequences, `logits` float [N, V] the
next-token logits, and `cache` is any pytree (e.g. a Flax 'cache' collection of KV buffers). The
searches never look inside the cache except to reorder beams: every cache leaf whose leading
dimension equals N is treated as per-sequence state and gathered when beams are reordered; other
leaves (e.g. the scalar `cache_index`) are shared by all sequences and left alone, and so are
leaves under a key starting with `context_` (the image tokens' keys/values, the same for every
beam of an example).

Sequences start from `bos_id` (which is not part of the output) and stop at `eos_id` (which is).
Outputs are int32 [B, max_len] with `pad_id` after the end of each sequence, i.e. the layout the
tokenizer decodes. Both functions are pure and jit-compatible (`max_len`, `beam_size` and the token
ids are static) and loop with `lax.while_loop`, exiting early once every sequence is finished.

`max_len` sizes the buffers (tokens, and the callers' KV caches); `stop_at`, which may be a traced
scalar, is how many tokens are generated (default `max_len`). Callers compile once per buffer
size and pass the requested length as an argument: `buffer_length` rounds a request up to a
power of two, so asking for 8, 12 or 16 tokens runs one compiled function (before, every new
length compiled again).

Scores are sums of token log-probabilities; beam search ranks finished hypotheses by
`score / length_penalty(length)` with the GNMT penalty ((5 + length) / 6) ** alpha, where length
counts generated tokens including eos (alpha = 0 ranks by raw log-probability).
"""
from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, Any], Tuple[jax.Array, Any]]

NEG_INF = -1.0e9   # a finite "minus infinity": keeps arithmetic on dead beams NaN-free


class DecodeResult(NamedTuple):
  tokens: jax.Array   # int32 [B, max_len] (greedy) or [B, K, max_len] (beam, best first)
  scores: jax.Array   # float32 [B] / [B, K]: sum of log-probs (beam: length-penalised)
  lengths: jax.Array  # int32 [B] / [B, K]: generated tokens including eos


def length_penalty(length, alpha):
  """GNMT length penalty ((5 + length) / 6) ** alpha (1 when alpha == 0)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# Cache leaves under a key starting with this prefix hold what the beams of one example share
# (the keys/values of its image tokens): reordering beams leaves them as they are.
SHARED_PREFIX = "context_"


def buffer_length(max_len: int, room: int, minimum: int = 16) -> int:
  """The static buffer that serves a request for `max_len` tokens: the next power of two >=
  max_len (at least `minimum`), at most `room` (what fits in the model's context), and never less
  than max_len itself."""
  max_len, room = int(max_len), int(room)
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  bucket = max(int(minimum), 1 << (max_len - 1).bit_length())
  return max(max_len, min(bucket, room))


def _stop_at(stop_at, max_len: int):
  """The number of tokens to generate, as an int32 scalar (<= max_len, the buffer length)."""
  if stop_at is None:
    return jnp.array(max_len, jnp.int32)
  if isinstance(stop_at, int) and not 1 <= stop_at <= max_len:
    raise ValueError(f"stop_at={stop_at} must be in [1, max_len={max_len}]")
  return jnp.minimum(jnp.asarray(stop_at, jnp.int32), max_len)


def _gather_beams(tree, indices, batch, beam):
  """Reorders every per-sequence leaf [batch * beam, ...] by `indices` int32 [batch, beam]
  (beams only move within their example, so leaves shared by an example's beams are kept)."""
  flat = (indices + jnp.arange(batch)[:, None] * beam).reshape(-1)

  def gather(path, x):
    shared = any(str(getattr(k, "key", "")).startswith(SHARED_PREFIX) for k in path)
    if not shared and hasattr(x, "ndim") and x.ndim >= 1 and x.shape[0] == batch * beam:
      return jnp.take(x, flat, axis=0)
    return x
  return jax.tree_util.tree_map_with_path(gather, tree)


def greedy(logits_fn: LogitsFn, cache, *, batch_size: int, max_len: int, bos_id: int,
           eos_id: int, pad_id: int = 0, stop_at=None) -> DecodeResult:
  """Greedy decoding: the arg-max token at every step, until eos or `stop_at` tokens."""
  b = batch_size
  limit = _stop_at(stop_at, max_len)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < limit) & ~jnp.all(done)

  def body(state):
    step, last, cache, done, out, score = state
    logits, cache = logits_fn(last, cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, pad_id, tok)
    score = score + jnp.where(done, 0.0, tok_logp)
    out = out.at[:, step].set(tok)
    done = done | (tok == eos_id)
    return step + 1, tok, cache, done, out, score

  init = (jnp.array(0, jnp.int32), jnp.full((b,), bos_id, jnp.int32), cache,
          jnp.zeros((b,), bool), jnp.full((b, max_len), pad_id, jnp.int32),
          jnp.zeros((b,), jnp.float32))
  _, _, _, _, out, score = jax.lax.while_loop(cond, body, init)
  return DecodeResult(out, score, _lengths(out, eos_id, pad_id))


def _lengths(tokens, eos_id, pad_id):
  """Generated length including eos: index of the first eos + 1, else the non-pad count."""
  is_eos = tokens == eos_id
  first_eos = jnp.argmax(is_eos, axis=-1)
  non_pad = jnp.sum(tokens != pad_id, axis=-1)
  return jnp.where(jnp.any(is_eos, axis=-1), first_eos + 1, non_pad).astype(jnp.int32)


class _BeamState(NamedTuple):
  step: jax.Array           # int32 scalar: tokens generated so far
  alive_seqs: jax.Array     # int32 [B, K, max_len]
  alive_logp: jax.Array     # float32 [B, K]: summed log-probs (NEG_INF for empty slots)
  fin_seqs: jax.Array       # int32 [B, K, max_len]
  fin_scores: jax.Array     # float32 [B, K]: length-penalised (NEG_INF for empty slots)
  fin_lengths: jax.Array    # int32 [B, K]
  cache: Any                # per-sequence leaves [B * K, ...]


def beam_search(logits_fn: LogitsFn, cache, *, batch_size: int, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, pad_id: int = 0, alpha: float = 0.0,
                stop_at=None) -> DecodeResult:
  """Beam search with `beam_size` beams per example and GNMT length penalty `alpha`.

  `cache` must already be laid out for batch_size * beam_size sequences (example-major: the
  beams of example i are rows i*K .. i*K+K-1), e.g. by repeating every example's inputs K times.

  At each step the 2K best continuations of the alive beams are taken (so that K of them are not
  eos); those among the K best that end in eos join the finished pool (best K kept, by penalised
  score), the best K that do not end stay alive. Hypotheses still alive after `stop_at` tokens
  (default max_len) compete as truncated ones. The loop stops early once no alive beam can beat
  the worst kept finished one. Returns the K finished hypotheses of every example, best first.
  """
  b, k = batch_size, beam_size
  alpha = float(alpha)
  limit = _stop_at(stop_at, max_len)
  if k < 1:
    raise ValueError(f"beam_size must be >= 1, got {k}")
  if alpha < 0:
    raise ValueError(f"length penalty alpha must be >= 0, got {alpha}")

  def cond(s: _BeamState):
    # The best an alive beam can still reach: its log-prob can only fall, and with alpha >= 0 the
    # penalty divides by at most length_penalty(limit).
    best_alive = jnp.max(s.alive_logp, axis=-1)
    bound = jnp.where(best_alive < 0, best_alive / length_penalty(limit, alpha), best_alive)
    worst_fin = jnp.min(s.fin_scores, axis=-1)
    can_improve = (bound > worst_fin) & (best_alive > NEG_INF / 2)
    return (s.step < limit) & jnp.any(can_improve)

  def body(s: _BeamState):
    last = jnp.where(s.step == 0, bos_id,
                     jax.lax.dynamic_index_in_dim(s.alive_seqs, jnp.maximum(s.step - 1, 0),
                                                  axis=2, keepdims=False))
    logits, cache = logits_fn(last.reshape(b * k), s.cache)
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    cand = (s.alive_logp[:, :, None] + logp).reshape(b, k * vocab)
    cand_logp, cand_idx = jax.lax.top_k(cand, 2 * k)
    cand_beam = cand_idx // vocab
    cand_tok = (cand_idx % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(s.alive_seqs, cand_beam[:, :, None], axis=1)
    cand_seqs = jax.lax.dynamic_update_index_in_dim(cand_seqs, cand_tok, s.step, axis=2)
    # Candidates that extend an empty slot are dead (their logp is about NEG_INF).
    valid = cand_logp > NEG_INF / 2
    is_eos = cand_tok == eos_id

    # Finished pool: merge the eos candidates into the kept finished hypotheses. Only an eos
    # candidate that ranks among the K best of this step may finish (as in the usual beam search
    # of machine translation): a hypothesis that would not have survived as a beam is not
    # promoted just because it ended, and so a single beam is exactly greedy decoding.
    length = s.step + 1
    in_top_k = jnp.arange(2 * k)[None, :] < k
    new_fin = jnp.where(is_eos & valid & in_top_k, cand_logp / length_penalty(length, alpha),
                        NEG_INF)
    fin_seqs = jnp.concatenate([s.fin_seqs, cand_seqs], axis=1)
    fin_scores = jnp.concatenate([s.fin_scores, new_fin], axis=1)
    fin_lengths = jnp.concatenate([s.fin_lengths, jnp.full((b, 2 * k), length, jnp.int32)], axis=1)
    fin_scores, top = jax.lax.top_k(fin_scores, k)
    fin_seqs = jnp.take_along_axis(fin_seqs, top[:, :, None], axis=1)
    fin_lengths = jnp.take_along_axis(fin_lengths, top, axis=1)

    # Alive beams: the best K candidates that did not end.
    alive_cand = jnp.where(is_eos | ~valid, NEG_INF, cand_logp)
    alive_logp, top = jax.lax.top_k(alive_cand, k)
    alive_seqs = jnp.take_along_axis(cand_seqs, top[:, :, None], axis=1)
    src_beam = jnp.take_along_axis(cand_beam, top, axis=1)
    cache = _gather_beams(cache, src_beam, b, k)
    return _BeamState(s.step + 1, alive_seqs, alive_logp, fin_seqs, fin_scores, fin_lengths, cache)

  # Only beam 0 starts alive, so the first step does not pick K copies of the same token.
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  init = _BeamState(
      step=jnp.array(0, jnp.int32),
      alive_seqs=jnp.full((b, k, max_len), pad_id, jnp.int32),
      alive_logp=alive_logp,
      fin_seqs=jnp.full((b, k, max_len), pad_id, jnp.int32),
      fin_scores=jnp.full((b, k), NEG_INF, jnp.float32),
      fin_lengths=jnp.zeros((b, k), jnp.int32),
      cache=cache)
  s = jax.lax.while_loop(cond, body, init)

  # Hypotheses still alive (only possible when the loop ran to the limit) compete as truncated.
  alive_scores = jnp.where(s.alive_logp > NEG_INF / 2,
                           s.alive_logp / length_penalty(s.step, alpha), NEG_INF)
  all_seqs = jnp.concatenate([s.fin_seqs, s.alive_seqs], axis=1)
  all_scores = jnp.concatenate([s.fin_scores, alive_scores], axis=1)
  all_lengths = jnp.concatenate([s.fin_lengths, jnp.full((b, k), s.step, jnp.int32)], axis=1)
  # Prefer finished hypotheses on exact ties (stable top_k keeps the lower index first).
  scores, top = jax.lax.top_k(all_scores, k)
  seqs = jnp.take_along_axis(all_seqs, top[:, :, None], axis=1)
  lengths = jnp.take_along_axis(all_lengths, top, axis=1)
  return DecodeResult(seqs, scores, lengths)


def full_recompute_logits_fn(full_logits_fn: Callable[[jax.Array], jax.Array], batch: int,
                             max_len: int, pad_id: int = 0):
  """Wraps a whole-sequence model as a one-step `logits_fn`, recomputing the prefix every step.

  `full_logits_fn(tokens [N, max_len + 1]) -> logits [N, max_len + 1, V]` where position t
  predicts token t + 1 (teacher forcing, causal). The returned cache is (tokens buffer, position),
  so the searches above run unchanged: this is the reference that KV-cache decoding must match.
  Returns (logits_fn, initial_cache).
  """
  def logits_fn(tokens, cache):
    buf, pos = cache
    buf = jax.lax.dynamic_update_index_in_dim(buf, tokens.astype(jnp.int32), pos, axis=1)
    logits = full_logits_fn(buf)
    return jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), (buf, pos + 1)

  init = (jnp.full((batch, max_len + 1), pad_id, jnp.int32), jnp.array(0, jnp.int32))
  return logits_fn, init
