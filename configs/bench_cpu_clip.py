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
import ml_collections


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/bench_cpu_clip.py: unknown arg {arg!r}; expected 'tiny' or none")
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.model = dict(
      embed_dim=256, dtype="float32",
      image=dict(name="vit", variant="S/8", image_size=64, pool="cls", width=256, depth=6,
                 num_heads=4, mlp_dim=1024, class_token=True, ln_pre=True, patch_bias=False,
                 ln_eps=1e-5),
      text=dict(name="transformer", vocab_size=8192, context_length=32, width=256, depth=6,
                num_heads=4, mlp_dim=1024, pool="eos", ln_eps=1e-5))
  c.loss = dict(contrastive="softmax")
  c.total_steps = 1000
  c.batch_size = 64
  c.optim = dict(lr=1e-4, grad_clip_norm=0.0)
  c.schedule = dict(kind="constant", warmup_steps=0)
  c.progress_bar = False
  if arg == "tiny":
    shrink(c)
  return c


def shrink(c):
  """Tiny sizes of the same model (tests of the benchmark scripts)."""
  m = c.model
  m.embed_dim = 32
  m.image.update(image_size=16, width=32, depth=1, num_heads=2, mlp_dim=64)
  m.text.update(vocab_size=64, context_length=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  c.batch_size = 8
