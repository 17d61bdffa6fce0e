"""VQA as classification on the embedded `shapes` dataset (late fusion): the demo's image tower
(ViT 2x64, mean-pooled) and a BERT 2x64 question encoder ([CLS]), concatenated, through an MLP of
256 over the training data's most frequent answers, soft targets and binary cross-entropy, as
the VQAv2 classifier baselines. Scored with the official VQA accuracy on the same test split as
the prefix-LM (`shapes_prefixlm.py`). arg: 'demo' (default) or 'tiny'.

  python -m vlm_jax.demo --config configs/shapes_fusion_vqa.py
"""
from . import shapes_common


def get_config(arg=None):
  c = shapes_common.shapes_config("vqa_classifier", arg)
  c.model.text = dict(name="bert", vocab_size=shapes_common.VOCAB,
                      context_length=shapes_common.LENGTH, **shapes_common.TOWER)
  c.model.num_answers = 100
  c.model.hidden_dim = 256
  c.tokenizer = dict(vocab_size=shapes_common.VOCAB, context_length=shapes_common.LENGTH)
  c.data.questions_key = "questions"
  return c
