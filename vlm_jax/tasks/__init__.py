"""Tasks: one module per training objective (see `vlm_jax.tasks.base` for what a task is).

    contrastive     CLIP / SigLIP                       image, text
    coca            contrastive + captioning decoder    image, text
    captioning      decoder only (CapPa-style)          image, text
    classification  image tower + linear head           image, label
    prefix_lm       image tokens as the prefix of an LM  image, text, prompt_len, target_mask
                    (captioning + VQA)
    causal_lm       a decoder-only LM on text alone      text
    masked_lm       BERT masked-LM of a text encoder     text, mlm_target, mlm_mask
    vqa_classifier  VQA over frequent answers (late      image, text, answer_scores
                    fusion of image and question features)
    image_text_matching  does the caption fit the image?  image, text
                    (late fusion, binary)

`config.task` names the task; `get(name)` returns it. A new objective is a module here with a
`TASK` object (a `base.Task` subclass instance), one line in `TASKS`, and a config file.
"""
from vlm_jax.tasks import captioning
from vlm_jax.tasks import causal_lm
from vlm_jax.tasks import classification
from vlm_jax.tasks import coca
from vlm_jax.tasks import image_text_matching
from vlm_jax.tasks import masked_lm
from vlm_jax.tasks import contrastive
from vlm_jax.tasks import prefix_lm
from vlm_jax.tasks import vqa_classifier
from vlm_jax.tasks.base import Objective, Task, TextSpec

TASKS = {t.name: t for t in (contrastive.TASK, coca.TASK, captioning.TASK,
                             classification.TASK, prefix_lm.TASK,
                             causal_lm.TASK, masked_lm.TASK, vqa_classifier.TASK,
                             image_text_matching.TASK)}


def get(name) -> Task:
  """The task called `name`; an unknown name fails listing the known ones."""
  if name not in TASKS:
    known = ", ".join(f"{n} ({t.description})" for n, t in TASKS.items())
    raise ValueError(f"task: unknown task {name!r}; known tasks: {known}")
  return TASKS[name]


__all__ = ["TASKS", "get", "Task", "Objective", "TextSpec"]
