"""`captions.jsonl` + an image folder."""
import json
import os

from vlm_jax.data.sources import common


class JsonlSource:
  """`captions.jsonl` lines `{"image": path, "caption": str | [str], "label": int (optional)}`.

  Image paths are relative to `image_root` (default: the jsonl's folder). Random access; images are
  read lazily, so a missing or unreadable file becomes an error example, not a crash. A line that
  is not valid JSON or lacks "image" fails fast at construction (it is a broken index, not bad
  data).
  """

  def __init__(self, path, image_root=None):
    if not os.path.exists(path):
      raise FileNotFoundError(f"data.jsonl: captions file {path!r} does not exist")
    self.path = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    self._records = []
    with open(path, "rb") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          image = record["image"]
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{lineno}: expected a JSON object with an 'image' field: "
                           f"{e}") from e
        caption = record.get("caption", record.get("captions", []))
        captions = [caption] if isinstance(caption, str) else list(caption)
        label = record.get("label", -1)
        if not isinstance(label, int) or isinstance(label, bool):
          raise ValueError(f"{path}:{lineno}: 'label' must be an integer class index, got "
                           f"{label!r}")
        self._records.append((image, captions, label, lineno))
    if not self._records:
      raise ValueError(f"data.jsonl: {path} holds no records (expected one JSON object per line "
                       'with "image" and "caption")')
    self.random_access = True
    # Captions when any record has one (a record without is skipped as empty_caption); labels
    # only when every record has one.
    provides = set()
    if any(captions for _, captions, _, _ in self._records):
      provides.add(common.CAPTIONS)
    if all(label >= 0 for _, _, label, _ in self._records):
      provides.add(common.LABEL)
    self.provides = frozenset(provides)

  def describe(self):
    return f"captions file {self.path}"

  def class_names(self):
    return None

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    image, captions, label, lineno = self._records[index]
    key = f"{os.path.basename(self.path)}:{lineno}:{image}"
    try:
      with open(os.path.join(self.image_root, image), "rb") as f:
        data = f.read()
    except OSError:
      return common.error("unreadable_image", key)
    return {"image": data, "captions": captions, "label": label, "key": key}
