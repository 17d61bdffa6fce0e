"""Hugging Face `BertModel` / `BertForMaskedLM` -> a vlm_jax `masked_lm` workdir (params
`text/...`, plus the MLM head when the checkpoint has one).

Key names (N = layer; Linear weights [out, in]; prefix `bert.` in BertForMaskedLM):
    embeddings.word_embeddings / position_embeddings / token_type_embeddings
                                        -> text/token_embedding, pos_embedding, type_embedding
    embeddings.LayerNorm                -> text/embed_norm
    encoder.layer.N.attention.self.{query,key,value}, attention.output.dense
                                        -> text/encoder/block_N/attn/{query,key,value,out}
    encoder.layer.N.attention.output.LayerNorm  -> .../attn_norm
    encoder.layer.N.intermediate.dense, output.dense  -> .../mlp/fc1, fc2
    encoder.layer.N.output.LayerNorm    -> .../mlp_norm
    pooler.dense                        -> text/pooler (BertModel; `model.text.pooler = True`)
    cls.predictions.transform.dense / LayerNorm, cls.predictions.bias
                                        -> mlm_dense, mlm_norm, mlm_bias (BertForMaskedLM; the
                                           decoder weight is the word embedding, tied)
A BertModel has no MLM head: the workdir gets a freshly initialised one (to train), and the
report says so. The tokenizer is the checkpoint folder's vocab.txt (WordPiece,
through the `tokenizers` library) or tokenizer.json; its size must equal the embedding's.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.convert import common


def is_bert_config(d: dict) -> bool:
  return d.get("model_type") == "bert"


def fields(d: dict, source: str) -> dict:
  bad = []
  if d.get("hidden_act", "gelu") != "gelu":
    bad.append(f"hidden_act={d['hidden_act']!r} (only 'gelu')")
  if d.get("position_embedding_type", "absolute") != "absolute":
    bad.append(f"position_embedding_type={d['position_embedding_type']!r}")
  if d.get("is_decoder"):
    bad.append("is_decoder=True")
  if bad:
    raise common.ConversionError(f"convert: {source} uses settings vlm_jax's BERT does not "
                                 f"implement: {'; '.join(bad)}. Nothing was written")
  try:
    return dict(vocab_size=int(d["vocab_size"]), width=int(d["hidden_size"]),
                depth=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
                mlp_dim=int(d["intermediate_size"]),
                context_length=int(d["max_position_embeddings"]),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                ln_eps=float(d.get("layer_norm_eps", 1e-12)), pad_id=int(d.get("pad_token_id")
                                                                         or 0))
  except KeyError as e:
    raise common.ConversionError(f"convert: {source} lacks the field {e} of a BERT "
                                 "config.json") from e


def convert(state: dict, f: dict, *, source: str, model: str) -> tuple[dict, bool, bool]:
  """(params, has the pooler, has the MLM head); every key checked."""
  prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
  # Buffers (position ids) and the decoder weight, which is the word embedding (tied).
  ignore = [k for k in state if k.endswith(("position_ids", "token_type_ids"))
            or k == "cls.predictions.decoder.weight" or k == "cls.predictions.decoder.bias"]
  r = common.StateReader(state, source, ignore=ignore)
  get = lambda name, shape: r.get(prefix + name, shape)
  w, mlp, vocab = f["width"], f["mlp_dim"], f["vocab_size"]
  lin = lambda name, n_out, n_in: (get(f"{name}.weight", (n_out, n_in)),
                                   get(f"{name}.bias", (n_out,)))
  norm = lambda name: common.layer_norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  encoder = {}
  for i in range(f["depth"]):
    layer = f"encoder.layer.{i}"
    attn = [lin(f"{layer}.attention.self.{n}", w, w) for n in ("query", "key", "value")]
    attn.append(lin(f"{layer}.attention.output.dense", w, w))
    encoder[f"block_{i}"] = {
        "attn": common.attention(*attn, f["num_heads"]),
        "attn_norm": norm(f"{layer}.attention.output.LayerNorm"),
        "mlp": {"fc1": common.dense(*lin(f"{layer}.intermediate.dense", mlp, w)),
                "fc2": common.dense(*lin(f"{layer}.output.dense", w, mlp))},
        "mlp_norm": norm(f"{layer}.output.LayerNorm")}
  emb = "embeddings"
  text = {"token_embedding": {"embedding": get(f"{emb}.word_embeddings.weight", (vocab, w))},
          "pos_embedding": get(f"{emb}.position_embeddings.weight", (f["context_length"], w)),
          "type_embedding": get(f"{emb}.token_type_embeddings.weight",
                                (f["type_vocab_size"], w)),
          "embed_norm": norm(f"{emb}.LayerNorm"),
          "encoder": encoder}
  has_pooler = r.has(prefix + "pooler.dense.weight")
  if has_pooler:
    text["pooler"] = common.dense(*lin("pooler.dense", w, w))
  params = {"text": text}
  has_head = r.has("cls.predictions.bias")
  if has_head:
    head = "cls.predictions"
    params["mlm_dense"] = common.dense(r.get(f"{head}.transform.dense.weight", (w, w)),
                                       r.get(f"{head}.transform.dense.bias", (w,)))
    params["mlm_norm"] = common.layer_norm(r.get(f"{head}.transform.LayerNorm.weight", (w,)),
                                           r.get(f"{head}.transform.LayerNorm.bias", (w,)))
    params["mlm_bias"] = r.get(f"{head}.bias", (vocab,))
    if "cls.predictions.decoder.weight" in state:
      decoder = np.asarray(state["cls.predictions.decoder.weight"])
      if decoder.shape != (vocab, w) or not np.array_equal(decoder,
                                                           text["token_embedding"]["embedding"]):
        raise common.ConversionError(
            f"convert: {source}: cls.predictions.decoder.weight is not the word embedding "
            "(an untied MLM decoder); vlm_jax's MLM head is tied. Nothing was written")
  r.check(f"the BERT described by {model}")
  return params, has_pooler, has_head


def fresh_head(width: int, vocab: int, seed: int = 0) -> dict:
  """An MLM head as the model initialises one (Xavier-uniform dense, unit LayerNorm, zero bias),
  for a BertModel, which has none."""
  limit = np.sqrt(6.0 / (2 * width))
  kernel = np.random.default_rng(seed).uniform(-limit, limit, (width, width)).astype(np.float32)
  return {"mlm_dense": {"kernel": kernel, "bias": np.zeros((width,), np.float32)},
          "mlm_norm": {"scale": np.ones((width,), np.float32),
                       "bias": np.zeros((width,), np.float32)},
          "mlm_bias": np.zeros((vocab,), np.float32)}


def to_config(f: dict, pooler: bool):
  """The `masked_lm` config of a converted BERT (complete, locked)."""
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top
  text = dict(name="bert", pooler=pooler, act="gelu", dropout=0.0, **f)
  user = {"task": "masked_lm", "model": {"dtype": "auto", "text": text},
          "tokenizer": {"kind": "hf", "vocab_size": f["vocab_size"],
                        "context_length": f["context_length"]},
          "evals": {"run": ""}}
  return config_utils.complete(user, source="convert")
