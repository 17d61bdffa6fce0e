"""ImageFolder: `root/<class_name>/<image>`, the layout torchvision's ImageFolder and Keras'
`image_dataset_from_directory` read.

Classes are the sub-folders of `root` in sorted order (label i = the i-th name), or, when the
class names are given (`data.classnames`, which a classifier's run records from its training
folder), in that order: an eval folder that lacks a class then still labels the others as
training did, and a folder that is not one of the classes is an error. Images are the files under
each class folder (searched recursively) whose extension is an image type, in sorted order; other
files are ignored. Hidden entries (names starting with '.') are ignored.
"""
import os

from vlm_jax.data.sources import common

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ImageFolderSource:
  """Random-access source of (image, label) examples; no captions. Images are read lazily, so a
  missing or unreadable file becomes an error example (skipped and counted), not a crash. A root
  without class folders, or without any image, fails at construction naming the path."""

  def __init__(self, root, *, field="data.train_folder", class_names=None):
    if not root:
      raise ValueError(f"{field}: no image folder given (root/<class_name>/*.jpg)")
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"{field}: image folder {self.root!r} does not exist or is not a "
                              "directory")
    folders = sorted(d for d in os.listdir(self.root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(self.root, d)))
    if not folders:
      raise ValueError(f"{field}: {self.root} has no class folders; expected "
                       f"{self.root}/<class_name>/<image files>")
    self._classes = list(class_names) if class_names else folders
    unknown = sorted(set(folders) - set(self._classes))
    if unknown:
      raise ValueError(f"{field}: class folders {unknown} of {self.root} are not among the "
                       f"{len(self._classes)} classes of data.classnames")
    self._records = []
    for label, name in enumerate(self._classes):
      if name in folders:
        for path in _image_files(os.path.join(self.root, name)):
          self._records.append((path, label))
    if not self._records:
      raise ValueError(f"{field}: no image files ({', '.join(IMAGE_SUFFIXES)}) under the "
                       f"{len(self._classes)} class folders of {self.root}")
    self.random_access = True
    self.provides = frozenset({common.LABEL})

  def describe(self):
    return f"image folder {self.root} ({len(self._classes)} classes)"

  def class_names(self):
    return list(self._classes)

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    path, label = self._records[index]
    key = os.path.relpath(path, self.root)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      return common.error("unreadable_image", key)
    return {"image": data, "captions": None, "label": label, "key": key}


def _image_files(folder):
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))
  return out
