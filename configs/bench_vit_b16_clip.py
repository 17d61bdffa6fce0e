"""ViT-B/16 CLIP at bfloat16, the accelerator benchmark (GPU / TPU).

  python bench/train_step.py --config configs/bench_vit_b16_clip.py [--config.batch_size=256]

OpenAI CLIP ViT-B/16 sizes: image 224 (196 patches + class token), width 768 / 12 layers / 12
heads; text 77 tokens, 49408 ids, width 512 / 12 layers / 8 heads; embedding 512. Compute in
bfloat16 with float32 params; AdamW (constant learning rate, no clipping); softmax contrastive
loss; exact GELU. `batch_size` is the global batch (per device: batch_size / device count).
The model is the recipe's: blocks scanned and rematerialised, keeping the matmuls without a
batch dimension (`remat_policy='dots_no_batch'`). arg: 'plain' (no scan, no remat: the
fastest step where the activations fit) or 'remat' (scan + full remat: the least memory).
"""
import ml_collections

from . import clip_vit_b16


def get_config(arg=None):
  if arg not in (None, "", "plain", "remat"):
    raise ValueError(f"configs/bench_vit_b16_clip.py: unknown arg {arg!r}; expected 'plain', "
                     "'remat' or none")
  recipe = clip_vit_b16.get_config()
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.model = recipe.model              # the recipe's model, unchanged but for dtype and memory
  c.model.dtype = "bfloat16"
  if arg == "plain":
    c.model.update(scan=False, remat=False)
  elif arg == "remat":
    c.model.remat_policy = "full"
  c.loss = dict(contrastive="softmax")
  c.total_steps = 1000
  c.batch_size = 256
  c.optim = dict(lr=1e-4, grad_clip_norm=0.0)
  c.schedule = dict(kind="constant", warmup_steps=0)
  c.progress_bar = False
  return c
