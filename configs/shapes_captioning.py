"""Caption-only pretraining (CapPa-style) on the embedded `shapes` dataset: the demo's image tower
and decoder, no text tower, no contrastive loss. arg: 'demo' (default) or 'tiny'.

  python -m vlm_jax.train --config configs/shapes_captioning.py --workdir runs/shapes_captioning
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("captioning", arg)
  return shapes_common.add_decoder(c, own_vocabulary=True)
