"""Hugging Face decoder-only LMs (`GPT2LMHeadModel`, `LlamaForCausalLM`: GPT-2, SmolLM,
TinyLlama and other Llama-architecture models) -> a vlm_jax `causal_lm` workdir whose params are
`lm/...` (so `init_from` puts them into a prefix-LM's LM).

GPT-2 keys (N = layer; Conv1D weights are already [in, out]):
    transformer.wte / wpe                      -> lm/token_embedding/embedding, lm/pos_embedding
    transformer.h.N.ln_1, ln_2                 -> lm/block_N/norm_1, norm_2
    transformer.h.N.attn.c_attn [W, 3W] (+b)   -> lm/block_N/attn/{query,key,value}
    transformer.h.N.attn.c_proj                -> lm/block_N/attn/out
    transformer.h.N.mlp.c_fc, c_proj           -> lm/block_N/mlp/fc1, fc2
    transformer.ln_f                           -> lm/final_norm   (head tied to wte)
Llama keys (Linear weights [out, in], no biases):
    model.embed_tokens                         -> lm/token_embedding/embedding
    model.layers.N.input_layernorm, post_attention_layernorm -> norm_1, norm_2 (RMSNorm scale)
    model.layers.N.self_attn.{q,k,v,o}_proj    -> attn/{query,key,value,out} (k, v: kv heads)
    model.layers.N.mlp.{gate,up,down}_proj     -> mlp/{gate,up,down}
    model.norm, lm_head                        -> lm/final_norm, lm/head (absent when tied)
Hugging Face stores Llama's q/k projections in the half-split rotary layout, the layout
`vlm_jax.models.lm.rope` uses, so no permutation is needed.

Settings our LM does not implement are refused by name before anything is read (e.g.
`rope_scaling`, `sliding_window`, `attention_bias`), never silently dropped.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.convert import common

MODEL_TYPES = ("gpt2", "llama")
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
              "quick_gelu": "quick_gelu"}
# Buffers some transformers versions save with GPT-2 (the causal mask), no weights.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def is_lm_config(d: dict) -> bool:
  return d.get("model_type") in MODEL_TYPES


def _unsupported(d: dict, source: str) -> list:
  """One line per setting of config.json that our LM cannot reproduce."""
  kind = d["model_type"]
  bad = []
  if kind == "gpt2":
    act = d.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
      bad.append(f"activation_function={act!r} (supported: {', '.join(_GPT2_ACTS)})")
    for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
      if d.get(field):
        bad.append(f"{field}=True")
    if d.get("scale_attn_weights") is False:
      bad.append("scale_attn_weights=False")
  else:
    rope = d.get("rope_parameters") or {}
    if d.get("rope_scaling"):
      bad.append(f"rope_scaling={d['rope_scaling']!r}")
    if rope.get("rope_type", "default") != "default":
      bad.append(f"rope_parameters.rope_type={rope['rope_type']!r} (only 'default' rotary "
                 "positions)")
    if d.get("sliding_window"):
      bad.append(f"sliding_window={d['sliding_window']!r}")
    for field in ("attention_bias", "mlp_bias"):
      if d.get(field):
        bad.append(f"{field}=True")
    if d.get("hidden_act", "silu") != "silu":
      bad.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
    heads = int(d["num_attention_heads"])
    if d.get("head_dim") not in (None, int(d["hidden_size"]) // heads):
      bad.append(f"head_dim={d['head_dim']} (only hidden_size / num_attention_heads = "
                 f"{int(d['hidden_size']) // heads})")
    if d.get("pretraining_tp", 1) not in (1, None):
      bad.append(f"pretraining_tp={d['pretraining_tp']}")
  return bad


def lm_fields(d: dict, source: str) -> dict:
  """`model.lm` fields (and the context length) of a GPT-2 / Llama config.json."""
  kind = d.get("model_type")
  if kind not in MODEL_TYPES:
    raise common.ConversionError(f"convert: {source}: model_type {kind!r} is not a supported "
                                 f"language model ({', '.join(MODEL_TYPES)})")
  bad = _unsupported(d, source)
  if bad:
    raise common.ConversionError(f"convert: {source} uses settings vlm_jax's LM does not "
                                 f"implement: {'; '.join(bad)}. Nothing was written")
  try:
    if kind == "gpt2":
      w = int(d["n_embd"])
      return dict(style="gpt2", width=w, depth=int(d["n_layer"]), num_heads=int(d["n_head"]),
                  num_kv_heads=int(d["n_head"]), mlp_dim=int(d.get("n_inner") or 4 * w),
                  vocab_size=int(d["vocab_size"]), max_length=int(d["n_positions"]),
                  norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                  act=_GPT2_ACTS[d.get("activation_function", "gelu_new")],
                  tie_embeddings=True)
    rope = d.get("rope_parameters") or {}
    return dict(style="llama", width=int(d["hidden_size"]),
                depth=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
                num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                mlp_dim=int(d["intermediate_size"]), vocab_size=int(d["vocab_size"]),
                max_length=int(d.get("max_position_embeddings", 2048)),
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)))
  except KeyError as e:
    raise common.ConversionError(f"convert: {source} lacks the field {e} of a {kind} "
                                 "config.json") from e


def _gpt2(r: common.StateReader, f: dict) -> dict:
  w, h, mlp = f["width"], f["num_heads"], f["mlp_dim"]
  head_dim = w // h
  prefix = "transformer." if any(k.startswith("transformer.") for k in r.state) else ""
  get = lambda name, shape: r.get(prefix + name, shape)
  norm = lambda name: common.layer_norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  lm = {"token_embedding": {"embedding": get("wte.weight", (f["vocab_size"], w))},
        "pos_embedding": get("wpe.weight", (f["max_length"], w)),
        "final_norm": norm("ln_f")}
  for i in range(f["depth"]):
    p = f"h.{i}"
    qkv_w = get(f"{p}.attn.c_attn.weight", (w, 3 * w))
    qkv_b = get(f"{p}.attn.c_attn.bias", (3 * w,))
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
      attn[name] = {"kernel": np.ascontiguousarray(qkv_w[:, j * w:(j + 1) * w]).reshape(w, h, head_dim),
                    "bias": qkv_b[j * w:(j + 1) * w].reshape(h, head_dim)}
    attn["out"] = {"kernel": get(f"{p}.attn.c_proj.weight", (w, w)).reshape(h, head_dim, w),
                   "bias": get(f"{p}.attn.c_proj.bias", (w,))}
    lm[f"block_{i}"] = {
        "norm_1": norm(f"{p}.ln_1"), "attn": attn, "norm_2": norm(f"{p}.ln_2"),
        "mlp": {"fc1": {"kernel": get(f"{p}.mlp.c_fc.weight", (w, mlp)),
                        "bias": get(f"{p}.mlp.c_fc.bias", (mlp,))},
                "fc2": {"kernel": get(f"{p}.mlp.c_proj.weight", (mlp, w)),
                        "bias": get(f"{p}.mlp.c_proj.bias", (w,))}}}
  if r.has("lm_head.weight"):   # saved by some versions although tied; must equal wte
    head = r.get("lm_head.weight", (f["vocab_size"], w))
    if not np.array_equal(head, lm["token_embedding"]["embedding"]):
      raise common.ConversionError(f"convert: {r.source}: lm_head.weight differs from "
                                   "transformer.wte.weight, but GPT-2's head is tied")
  return lm


def _llama(r: common.StateReader, f: dict) -> dict:
  w, h, kv, mlp = f["width"], f["num_heads"], f["num_kv_heads"], f["mlp_dim"]
  d = w // h
  lin = lambda name, n_out, n_in: np.ascontiguousarray(r.get(f"{name}.weight", (n_out, n_in)).T)
  lm = {"token_embedding": {"embedding": r.get("model.embed_tokens.weight",
                                               (f["vocab_size"], w))},
        "final_norm": {"scale": r.get("model.norm.weight", (w,))}}
  if not f["tie_embeddings"]:
    lm["head"] = {"kernel": lin("lm_head", f["vocab_size"], w)}
  for i in range(f["depth"]):
    p = f"model.layers.{i}"
    lm[f"block_{i}"] = {
        "norm_1": {"scale": r.get(f"{p}.input_layernorm.weight", (w,))},
        "attn": {"query": {"kernel": lin(f"{p}.self_attn.q_proj", h * d, w).reshape(w, h, d)},
                 "key": {"kernel": lin(f"{p}.self_attn.k_proj", kv * d, w).reshape(w, kv, d)},
                 "value": {"kernel": lin(f"{p}.self_attn.v_proj", kv * d, w).reshape(w, kv, d)},
                 "out": {"kernel": lin(f"{p}.self_attn.o_proj", w, h * d).reshape(h, d, w)}},
        "norm_2": {"scale": r.get(f"{p}.post_attention_layernorm.weight", (w,))},
        "mlp": {"gate": {"kernel": lin(f"{p}.mlp.gate_proj", mlp, w)},
                "up": {"kernel": lin(f"{p}.mlp.up_proj", mlp, w)},
                "down": {"kernel": lin(f"{p}.mlp.down_proj", w, mlp)}}}
  return lm


def convert(state: dict, fields: dict, *, source: str, model: str) -> dict:
  """{'lm': LM params} (numpy) of a GPT-2 / Llama state dict; every key checked."""
  ignore = [k for k in state if k.endswith(_GPT2_BUFFERS)] if fields["style"] == "gpt2" else []
  ignore += [k for k in state if k.endswith("rotary_emb.inv_freq")]
  r = common.StateReader(state, source, ignore=ignore)
  lm = _gpt2(r, fields) if fields["style"] == "gpt2" else _llama(r, fields)
  r.check(f"the {fields['style']} model described by {model}")
  return {"lm": lm}


def to_config(fields: dict, context_length: int):
  """The `causal_lm` config of a converted LM (complete, locked)."""
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top
  lm = dict(name="decoder_only", **fields)
  user = {"task": "causal_lm",
          "model": {"dtype": "auto", "lm": lm, "context_length": int(context_length)},
          "tokenizer": {"kind": "hf", "vocab_size": fields["vocab_size"],
                        "context_length": int(context_length)},
          "evals": {"run": ""}}
  return config_utils.complete(user, source="convert")
