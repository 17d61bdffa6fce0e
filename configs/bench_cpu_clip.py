"""The fixed CPU benchmark: a small CLIP trained with AdamW on a softmax contrastive loss.

  python bench/train_step.py --config configs/bench_cpu_clip.py
  bash bench/compare.sh          # side by side with the PyTorch peer (bench/peer_step.py)

Fixed so that numbers stay comparable across commits and machines: image 64x64, patch 8, vision
width 256 / 6 layers / 4 heads / MLP 1024; text context 32, vocabulary 8192, width 256 / 6 layers
/ 4 heads / MLP 1024; embedding 256; batch 64; float32; AdamW (constant learning rate, no
clipping); softmax contrastive loss. The towers follow the OpenAI CLIP layout (class token,
ln_pre, class-token pooling, no patch bias, causal text with eos pooling) so that the Hugging
Face `CLIPModel` peer computes exactly the same function; both use exact GELU.

arg: 'tiny' shrinks every size (tests).
"""
from configs import common


def get_config(arg=None):
  config = common.ml_collections.ConfigDict()
  config.model = common.model_config("clip", embed_dim=256)
  m = config.model
  m.image = common.vit_config("S/8", image_size=64, pool="cls")
  m.image.width, m.image.depth, m.image.num_heads, m.image.mlp_dim = 256, 6, 4, 1024
  m.image.class_token = True
  m.image.ln_pre = True
  m.image.patch_bias = False
  m.image.ln_eps = 1e-5
  m.text = common.text_config(vocab_size=8192, context_length=32, width=256, depth=6,
                              num_heads=4, mlp_dim=1024)
  m.text.pool = "eos"
  m.text.ln_eps = 1e-5
  m.dtype = "float32"
  config.loss = common.loss_config("clip")
  config.mesh = common.mesh_config()
  config.sharding_rules = common.sharding_rules()
  config.update(common.train_config(total_steps=1000, batch_size=64, lr=1e-4, warmup_steps=0))
  config.schedule.kind = "constant"
  config.optim.grad_clip_norm = 0.0
  config.progress_bar = False
  if arg == "tiny":
    shrink(config)
  elif arg:
    raise ValueError(f"configs/bench_cpu_clip.py: unknown arg {arg!r}; expected 'tiny' or none")
  return config


def shrink(config):
  """Tiny sizes of the same model (tests of the benchmark scripts)."""
  m = config.model
  m.embed_dim = 32
  m.image.image_size = 16
  m.image.width, m.image.depth, m.image.num_heads, m.image.mlp_dim = 32, 1, 2, 64
  m.text.vocab_size, m.text.context_length = 64, 8
  m.text.width, m.text.depth, m.text.num_heads, m.text.mlp_dim = 32, 1, 2, 64
  config.batch_size = 8
