"""BERT masked-language-model pretraining on the captions of the embedded `shapes` dataset: a
2-layer BERT of width 64 (BERT-tiny's shape at a quarter of the width); the figure is the
masked-token accuracy on the test split. arg: 'demo' (default) or 'tiny'.

  python -m vlm_jax.train --config configs/shapes_bert_mlm.py --workdir runs/shapes_bert_mlm

A row is a document: an image's captions joined (`loss.document = 'all_captions'`), so a masked
colour or shape can be read off another sentence, as BERT reads multi-sentence documents (one
caption alone does not determine its colour or shape words). The tokenizer trained on the
captions has no mask token, so masked tokens take the first id past its 256 pieces; the model's
vocabulary (264, a multiple of 8) leaves room for it.
"""
from . import shapes_common

LENGTH = 56                       # the longest shapes document is 52 tokens


def get_config(arg=None):
  c = shapes_common.shapes_config("masked_lm", arg)
  del c.model["image"]
  c.model.text = dict(name="bert", vocab_size=shapes_common.VOCAB + 8, context_length=LENGTH,
                      **shapes_common.TOWER)
  c.tokenizer = dict(vocab_size=shapes_common.VOCAB, context_length=LENGTH)
  c.loss = dict(document="all_captions")
  c.evals = dict(masked_lm=dict(document="all_captions"))
  c.optim = dict(lr=1e-3, weight_decay=1e-2)
  return c
