"""A tiny SigLIP two-tower model on the embedded `shapes` dataset (CPU-sized); see shapes_common.py.

Sigmoid contrastive loss with a learned bias (t' = log 10, b = -10 at the start, as in the
SigLIP paper), bidirectional text tower. arg: 'demo' (default) or 'tiny'.
"""
import math

from . import shapes_common


def get_config(arg=None):
  c = shapes_common.add_text_tower(shapes_common.shapes_config("contrastive", arg))
  c.model.update(logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
  c.model.text.causal = False
  c.loss = dict(contrastive="sigmoid")
  return c
