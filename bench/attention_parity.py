r"""The fused attention implementations against the einsum reference, on the device at hand.

  python bench/attention_parity.py [--impls=xla,cudnn] [--dtype=bfloat16]

For each implementation and each mask the models use (none: a ViT's 197 tokens; causal + padding:
a 77-token text tower; a prefix-LM mask), one JSON line with the largest absolute difference of
the outputs and of the gradients (query, key, value) from `layers.Attention`'s einsum path
computed in float32 on the same inputs, and the same for the einsum path in the chosen dtype (the
rounding that dtype costs anyway). cuDNN's kernel needs a GPU, the Pallas kernel a TPU
(`--impls=xla,pallas`); on a CPU ask for 'xla' only.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position

_IMPLS = flags.DEFINE_list("impls", ["xla", "cudnn"], "Implementations to compare (ATTENTION_IMPLS).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the compared paths.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 12, "Attention heads (of size 64).")


def einsum_attention(q, k, v, mask):
  """The reference: Attention's einsum path (logits and softmax in float32)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k,
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def masks(batch: int) -> dict:
  text_len = 77
  lengths = jnp.linspace(5, text_len, batch).astype(jnp.int32)
  causal = jnp.tril(jnp.ones((text_len, text_len), bool))[None, None]
  padding = (jnp.arange(text_len)[None, :] < lengths[:, None])[:, None, None, :]
  prefix = jnp.arange(64)[None, :] < 40   # 40 prefix tokens see each other, the rest causal
  prefix_lm = (jnp.tril(jnp.ones((64, 64), bool)) | (prefix[:, None, :] & prefix[:, :, None]))
  return {"none (length 197)": (197, None), "causal+padding (length 77)": (text_len, causal & padding),
          "prefix_lm (length 64)": (64, prefix_lm[:, None])}


def max_differences(fn, reference, q, k, v, dtype):
  """Largest |difference| of outputs and of (dq, dk, dv), fn in `dtype` against reference in fp32."""
  def value_and_grads(f, dt, q, k, v):
    cast = lambda x: x.astype(dt)
    out, vjp = jax.vjp(lambda q, k, v: f(cast(q), cast(k), cast(v)).astype(jnp.float32), q, k, v)
    return out, vjp(jnp.cos(out))   # a cotangent that is not constant along any axis
  out, grads = jax.jit(value_and_grads, static_argnums=(0, 1))(fn, dtype, q, k, v)
  ref_out, ref_grads = jax.jit(value_and_grads, static_argnums=(0, 1))(reference, jnp.float32,
                                                                          q, k, v)
  return (float(jnp.max(jnp.abs(out - ref_out))),
          max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads)))


def main(argv) -> None:
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  for name, (length, mask) in masks(_BATCH.value).items():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (_BATCH.value, length, _HEADS.value, 64)) for key in keys)
    reference = lambda q, k, v, mask=mask: einsum_attention(q, k, v, mask)
    candidates = {"einsum": reference}
    for impl in _IMPLS.value:
      candidates[impl] = lambda q, k, v, mask=mask, impl=impl: layers.fused_attention(
          q, k, v, mask, impl)
    for impl, fn in candidates.items():
      try:
        out_diff, grad_diff = max_differences(fn, reference, q, k, v, dtype)
        row = {"impl": impl, "mask": name, "dtype": dtype.name,
               "max_abs_diff_out": out_diff, "max_abs_diff_grad": grad_diff}
      except Exception as e:  # pylint: disable=broad-except
        row = {"impl": impl, "mask": name, "dtype": dtype.name,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
