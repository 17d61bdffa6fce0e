"""Retrieval-augmented captioning (SmallCap-style) on the embedded `shapes` dataset: the prefix-LM
of `shapes_prefixlm.py` trained on captions only, each caption's prompt holding the captions of
the image's nearest neighbours in a datastore ("similar images show: ...; ...; .... caption:").
arg: 'demo' (default), 'tiny', or 'formats': trained on `shapes/demo_formats` (each image's
captions in 34 attribute-list formats) with every neighbour's caption in the format of the caption
being learned, so that the captioner learns to write in the format of its prompt; the held-out
terse format (`shapes/demo_terse`) is then a test-time datastore in a caption style it never saw.

The neighbours come from a retrieval model and an index, made beforehand (README, "Retrieval-
augmented captioning"): `data.neighbours` for the training images (never their own captions),
`evals.caption.neighbours` for the test images; the test datastore can be swapped without
retraining. Without both, this trains the same captioner with an empty prompt: the baseline.

  python -m vlm_jax.train --config configs/shapes_retrieval_caption.py --workdir runs/rag \
      --config.data.neighbours=runs/store/train_neighbours.jsonl \
      --config.evals.caption.neighbours=runs/store/test_neighbours.jsonl
"""
from . import shapes_common
from . import shapes_prefixlm

LENGTH = 64      # retrieved captions (up to 40 tokens) + bos + caption + eos
CAPTION_TOKENS = 24
# Three attribute-list captions take up to 78 tokens with the prompt's words.
FORMATS_LENGTH = 112


def get_config(arg=None):
  if arg not in (None, "", "demo", "tiny", "formats"):
    raise ValueError(f"configs/shapes_retrieval_caption.py: unknown arg {arg!r}; expected demo, "
                     "tiny or formats")
  formats = arg == "formats"            # the demo data's images, in 34 caption formats
  variant = "demo" if formats else shapes_common.variant(arg)
  c = shapes_prefixlm.get_config(variant)   # its image tower, projector and LM, captions only
  if variant == "demo":
    c.total_steps = 2000
  c.data.questions_key = ""
  length = FORMATS_LENGTH if formats else LENGTH
  c.model.context_length = length
  c.tokenizer.context_length = length
  if formats:
    c.total_steps = 3000
    c.data.name = "shapes/demo_formats"
    c.data.neighbours_same_phrasing = True
  c.loss = dict(caption_weight=1.0, vqa_weight=0.0)
  c.data.neighbours_k = 3
  # Generation leaves LENGTH - CAPTION_TOKENS tokens to the retrieved captions; the references'
  # likelihood (measured without a prompt) is off.
  c.evals = dict(run="caption", caption=dict(max_len=CAPTION_TOKENS, loglik=False))
  return c
