"""A PaliGemma-shaped prefix-LM at bfloat16, the accelerator benchmark of the prefix-LM step.

  python bench/train_step.py --config configs/bench_prefixlm.py [--config.batch_size=256]

Image: ViT-B/16 at 224 without a class token (196 image tokens, as PaliGemma's SigLIP tower
gives its tokens), linear projector. LM: Llama-style (RoPE, RMSNorm, gated SiLU MLP), width
1024, 16 layers, 16 query heads sharing 4 key/value heads, MLP 2816, 32000 ids, untied head
(246 M parameters; the whole model 333 M). Text rows of 64 tokens (prompt, bos,
answer, eos), so the LM reads 260 positions. AdamW, constant learning rate, no clipping; blocks
scanned and rematerialised keeping the matmuls without a batch dimension, attention 'auto'
(cuDNN's flash kernel on a GPU). `batch_size` is the global batch.

arg: 'tiny' shrinks every size (tests, `bench/gpu_check.sh --dry-run`).
"""
import ml_collections


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/bench_prefixlm.py: unknown arg {arg!r}; expected 'tiny' or none")
  c = ml_collections.ConfigDict()
  c.task = "prefix_lm"
  c.model = dict(
      dtype="bfloat16", remat=True, scan=True, remat_policy="dots_no_batch", attention="auto",
      image=dict(name="vit", variant="B/16", image_size=224, pool="gap", class_token=False),
      projector="linear", context_length=64,
      lm=dict(name="decoder_only", style="llama", width=1024, depth=16, num_heads=16,
              num_kv_heads=4, mlp_dim=2816, vocab_size=32000))
  c.loss = dict(caption_weight=1.0, vqa_weight=1.0)
  c.total_steps = 1000
  c.batch_size = 128
  c.optim = dict(lr=1e-4, grad_clip_norm=0.0)
  c.schedule = dict(kind="constant", warmup_steps=0)
  c.progress_bar = False
  if arg == "tiny":
    c.model.dtype = "float32"
    c.model.image.update(variant="mu/8", image_size=16)
    c.model.lm.update(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, vocab_size=64)
    c.model.context_length = 8
    c.batch_size = 8
  return c
