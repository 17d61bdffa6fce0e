"""`shapes`: an embedded synthetic image-caption dataset (a TFDS builder, no download).

Every image shows one, two or three coloured geometric shapes on a dark, noisy background, with
several natural-language captions that describe exactly what was drawn ("a small red circle in
the top left.", "two blue squares.", "a large green triangle in the bottom right and a small
yellow cross in the top left.") and a class label for zero-shot classification: the
(colour, shape) of the main object, e.g. "red circle". It generates in seconds (tiny) to tens of
seconds (demo) and is meant to be learnable by a tiny model in minutes on a CPU, for contrastive
and captioning objectives alike: it is the dataset of the demo and of the end-to-end tests.

Generation is deterministic: example `i` of split `s` is drawn from a NumPy generator seeded with
(config seed, split id, i), so two preparations write identical examples, and the per-pixel
background noise keeps the splits apart (no image occurs in two splits). The ground truth of
every object (shape, colour, size, position, box) is stored next to the image, so tests can check
the captions against the pixels. Each image also has three visual questions with ten answers each
in the VQAv2 annotation layout (`questions`, see `vlm_jax.data.shapes_vqa`).

Scenes (label = class of the main object):
  one        a single object, small or large, in a quadrant or in the center.
  same       two or three small objects of one class in distinct quadrants ("two red circles").
  different  a large main object and a small object of another class, in distinct quadrants.

Usage:
  from vlm_jax.data import shapes
  shapes.prepare("tiny", data_dir)              # builds once (array_record), then a no-op
  ds = tfds.data_source("shapes/tiny", split="train", data_dir=data_dir)   # random access
  ds[0]  # {'image': uint8 [32, 32, 3], 'captions': [bytes] * 4, 'label': int, 'objects': ...,
         #  'questions': {'question': [bytes] * 3, 'answers': [3, 10] bytes, ...}}
  # For tf.data: shapes.prepare("tiny", other_dir, file_format="tfrecord"); tfds.load(...).

TFDS stores examples in an order shuffled by key, so `ds[i]` is not example i of the generator;
each example's "id" ("train/000042") names it.

Importing this module only registers the builder with TFDS; nothing is generated or written.
"""
import dataclasses
import fcntl
import itertools
import os
import re

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from vlm_jax.data import cache
from vlm_jax.data import shapes_vqa

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Saturated colours that differ in at least one channel by >150, so they stay distinct after any
# resize; every one has a channel >= 200, far above the background (<= BACKGROUND_MAX).
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# Quadrants first: multi-object scenes only use those (they never overlap); 'center' is for
# single objects.
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
QUADRANTS = POSITIONS[:4]
SCENES = ("one", "same", "different")
NUMBER_WORDS = {2: "two", 3: "three"}
SPLITS = ("train", "validation", "test")
BACKGROUND_MAX = 80  # brightest background value (tint + noise)

# Zero-shot prompt templates; `{}` is a class name such as "red circle". They use only words that
# occur in the captions, so a tokenizer and text tower trained on the captions know them.
PROMPT_TEMPLATES = ("a {}.", "a picture of a {}.", "there is a {}.")


def class_names():
  """Zero-shot class names, in label order: colour-major, e.g. 'red circle', 'red square', ..."""
  return [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]


