"""A tiny SIGLIP two-tower model on the embedded `shapes` dataset (CPU-sized); see shapes_coca.py.

arg: 'demo' (default) or 'tiny'.
"""
from configs import shapes_coca


def get_config(arg=None):
  return shapes_coca.shapes_config("siglip", arg)
