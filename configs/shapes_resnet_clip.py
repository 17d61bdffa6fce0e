"""CLIP with a ResNet image tower on the embedded `shapes` dataset: a ResNet-18 of width 16
(BatchNorm, its running statistics kept with the params) and the demo's text tower (2x64),
softmax contrastive loss; zero-shot and retrieval on the test split. arg: 'demo' (default) or
'tiny'.

  python -m vlm_jax.demo --config configs/shapes_resnet_clip.py
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("contrastive", arg)
  c.model.image = dict(name="resnet", image_size=32, depth=18, width=16)
  return shapes_common.add_text_tower(c)
