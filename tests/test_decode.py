"""Greedy / beam search on a small hand-written recurrent model (no Transformer needed).

The model is an RNN over token embeddings: h_t = tanh(A h_{t-1} + E[x_t]), logits = W h_t + b.
Its one-step form carries h in the cache (plus a shared step counter, a leaf without a batch
dimension, which beam reordering must leave alone); its whole-sequence form runs the RNN over the
entire prefix, so "cached decoding == full recomputation" is a real check of the search loops.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decoding as decode

PAD, BOS, EOS = 0, 1, 2
VOCAB, HIDDEN = 6, 8


def make_rnn(seed, eos_bias=0.0):
  rng = np.random.RandomState(seed)
  emb = jnp.asarray(rng.randn(VOCAB, HIDDEN), jnp.float32)
  a = jnp.asarray(rng.randn(HIDDEN, HIDDEN) * 0.6, jnp.float32)
  w = jnp.asarray(rng.randn(HIDDEN, VOCAB) * 1.5, jnp.float32)
  bias = np.zeros(VOCAB, np.float32)
  bias[[PAD, BOS]] = -30.0   # the model never wants to emit pad / bos
  bias[EOS] = eos_bias
  bias = jnp.asarray(bias)

  def cell(h, tok):
    h = jnp.tanh(h @ a + emb[tok])
    return h, h @ w + bias

  def step_fn(tokens, cache):
    h, count = cache
    h, logits = cell(h, tokens)
    return logits, (h, count + 1)

  def full_fn(tokens):   # [N, L] -> [N, L, V]
    h0 = jnp.zeros((tokens.shape[0], HIDDEN))
    _, logits = jax.lax.scan(cell, h0, tokens.T)
    return jnp.swapaxes(logits, 0, 1)

  def init_cache(n):
    return (jnp.zeros((n, HIDDEN)), jnp.array(0, jnp.int32))

  return step_fn, full_fn, init_cache


def seq_logp(full_fn, seq):
  """Sum of log-probs of generated tokens `seq` (after bos) under the whole-sequence model."""
  toks = jnp.asarray([[BOS] + list(seq)], jnp.int32)
  logp = jax.nn.log_softmax(full_fn(toks)[0], axis=-1)
  return float(sum(logp[t, s] for t, s in enumerate(seq)))


@pytest.mark.parametrize("seed,eos_bias", [(0, 0.0), (1, 2.0), (2, -3.0)])
def test_greedy_cached_equals_full_recomputation(seed, eos_bias):
  step_fn, full_fn, init_cache = make_rnn(seed, eos_bias)
  b, max_len = 5, 7
  kw = dict(batch_size=b, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  # Different start states per row, so the rows decode differently.
  h0 = jnp.asarray(np.random.RandomState(seed + 10).randn(b, HIDDEN) * 0.0)
  cached = jax.jit(lambda c: decode.greedy(step_fn, c, **kw))((h0, jnp.array(0)))
  full_step, full_cache = decode.full_recompute_logits_fn(full_fn, b, max_len, PAD)
  full = jax.jit(lambda c: decode.greedy(full_step, c, **kw))(full_cache)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-5)
  # The hand-check: greedy really is the arg-max chain, with pad after eos.
  toks = np.asarray(cached.tokens[0])
  prefix = [BOS]
  for t in range(max_len):
    logits = full_fn(jnp.asarray([prefix]))[0, -1]
    nxt = int(jnp.argmax(logits))
    assert toks[t] == nxt
    prefix.append(nxt)
    if nxt == EOS:
      assert np.all(toks[t + 1:] == PAD)
      assert int(cached.lengths[0]) == t + 1
      break
  else:
    assert int(cached.lengths[0]) == max_len
  expected_score = seq_logp(full_fn, [int(x) for x in toks[:int(cached.lengths[0])]])
  np.testing.assert_allclose(float(cached.scores[0]), expected_score, rtol=1e-5)


@pytest.mark.parametrize("seed,eos_bias", [(3, 0.0), (4, 1.5), (5, -2.0), (6, 3.0)])
def test_beam_one_equals_greedy(seed, eos_bias):
  step_fn, _, init_cache = make_rnn(seed, eos_bias)
  b, max_len = 4, 6
  kw = dict(batch_size=b, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  g = jax.jit(lambda c: decode.greedy(step_fn, c, **kw))(init_cache(b))
  bs = jax.jit(lambda c: decode.beam_search(step_fn, c, beam_size=1, **kw))(init_cache(b))
  np.testing.assert_array_equal(bs.tokens[:, 0], g.tokens)
  np.testing.assert_allclose(bs.scores[:, 0], g.scores, rtol=1e-5)
  np.testing.assert_array_equal(bs.lengths[:, 0], g.lengths)


def brute_force_best(full_fn, max_len, alpha):
  """Best hypothesis over all sequences of real tokens (3..5) ended by eos or truncated."""
  real = range(3, VOCAB)
  best = (-np.inf, None)
  for n in range(0, max_len + 1):
    for body in itertools.product(real, repeat=n):
      seqs = [list(body) + [EOS]] if n < max_len else [list(body)]
      for seq in seqs:
        score = seq_logp(full_fn, seq) / float(decode.length_penalty(len(seq), alpha))
        if score > best[0]:
          best = (score, seq)
  return best


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_exhaustive_beam_equals_brute_force(alpha):
  # 3 real tokens + eos and max_len 3: at most 9 x 4 = 36 meaningful candidates per step, so
  # with 36 beams every prefix survives and every eos candidate ranks in the top K: exact search.
  step_fn, full_fn, init_cache = make_rnn(7, eos_bias=0.5)
  max_len, k = 3, 36
  res = decode.beam_search(step_fn, init_cache(k), batch_size=1, beam_size=k, max_len=max_len,
                           bos_id=BOS, eos_id=EOS, pad_id=PAD, alpha=alpha)
  score, seq = brute_force_best(full_fn, max_len, alpha)
  got = [int(x) for x in res.tokens[0, 0, :int(res.lengths[0, 0])]]
  assert got == seq
  np.testing.assert_allclose(float(res.scores[0, 0]), score, rtol=1e-5)
  # Hypotheses come best first, and each one's score is its true penalised log-prob.
  scores = np.asarray(res.scores[0])
  assert np.all(np.diff(scores) <= 1e-6)
  for j in range(3):
    hyp = [int(x) for x in res.tokens[0, j, :int(res.lengths[0, j])]]
    assert all(x == PAD for x in np.asarray(res.tokens[0, j, len(hyp):]))
    ref = seq_logp(full_fn, hyp) / float(decode.length_penalty(len(hyp), alpha))
    np.testing.assert_allclose(scores[j], ref, rtol=1e-5)


def test_beam_cached_equals_full_recomputation_batched():
  step_fn, full_fn, init_cache = make_rnn(8, eos_bias=1.0)
  b, k, max_len = 3, 3, 5
  kw = dict(batch_size=b, beam_size=k, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD,
            alpha=0.6)
  cached = jax.jit(lambda c: decode.beam_search(step_fn, c, **kw))(init_cache(b * k))
  full_step, full_cache = decode.full_recompute_logits_fn(full_fn, b * k, max_len, PAD)
  full = jax.jit(lambda c: decode.beam_search(full_step, c, **kw))(full_cache)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-5)
  # Beam search never does worse than greedy on the (penalised) objective.
  g = decode.greedy(step_fn, init_cache(b), batch_size=b, max_len=max_len, bos_id=BOS,
                    eos_id=EOS, pad_id=PAD)
  g_pen = np.asarray(g.scores) / np.asarray(decode.length_penalty(g.lengths, 0.6))
  assert np.all(np.asarray(cached.scores[:, 0]) >= g_pen - 1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_stop_at_in_a_longer_buffer_equals_the_exact_buffer(beam):
  """One compiled search with a 16-token buffer and the length as a traced argument gives, for
  every length, what a search compiled for exactly that length gives (then pad)."""
  step_fn, _, init_cache = make_rnn(7, eos_bias=-4.0)   # rarely ends early: the limit matters
  b, buffer = 3, 16
  kw = dict(batch_size=b, bos_id=BOS, eos_id=EOS, pad_id=PAD)

  def search(max_len, stop_at=None):
    if beam == 1:
      return decode.greedy(step_fn, init_cache(b), max_len=max_len, stop_at=stop_at, **kw)
    res = decode.beam_search(step_fn, init_cache(b * beam), beam_size=beam, max_len=max_len,
                             alpha=0.6, stop_at=stop_at, **kw)
    return decode.DecodeResult(res.tokens[:, 0], res.scores[:, 0], res.lengths[:, 0])

  bucketed = jax.jit(lambda n: search(buffer, n))
  for length in (3, 5, 9):
    got, want = bucketed(length), jax.jit(lambda length=length: search(length))()
    np.testing.assert_array_equal(got.tokens[:, :length], want.tokens)
    assert np.all(np.asarray(got.tokens[:, length:]) == PAD)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    np.testing.assert_array_equal(got.lengths, want.lengths)
  assert int(np.max(bucketed(9).lengths)) == 9      # some row did run to the limit
  assert bucketed._cache_size() == 1                 # pylint: disable=protected-access


def test_buffer_length_rounds_up_to_a_power_of_two_within_the_context():
  assert [decode.buffer_length(n, 63) for n in (1, 8, 16, 17, 33, 63)] == [16, 16, 16, 32, 63, 63]
  assert decode.buffer_length(20, 24) == 24      # capped by what fits
  assert decode.buffer_length(20, 10) == 20      # never below the request
  with pytest.raises(ValueError, match="max_len must be >= 1"):
    decode.buffer_length(0, 10)


def test_bad_arguments():
  step_fn, _, init_cache = make_rnn(0)
  with pytest.raises(ValueError, match="beam_size"):
    decode.beam_search(step_fn, init_cache(1), batch_size=1, beam_size=0, max_len=3, bos_id=BOS,
                       eos_id=EOS)
  with pytest.raises(ValueError, match="alpha"):
    decode.beam_search(step_fn, init_cache(1), batch_size=1, beam_size=1, max_len=3, bos_id=BOS,
                       eos_id=EOS, alpha=-1.0)
  with pytest.raises(ValueError, match=r"stop_at=5 must be in \[1, max_len=3\]"):
    decode.greedy(step_fn, init_cache(1), batch_size=1, max_len=3, bos_id=BOS, eos_id=EOS,
                  stop_at=5)
