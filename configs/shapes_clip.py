"""A tiny CLIP two-tower model on the embedded `shapes` dataset (CPU-sized); see shapes_common.py.

Softmax contrastive loss, causal text tower. arg: 'demo' (default) or 'tiny'.
"""
from . import shapes_common


def get_config(arg=None):
  return shapes_common.add_text_tower(shapes_common.shapes_config("contrastive", arg))
