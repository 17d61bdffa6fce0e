"""OpenAI CLIP's image preprocessing, for evaluating imported OpenAI / OpenCLIP weights.

OpenAI's transform is torchvision's `Resize(size, BICUBIC)` (the SHORT side becomes `size`, the
long side `int(size * long / short)`), `CenterCrop(size)` (offset `round((side - size) / 2)`),
`ToTensor` (/255) and `Normalize(OPENAI_MEAN, OPENAI_STD)`, on a PIL RGB image. The pipeline's
default eval transform differs slightly: it crops the central square of the original image and
resizes that (same content, slightly different resampling near the crop edge and offsets).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_and_center_crop(img: Image.Image, size: int) -> Image.Image:
  """Bicubic resize of the short side to `size`, then the central `size` x `size` crop."""
  w, h = img.size
  if min(w, h) < 1:
    raise ValueError(f"image: empty image of size {w}x{h}")
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BICUBIC)
  # Python's round (half to even), as torchvision's CenterCrop.
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def preprocess(image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
  """A PIL image or uint8 [H, W, 3] array -> float32 [size, size, 3], normalised."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image: expected a uint8 array, got {image.dtype}")
    image = Image.fromarray(image)
  img = resize_and_center_crop(image.convert("RGB"), size)
  x = np.asarray(img, np.float32) * np.float32(1 / 255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
