"""What the CPU-sized configs on the embedded `shapes` dataset share (plain data).

A ViT 2x64 on 32x32 images with 4x4 patches and mean pooling; for tasks with text, a 2-layer
text tower and / or decoder of width 64 over a 256-id SentencePiece vocabulary trained on the
captions (24 tokens). 1200 steps of 64 ('demo': shapes/demo, 20k training images) or 50
('tiny': shapes/tiny, 256 images, for tests).
"""
import ml_collections

VOCAB, LENGTH = 256, 24
TOWER = dict(width=64, depth=2, num_heads=4, mlp_dim=128)


def variant(arg):
  name = arg or "demo"
  if name not in ("demo", "tiny"):
    raise ValueError(f"config arg: unknown shapes variant {name!r}; expected demo or tiny")
  return name


def shapes_config(task, arg=None):
  """The image tower, data and trainer fields of `task` on shapes/<arg> ('demo' or 'tiny')."""
  name = variant(arg)
  steps = 1200 if name == "demo" else 50
  c = ml_collections.ConfigDict()
  c.task = task
  c.model = dict(image=dict(name="vit", variant="mu/4", image_size=32, pool="gap", **TOWER))
  c.data = dict(source="tfds", name=f"shapes/{name}", image_size=32, eval_split="test",
                min_scale=1.0)        # min_scale 1: keep the positions the captions mention
  c.total_steps = steps
  c.batch_size = 64
  c.optim = dict(lr=2e-3, weight_decay=1e-4)
  c.schedule = dict(warmup_steps=min(100, steps // 5))
  c.log_every_steps = 50 if name == "demo" else 10
  c.checkpoint_every_steps = 400 if name == "demo" else 25
  c.keep_checkpoints = 2
  return c


def add_text_tower(c):
  """A text tower of the demo's size and a joint embedding of 64."""
  c.model.embed_dim = 64
  c.model.text = dict(name="transformer", vocab_size=VOCAB, context_length=LENGTH, **TOWER)
  c.tokenizer = dict(vocab_size=VOCAB, context_length=LENGTH)
  return c


def add_decoder(c, own_vocabulary=False):
  """A decoder of the demo's size; `own_vocabulary` when there is no text tower to share it."""
  c.model.decoder = dict(name="cross_attention", **TOWER)
  if own_vocabulary:
    c.model.decoder.update(vocab_size=VOCAB, context_length=LENGTH)
    c.tokenizer = dict(vocab_size=VOCAB, context_length=LENGTH)
  return c
