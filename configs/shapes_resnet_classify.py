"""Supervised classification on the embedded `shapes` labels with a ResNet image tower: the
ResNet-18 of width 16 of `shapes_resnet_clip.py` (BatchNorm, its running statistics kept with the
params) and a linear head over the 20 (colour, shape) classes. arg: 'demo' (default) or 'tiny'.

  python -m vlm_jax.demo --config configs/shapes_resnet_classify.py
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("classification", arg)
  c.model.image = dict(name="resnet", image_size=32, depth=18, width=16)
  return c
