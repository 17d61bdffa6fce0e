"""CLIP ViT-B/16 (Radford et al. 2021; OpenCLIP's LAION-400M recipe), for a TPU pod / GPU cluster.

  python -m vlm_jax.train --config configs/clip_vit_b16.py --workdir gs://bucket/clip_b16 \
      --config.data.train_shards='gs://bucket/laion400m/{00000..41407}.tar' \
      --config.tokenizer.model_path=gs://bucket/bpe_simple_vocab_16e6.txt.gz

32 epochs of 400M image-text pairs at a global batch of 32768 (about 390k steps); AdamW
lr 5e-4, beta2 0.98, eps 1e-6, weight decay 0.2, 2000 warmup steps then cosine. The OpenAI text
tower: causal, 77 tokens, 49408-id byte-level BPE (tokenizer.kind='bpe'), eos pooling.
arg: 'fsdp' shards params/optimizer over all devices instead of pure data parallelism.
"""
import ml_collections

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.model = dict(
      embed_dim=512, remat=True, scan=True, remat_policy="dots_no_batch", attention="auto",
      image=dict(name="vit", variant="B/16", image_size=224, pool="cls", class_token=True,
                 ln_pre=True, patch_bias=False, ln_eps=1e-5),  # OpenAI conv1 has no bias
      text=dict(name="transformer", vocab_size=49408, context_length=77, width=512, depth=12,
                num_heads=8, mlp_dim=2048, pool="eos", ln_eps=1e-5))
  c.loss = dict(contrastive="softmax", contrastive_impl="chunked")  # B_local x B_global logits
  c.data = dict(source="wds", image_size=224, mean=OPENAI_MEAN, std=OPENAI_STD, min_scale=0.9)
  c.tokenizer = dict(kind="bpe", vocab_size=49408, context_length=77)
  c.mesh = dict(data=1, fsdp=-1) if arg == "fsdp" else dict(data=-1, fsdp=1, tensor=1)
  c.total_steps = 390_000
  c.batch_size = 32768
  c.optim = dict(lr=5e-4, weight_decay=0.2, b2=0.98, eps=1e-6,
                 grad_clip_norm=0.0)      # OpenCLIP default: no clipping
  c.schedule = dict(warmup_steps=2000)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 10_000
  c.evals = dict(run="zeroshot_imagenet")
  return c
