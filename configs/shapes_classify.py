"""Supervised classification on the embedded `shapes` labels: a ViT with a linear head.

  python -m vlm_jax.train --config configs/shapes_classify.py --workdir runs/shapes_classify
  # the same on your own ImageFolder (root/<class_name>/*.jpg):
  python -m vlm_jax.train --config configs/shapes_classify.py --workdir runs/my_classifier \
      --config.data.source=imagefolder --config.data.train_folder=train/ \
      --config.data.eval_folder=val/ [--config.data.image_size=64 --config.model.image.image_size=64]

The label of a shapes image is the (colour, shape) of its main object: 20 classes. The ViT is the
demo's image tower (2 layers of width 64, 4x4 patches at 32x32); the number of classes comes from
the data. arg: 'demo' (default: shapes/demo) or 'tiny' (shapes/tiny, for tests).
"""
from . import shapes_common


def get_config(arg=None):
  return shapes_common.shapes_config("classification", arg)
