"""The demo: a tiny CoCa trained on the embedded `shapes` dataset, CPU-sized (minutes on 2 cores).

  python -m vlm_jax.train --config configs/shapes_coca.py --workdir runs/shapes_coca
  python -m vlm_jax.train --config configs/shapes_coca.py:tiny ...   # the 256-example test set

arg: 'demo' (default: shapes/demo, 20k training images) or 'tiny' (shapes/tiny, for tests).
Contrastive (softmax) + captioning loss, weights 1 and 2 as in the CoCa paper.
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("coca", arg)
  shapes_common.add_text_tower(c)
  return shapes_common.add_decoder(c)
