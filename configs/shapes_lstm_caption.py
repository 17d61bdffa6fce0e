"""Show and Tell on the embedded `shapes` dataset: the demo's image tower (ViT 2x64) and an LSTM
caption decoder (state 256, word embeddings 128) that reads the mean image token as its first
input. Same task, data and evaluation as `shapes_captioning.py`, so the two decoders compare
directly. arg: 'demo' (default) or 'tiny'.

  python -m vlm_jax.train --config configs/shapes_lstm_caption.py --workdir runs/shapes_lstm
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("captioning", arg)
  c.model.decoder = dict(name="lstm", width=256, embed_dim=128, vocab_size=shapes_common.VOCAB,
                         context_length=shapes_common.LENGTH)
  c.tokenizer = dict(vocab_size=shapes_common.VOCAB, context_length=shapes_common.LENGTH)
  return c