def class_index(colour, shape):
  return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Size and mix of one `shapes` variant.

  Attributes:
    image_size: side of the square RGB images, in pixels.
    num_train / num_validation / num_test: examples per split.
    scene_weights: probabilities of the scenes ('one', 'same', 'different').
    max_same: largest object count of a 'same' scene (2 or 3).
    seed: base seed; changing it gives a different but equally deterministic dataset.
    caption_style: 'plain' (four phrasings per image), 'terse' (one attribute list per image,
      "red circle, small, top left.": a style no other variant uses, for datastore swaps) or
      'formats' (the same attributes in each format of `FORMATS`, one caption each).
  """
  image_size: int = 32
  num_train: int = 256
  num_validation: int = 64
  num_test: int = 64
  scene_weights: tuple = (0.5, 0.25, 0.25)
  max_same: int = 3
  seed: int = 0
  caption_style: str = "plain"

  def __post_init__(self):
    if self.caption_style not in CAPTION_STYLES:
      raise ValueError(f"shapes/{self.name}: caption_style {self.caption_style!r}; expected one "
                       f"of {', '.join(CAPTION_STYLES)}")
    if self.image_size < 16:
      raise ValueError(f"shapes/{self.name}: image_size {self.image_size} is below 16 pixels")
    if self.max_same not in NUMBER_WORDS:
      raise ValueError(f"shapes/{self.name}: max_same {self.max_same} must be 2 or 3")
    w = np.asarray(self.scene_weights, np.float64)
    if w.shape != (len(SCENES),) or (w < 0).any() or abs(w.sum() - 1) > 1e-6:
      raise ValueError(f"shapes/{self.name}: scene_weights {self.scene_weights} must be "
                       f"{len(SCENES)} probabilities (for {', '.join(SCENES)}) summing to 1")


def _split_sizes(config):
  return {"train": config.num_train, "validation": config.num_validation,
          "test": config.num_test}


# ---------------------------------------------------------------------------------------------
# Scene sampling, captions and rendering: plain NumPy/PIL, usable without TFDS.
# ---------------------------------------------------------------------------------------------


def _rng(config, split, index):
  if split not in SPLITS:
    raise ValueError(f"shapes: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  return np.random.default_rng([config.seed, SPLITS.index(split), index])


def _object(rng, colour, shape, size, position, image_size):
  """Places one object: a square box of a size-dependent side, jittered inside its cell."""
  s = float(image_size)
  lo, hi = (0.25, 0.31) if size == "small" else (0.40, 0.46)
  side = max(3, int(round(rng.uniform(lo, hi) * s)))
  if position == "center":
    cx = cy = s / 2
  else:
    cx = s * (0.25 if position.endswith("left") else 0.75)
    cy = s * (0.25 if position.startswith("top") else 0.75)
  # Jitter the box inside its cell (a quadrant, or the central square of the same size), keeping
  # a 1px margin so objects never touch and a centred object stays recognisably central.
  slack = max(0.0, (s / 2 - side) / 2 - 1)
  x0 = int(round(cx - side / 2 + rng.uniform(-slack, slack)))
  y0 = int(round(cy - side / 2 + rng.uniform(-slack, slack)))
  x0 = min(max(x0, 0), image_size - side)
  y0 = min(max(y0, 0), image_size - side)
  return dict(shape=shape, colour=colour, size=size, position=position,
              box=(y0, x0, y0 + side, x0 + side))  # pixels, [ymin, xmin, ymax, xmax)


def sample_scene(rng, config):
  """Draws the objects of one scene. The first object is the main one (it defines the label)."""
  n = config.image_size
  scene = SCENES[rng.choice(len(SCENES), p=np.asarray(config.scene_weights, np.float64))]
  colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  if scene == "one":
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    objects = [_object(rng, colour, shape, size, position, n)]
  elif scene == "same":
    count = int(rng.integers(2, config.max_same + 1))
    cells = [QUADRANTS[i] for i in sorted(rng.choice(4, size=count, replace=False))]
    objects = [_object(rng, colour, shape, "small", p, n) for p in cells]
  else:
    # Another class: change the colour, the shape or both.
    while True:
      colour2 = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
      shape2 = SHAPES[rng.integers(len(SHAPES))]
      if (colour2, shape2) != (colour, shape):
        break
    p1, p2 = (QUADRANTS[i] for i in rng.choice(4, size=2, replace=False))
    objects = [_object(rng, colour, shape, "large", p1, n),
               _object(rng, colour2, shape2, "small", p2, n)]
  return scene, objects


def _join(words):
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


CAPTION_STYLES = ("plain", "terse", "formats")

# Attribute-list captions: each object (main object first) as its "colour shape", size and
# position in some order, joined by a field separator; the objects joined by another separator.
# A format is (field order, field separator, object separator). 'terse' is one of them; 'formats'
# gives every format whose (order, field separator) is not terse's (34), so a captioner trained on
# 'formats' can be shown terse, a combination of parts it saw that it never saw together (on a
# one-object image too, where the object separator does not show).
FIELDS = ("thing", "size", "position")
TERSE_FORMAT = (FIELDS, ", ", "; ")
FORMATS = tuple(f for f in itertools.product(itertools.permutations(FIELDS), (", ", " - ", " / "),
                                             ("; ", " + "))
                if f[:2] != TERSE_FORMAT[:2])


def attribute_list(objects, fmt=TERSE_FORMAT):
  """The objects as one caption in format `fmt`: "red circle, small, top left." for terse."""
  order, field_separator, object_separator = fmt
  def fields(o):
    return {"thing": f"{o['colour']} {o['shape']}", "size": o["size"], "position": o["position"]}
  return object_separator.join(field_separator.join(fields(o)[f] for f in order)
                               for o in objects) + "."


def _format_pattern(fmt):
  alternatives = lambda words: "(?:" + "|".join(words) + ")"
  field = {"thing": f"{alternatives(COLOUR_NAMES)} {alternatives(SHAPES)}",
           "size": alternatives(SIZES), "position": alternatives(POSITIONS)}
  order, field_separator, object_separator = fmt
  one = re.escape(field_separator).join(field[f] for f in order)
  return re.compile(f"{one}(?:{re.escape(object_separator)}{one})*\\.")


_FORMAT_PATTERNS = [(fmt, _format_pattern(fmt)) for fmt in (TERSE_FORMAT,) + FORMATS]


def caption_formats(text):
  """The attribute-list formats (of `TERSE_FORMAT` and `FORMATS`) that `text` is written in: one,
  or two for a single object (the object separator does not show); () for a sentence or a list
  that does not keep one format throughout."""
  text = text.strip()
  return tuple(fmt for fmt, pattern in _FORMAT_PATTERNS if pattern.fullmatch(text))


def captions(scene, objects, style="plain"):
  """The captions of a scene: four phrasings, every one true of the drawn image ('plain'), one
  attribute list ('terse'), or the attribute lists of all of `FORMATS` in order ('formats')."""
  if style == "terse":
    return [attribute_list(objects, TERSE_FORMAT)]
  if style == "formats":
    return [attribute_list(objects, fmt) for fmt in FORMATS]
  a = objects[0]
  c, s, z, p = a["colour"], a["shape"], a["size"], a["position"]
  if scene == "one":
    return [f"a {c} {s}.",
            f"a {z} {c} {s} in the {p}.",
            f"a picture of a {z} {c} {s}.",
            f"there is a {c} {s} in the {p}."]
  if scene == "same":
    num, ss = NUMBER_WORDS[len(objects)], PLURALS[s]
    where = _join([f"the {o['position']}" for o in objects])
    return [f"{num} {c} {ss}.",
            f"{num} small {c} {ss}.",
            f"a picture of {num} {c} {ss}.",
            f"there are {num} {c} {ss} in {where}."]
  b = objects[1]
  c2, s2, p2 = b["colour"], b["shape"], b["position"]
  return [f"a {c} {s} and a {c2} {s2}.",
          f"a large {c} {s} in the {p} and a small {c2} {s2} in the {p2}.",
          f"a picture of a large {c} {s} and a small {c2} {s2}.",
          f"a large {c} {s} next to a small {c2} {s2}."]


def _draw(draw, obj):
  y0, x0, y1, x1 = obj["box"]
  x1, y1 = x1 - 1, y1 - 1  # PIL boxes are inclusive
  fill = COLOURS[obj["colour"]]
  shape = obj["shape"]
  if shape == "circle":
    draw.ellipse([x0, y0, x1, y1], fill=fill)
  elif shape == "square":
    draw.rectangle([x0, y0, x1, y1], fill=fill)
  elif shape == "triangle":  # pointing up, base at the bottom of the box
    draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
  elif shape == "cross":  # a plus sign with bars one third of the side wide
    side = x1 - x0 + 1
    bar = max(2, round(side / 3))
    t0 = (side - bar) // 2
    t1 = t0 + bar - 1
    draw.rectangle([x0 + t0, y0, x0 + t1, y1], fill=fill)
    draw.rectangle([x0, y0 + t0, x1, y0 + t1], fill=fill)
  else:
    raise ValueError(f"shapes: unknown shape {shape!r}")


def render(rng, objects, image_size):
  """Dark background (random tint + per-pixel noise), objects drawn solid with exact colours."""
  tint = rng.integers(0, 40, size=3)
  noise = rng.integers(0, BACKGROUND_MAX - 40 + 1, size=(image_size, image_size, 3))
  background = (tint + noise).astype(np.uint8)
  image = Image.fromarray(background, "RGB")
  draw = ImageDraw.Draw(image)
  for obj in objects:
    _draw(draw, obj)
  return np.asarray(image, dtype=np.uint8)


def image_questions(config, split, index, objects):
  """The VQAv2-style questions of example `index` of `split` (see `vlm_jax.data.shapes_vqa`);
  question ids are unique over the splits of a config."""
  split_index = SPLITS.index(split)
  return shapes_vqa.questions(
      objects, shapes_vqa.question_rng(config.seed, split_index, index),
      first_question_id=(split_index * 10**7 + index) * 10, colours=COLOUR_NAMES, shapes=SHAPES,
      plurals=PLURALS, positions=POSITIONS)


def generate_example(config, split, index):
  """Example `index` of `split`, as plain Python/NumPy (the builder writes exactly this)."""
  rng = _rng(config, split, index)
  scene, objects = sample_scene(rng, config)
  image = render(rng, objects, config.image_size)
  main = objects[0]
  n = float(config.image_size)
  return {
      "id": f"{split}/{index:06d}",
      "image": image,
      "captions": captions(scene, objects, config.caption_style),
      "questions": image_questions(config, split, index, objects),
      "label": class_index(main["colour"], main["shape"]),
      "scene": scene,
      "objects": {
          "shape": [o["shape"] for o in objects],
          "colour": [o["colour"] for o in objects],
          "size": [o["size"] for o in objects],
          "position": [o["position"] for o in objects],
          # Normalised [ymin, xmin, ymax, xmax], the tfds.features.BBoxFeature convention.
          "bbox": np.asarray([o["box"] for o in objects], np.float32) / n,
      },
  }


def caption_corpus(config_name="demo", split="train", questions=False):
  """All captions of a split (with `questions`, also every question and answer), without
  rendering images (to train a tokenizer in seconds).

  A TFDS slice such as 'train[:50%]' gives the texts of the whole split it slices.
  """
  config = get_config(config_name)
  split = split.split("[")[0]
  _rng(config, split, 0)  # clear error for an unknown split
  texts = []
  for i in range(_split_sizes(config)[split]):
    scene, objects = sample_scene(_rng(config, split, i), config)
    texts.extend(captions(scene, objects, config.caption_style))
    if questions:
      for q in image_questions(config, split, i, objects):
        texts.append(q["question"])
        texts.extend(sorted({a["answer"] for a in q["answers"]}))
  return texts


# ---------------------------------------------------------------------------------------------
# The TFDS builder.
# ---------------------------------------------------------------------------------------------


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured geometric shapes with captions and (colour, shape) labels; generated, no download."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Visual questions with ten answers each (`questions`)."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="tiny", description="32x32, 256/64/64 examples: for tests.",
                   image_size=32, num_train=256, num_validation=64, num_test=64),
      # Fewer two-class scenes than 'tiny': their label (the large object) is the one part of
      # zero-shot classification that is not spelled out by a single caption.
      ShapesConfig(name="demo", description="32x32, 20000/1000/1000 examples: the CPU demo.",
                   image_size=32, num_train=20000, num_validation=1000, num_test=1000,
                   scene_weights=(0.6, 0.2, 0.2)),
      # The demo's images (same seed) with 'terse' captions: a datastore in a caption style
      # that no model trained on 'demo' has seen (retrieval-augmented captioning).
      ShapesConfig(name="demo_terse", description="shapes/demo with terse captions.",
                   image_size=32, num_train=20000, num_validation=1000, num_test=1000,
                   scene_weights=(0.6, 0.2, 0.2), caption_style="terse"),
      # The same images with each caption in every attribute-list format but terse: trained on
      # these, a retrieval-augmented captioner can be asked to follow a terse datastore.
      ShapesConfig(name="demo_formats", description="shapes/demo with 34 attribute-list captions.",
                   image_size=32, num_train=20000, num_validation=1000, num_test=1000,
                   scene_weights=(0.6, 0.2, 0.2), caption_style="formats"),
      ShapesConfig(name="small", description="64x64, 50000/2000/2000 examples.",
                   image_size=64, num_train=50000, num_validation=2000, num_test=2000,
                   scene_weights=(0.6, 0.2, 0.2)),
  ]
  DEFAULT_CONFIG_NAME = "tiny"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # The path TFDS would compute itself; computing it needs the `importlib_resources` backport,
    # which tensorflow-datasets 4.9.10 imports but does not declare as a dependency.
    return epath.Path(__file__)

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[1],
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(c.image_size, c.image_size, 3)),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "label": tfds.features.ClassLabel(names=class_names()),
            "scene": tfds.features.ClassLabel(names=SCENES),
            "objects": tfds.features.Sequence({
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "colour": tfds.features.ClassLabel(names=COLOUR_NAMES),
                "size": tfds.features.ClassLabel(names=SIZES),
                "position": tfds.features.ClassLabel(names=POSITIONS),
                "bbox": tfds.features.BBoxFeature(),
            }),
            # VQAv2 annotation fields of each question (`vlm_jax.data.shapes_vqa`).
            "questions": tfds.features.Sequence({
                "question_id": np.int64,
                "question": tfds.features.Text(),
                "question_type": tfds.features.Text(),
                "answer_type": tfds.features.Text(),
                # A fixed-shape string tensor, not a nested Sequence: tfds 4.9's tf.data reader
                # cannot decode a Sequence inside a Sequence of dicts.
                "answers": tfds.features.Tensor(shape=(shapes_vqa.ANSWERS_PER_QUESTION,),
                                                dtype=np.str_),
            }),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    config = self.builder_config
    for i in range(_split_sizes(config)[split]):
      ex = generate_example(config, split, i)
      ex["questions"] = [{k: ([a["answer"] for a in q[k]] if k == "answers" else q[k])
                          for k in ("question_id", "question", "question_type", "answer_type",
                                    "answers")} for q in ex["questions"]]
      yield ex["id"], ex


def get_config(name):
  for c in Shapes.BUILDER_CONFIGS:
    if c.name == name:
      return c
  names = ", ".join(c.name for c in Shapes.BUILDER_CONFIGS)
  raise ValueError(f"shapes: unknown config {name!r}; expected one of {names}")


def prepare(config_name="tiny", data_dir=None, file_format="array_record"):
  """Builds `shapes/<config_name>` into `data_dir` (default: the vlm_jax cache,
  `vlm_jax.data.cache`) unless it is there already; returns the builder.

  Safe to call from several processes at once: a file lock in `data_dir` serialises them, and
  TFDS writes into a temporary directory that it renames when complete, so a reader never sees
  a half-written dataset.

  file_format: 'array_record' (default) gives random access with `tfds.data_source` / grain, the
    way the input pipeline reads; TFDS 4.9 cannot read it with `tfds.load` (tf.data). Use
    'tfrecord' (in another data_dir: one data_dir holds one format) for `tfds.load`.
  """
  get_config(config_name)  # clear error for an unknown name
  data_dir = cache.tfds_data_dir("shapes", data_dir)
  os.makedirs(data_dir, exist_ok=True)
  lock_path = os.path.join(data_dir, f".shapes-{config_name}.lock")
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      name = f"shapes/{config_name}"
      builder = tfds.builder(name, data_dir=data_dir)
      if builder.is_prepared():
        have, want = builder.info.file_format, tfds.core.file_adapters.FileFormat(file_format)
        if have is not None and have != want:
          raise ValueError(
              f"{name} in {data_dir} was prepared as {have.value}, not {want.value}; delete "
              f"{builder.data_dir} to rebuild it")
      else:
        builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
        builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder
