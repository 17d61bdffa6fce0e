"""ViT-B/16 CLIP at bfloat16, the accelerator benchmark (GPU / TPU).

  python bench/train_step.py --config configs/bench_vit_b16_clip.py [--config.batch_size=256]

OpenAI CLIP ViT-B/16 sizes: image 224 (196 patches + class token), width 768 / 12 layers / 12
heads; text 77 tokens, 49408 ids, width 512 / 12 layers / 8 heads; embedding 512. Compute in
bfloat16 with float32 params; AdamW (constant learning rate, no clipping); softmax contrastive
loss; exact GELU. `batch_size` is the global batch (per device: batch_size / device count).

arg: 'remat' re-computes each block in the backward pass (larger batches fit).
"""
from configs import clip_vit_b16
from configs import common


def get_config(arg=None):
  config = common.ml_collections.ConfigDict()
  config.model = clip_vit_b16.get_config().model   # the recipe's model, unchanged but for dtype
  m = config.model
  m.dtype = "bfloat16"
  m.remat = arg == "remat"
  if arg not in (None, "", "remat"):
    raise ValueError(f"configs/bench_vit_b16_clip.py: unknown arg {arg!r}; expected 'remat' "
                     "or none")
  config.loss = common.loss_config("clip")
  config.mesh = common.mesh_config()
  config.sharding_rules = common.sharding_rules()
  config.update(common.train_config(total_steps=1000, batch_size=256, lr=1e-4, warmup_steps=0))
  config.schedule.kind = "constant"
  config.optim.grad_clip_norm = 0.0
  config.progress_bar = False
  return config
