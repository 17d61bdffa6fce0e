"""Image-text matching on the embedded `shapes` dataset (late fusion, binary): the demo's image
tower (ViT 2x64) and a BERT 2x64 caption encoder, concatenated, through an MLP of 256 to one
logit; negatives are other images' captions from the same batch. arg: 'demo' (default) or
'tiny'.

  python -m vlm_jax.demo --config configs/shapes_fusion_itm.py
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("image_text_matching", arg)
  c.model.text = dict(name="bert", vocab_size=shapes_common.VOCAB,
                      context_length=shapes_common.LENGTH, **shapes_common.TOWER)
  c.model.hidden_dim = 256
  c.tokenizer = dict(vocab_size=shapes_common.VOCAB, context_length=shapes_common.LENGTH)
  return c
