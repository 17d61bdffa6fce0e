"""Retrieval-augmented captioning (SmallCap-style) on the embedded `shapes` dataset: the prefix-LM
of `shapes_prefixlm.py` trained on captions only, each caption's prompt holding the captions of
the image's nearest neighbours in a datastore ("similar images show: ...; ...; .... caption:").
arg: 'demo' (default) or 'tiny'.

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


def get_config(arg=None):
  c = shapes_prefixlm.get_config(arg)   # its image tower, projector and LM, captions only
  if shapes_common.variant(arg) == "demo":
    c.total_steps = 2000
  c.data.questions_key = ""
  c.model.context_length = LENGTH
  c.tokenizer.context_length = LENGTH
  c.loss = dict(caption_weight=1.0, vqa_weight=0.0)
  c.data.neighbours_k = 3
  # Generation leaves LENGTH - CAPTION_TOKENS tokens to the retrieved captions; the references'
  # likelihood (measured without a prompt) is off.
  c.evals = dict(run="caption", caption=dict(max_len=CAPTION_TOKENS, loglik=False))
  return c
