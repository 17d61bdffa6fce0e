"""The decoder-only LM: KV-cached prefill + steps equal the full forward pass, the prefix-LM mask,
left padding, grouped-query attention and the scan layout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import layers
from vlm_jax.models import lm

B, N, P, G, W, V = 2, 3, 4, 5, 32, 50


def _model(style, **kw):
  cfg = lm.default_config()
  cfg.style, cfg.width, cfg.num_heads, cfg.mlp_dim = style, W, 4, 48
  if style == "llama":
    cfg.num_kv_heads = 2                    # grouped-query attention: 2 query heads per kv head
  return lm.from_config(cfg, vocab_size=V, max_length=40, **kw)


def _inputs():
  prefix = jax.random.normal(jax.random.key(1), (B, N, W))
  tokens = jax.random.randint(jax.random.key(2), (B, P + G), 1, V)
  return prefix, tokens


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_prefill_then_steps_equal_the_full_forward_pass(style):
  m = _model(style)
  prefix, tokens = _inputs()
  params = m.init(jax.random.key(0), tokens, prefix=prefix)["params"]
  full = m.apply({"params": params}, tokens, prefix=prefix, prefix_len=jnp.full((B,), N + P))
  cache = lm.init_cache(m, params, dict(tokens=jnp.zeros((B, P + G), jnp.int32), prefix=prefix))
  logits, mut = m.apply({"params": params, "cache": cache}, tokens[:, :P], prefix=prefix,
                        prefix_len=jnp.full((B,), N + P), decode=True, mutable=["cache"])
  step = jax.jit(lambda cache, tok: m.apply({"params": params, "cache": cache}, tok,
                                            decode=True, mutable=["cache"]))
  steps = [logits[:, -1]]
  for i in range(G - 1):     # one compiled step, as in a decoding loop
    out, mut = step(mut["cache"], tokens[:, P + i:P + i + 1])
    steps.append(out[:, 0])
  np.testing.assert_allclose(jnp.stack(steps, 1), full[:, P - 1:P + G - 1], atol=2e-5)


def test_fused_attention_lm_equals_the_einsum_lm():
  """model.attention='xla' (jax.nn.dot_product_attention; grouped key/value heads passed as they
  are, rotary positions): the prefix-LM forward pass, its gradients and KV-cached decoding equal
  the einsum path. (GPT-2 blocks share this attention code without the rotation and groups.)"""
  ref, fused = _model("llama"), _model("llama", attention="xla")
  prefix, tokens = _inputs()
  params = ref.init(jax.random.key(0), tokens, prefix=prefix)["params"]
  prefix_len = jnp.full((B,), N + P)
  apply = lambda m, p: m.apply({"params": p}, tokens, prefix=prefix, prefix_len=prefix_len)
  np.testing.assert_allclose(apply(fused, params), apply(ref, params), atol=2e-5)
  loss = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(apply(m, p))))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), loss(fused),
               loss(ref))
  cache = lm.init_cache(fused, params, dict(tokens=jnp.zeros((B, P + 2), jnp.int32),
                                            prefix=prefix))
  _, mut = fused.apply({"params": params, "cache": cache}, tokens[:, :P], prefix=prefix,
                       prefix_len=prefix_len, decode=True, mutable=["cache"])
  step, _ = fused.apply({"params": params, "cache": mut["cache"]}, tokens[:, P:P + 1],
                        decode=True, mutable=["cache"])
  np.testing.assert_allclose(step[:, 0], apply(ref, params)[:, P], atol=2e-5)


def test_auto_attention_is_cudnn_only_where_it_runs():
  resolve = layers.resolve_attention
  assert resolve("auto", jnp.bfloat16, 64, 197, backend="gpu") == "cudnn"
  assert resolve("auto", jnp.bfloat16, 64, 1, backend="gpu") == "einsum"    # a decoding step
  assert resolve("auto", jnp.float32, 64, 197, backend="gpu") == "einsum"
  assert resolve("auto", jnp.bfloat16, 160, 197, backend="gpu") == "einsum"
  assert resolve("auto", jnp.bfloat16, 64, 197, backend="tpu") == "einsum"
  assert resolve("xla", jnp.float32, 64, 1, backend="cpu") == "xla"
  # On this CPU 'auto' builds the reference model: the same outputs as 'einsum', bit for bit.
  prefix, tokens = _inputs()
  auto, ref = _model("llama", attention="auto"), _model("llama")
  params = ref.init(jax.random.key(0), tokens, prefix=prefix)["params"]
  np.testing.assert_array_equal(auto.apply({"params": params}, tokens, prefix=prefix),
                                ref.apply({"params": params}, tokens, prefix=prefix))


def test_left_padded_prompt_predicts_like_an_unpadded_one():
  # Llama-style: rotary positions make a shifted position id visible in every attention score.
  m = _model("llama")
  prefix, tokens = _inputs()
  params = m.init(jax.random.key(0), tokens, prefix=prefix)["params"]
  short = tokens[:, 2:]                     # the prompt without its first two tokens
  want = m.apply({"params": params}, short, prefix=prefix, prefix_len=jnp.full((B,), N + P - 2))
  padded = tokens.at[:, :2].set(0)
  valid = jnp.concatenate([jnp.ones((B, N), bool), padded[:, :P] != 0], axis=1)
  cache = lm.init_cache(m, params, dict(tokens=jnp.zeros((B, P + 1), jnp.int32), prefix=prefix))
  _, mut = m.apply({"params": params, "cache": cache}, padded[:, :P], prefix=prefix,
                   prefix_len=jnp.full((B,), N + P), valid=valid, decode=True, mutable=["cache"])
  got, _ = m.apply({"params": params, "cache": mut["cache"]}, padded[:, P:P + 1], decode=True,
                   mutable=["cache"])
  np.testing.assert_allclose(got[:, 0], want[:, P - 2], atol=2e-5)


def test_prefix_is_bidirectional_and_the_rest_causal():
  m = _model("gpt2")
  prefix, tokens = _inputs()
  params = m.init(jax.random.key(0), tokens, prefix=prefix)["params"]
  run = lambda t: m.apply({"params": params}, t, prefix=prefix, prefix_len=jnp.full((B,), N + P))
  base = run(tokens)
  # Changing the last prompt token changes the logits at the first prompt position (the prompt
  # is seen whole) ...
  changed_prompt = run(tokens.at[:, P - 1].set((tokens[:, P - 1] + 1) % V))
  assert np.abs(changed_prompt[:, 0] - base[:, 0]).max() > 1e-4
  # ... but changing an answer token changes nothing before it.
  changed_answer = run(tokens.at[:, P + 2].set((tokens[:, P + 2] + 1) % V))
  np.testing.assert_allclose(changed_answer[:, :P + 2], base[:, :P + 2], atol=1e-6)
  assert np.abs(changed_answer[:, P + 2] - base[:, P + 2]).max() > 1e-4
  # prefix_len 0 is a plain causal LM: the first position ignores the second token.
  causal = lambda t: m.apply({"params": params}, t)
  np.testing.assert_allclose(causal(tokens.at[:, 1].set(7))[:, 0], causal(tokens)[:, 0],
                             atol=1e-6)


def test_scan_layout_computes_the_same_function():
  plain, scanned = _model("gpt2"), _model("gpt2", scan=True, remat=True)
  prefix, tokens = _inputs()
  params = nn.unbox(plain.init(jax.random.key(0), tokens, prefix=prefix)["params"])
  want = plain.apply({"params": params}, tokens, prefix=prefix)
  got = scanned.apply({"params": layers.stack_block_params(params)}, tokens, prefix=prefix)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_config_problems_name_the_field():
  cfg = lm.default_config()
  cfg.style, cfg.num_heads, cfg.num_kv_heads = "llama", 4, 3
  assert any("model.lm.num_kv_heads" in p for p in lm.validate(cfg))
  cfg.style = "gpt3"
  assert any("model.lm.style: unknown style 'gpt3'" in p for p in lm.validate(cfg))
  with pytest.raises(ValueError, match="gpt2 blocks have one key/value head"):
    c = lm.default_config()
    c.num_kv_heads = 2
    lm.from_config(c, vocab_size=10, max_length=8)


def test_scanned_lm_decodes_like_the_plain_one():
  plain, scanned = _model("llama"), _model("llama", scan=True)
  prefix, tokens = _inputs()
  params = nn.unbox(plain.init(jax.random.key(0), tokens, prefix=prefix)["params"])
  stacked = layers.stack_block_params(params)
  outs = []
  for m, p in ((plain, params), (scanned, stacked)):
    cache = lm.init_cache(m, p, dict(tokens=jnp.zeros((B, P + 2), jnp.int32), prefix=prefix))
    _, mut = m.apply({"params": p, "cache": cache}, tokens[:, :P], prefix=prefix,
                     prefix_len=jnp.full((B,), N + P), decode=True, mutable=["cache"])
    step, _ = m.apply({"params": p, "cache": mut["cache"]}, tokens[:, P:P + 1], decode=True,
                      mutable=["cache"])
    outs.append(step)
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)
