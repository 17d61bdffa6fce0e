"""SigLIP ViT-B/16 at 224px (Zhai et al. 2023; big_vision's recipe), for a TPU pod.

  python -m vlm_jax.train --config configs/siglip_vit_b16.py --workdir gs://bucket/siglip_b16 \
      --config.data.train_shards='gs://bucket/webli/{00000..09999}.tar' \
      --config.tokenizer.model_path=gs://bucket/c4_en_32k.model

Sigmoid loss (t' = log 10, b = -10), global batch 32768, 9B examples seen (about 275k steps);
AdamW lr 1e-3, beta2 0.95, weight decay 1e-4, 10k warmup steps then cosine. Image tower: MAP
pooling, learned position embeddings, no projection after the MAP head (its output is the
embedding); text tower bidirectional, 64 tokens, 32k SentencePiece vocabulary, padded with its
eos and read at the last position with no padding mask, as big_vision's SigLIP -- so a run
exports to a Hugging Face SiglipModel exactly (`python -m vlm_jax.export`). The ring
('chunked') sigmoid loss keeps per-device memory flat.
"""
import math

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.model = dict(
      embed_dim=768, image_proj=False, proj_bias=True,
      remat=True, scan=True, remat_policy="dots_no_batch", attention="auto",
      logit_scale_init=math.log(10.0), logit_bias_init=-10.0,
      image=dict(name="vit", variant="B/16", image_size=224, pool="map", act="gelu_tanh"),
      text=dict(name="transformer", vocab_size=32_000, context_length=64, width=768, depth=12,
                num_heads=12, mlp_dim=3072, causal=False, pool="last", pad_id=-1,
                act="gelu_tanh"))
  c.loss = dict(contrastive="sigmoid", contrastive_impl="chunked")
  c.data = dict(source="wds", image_size=224,
                train_crop="resize", eval_crop="resize")   # SigLIP: plain resize, no crop
  c.tokenizer = dict(vocab_size=32_000, context_length=64, pad="eos")
  c.mesh = dict(data=1, fsdp=-1)
  c.total_steps = 275_000
  c.batch_size = 32768
  c.optim = dict(lr=1e-3, weight_decay=1e-4, b2=0.95, grad_clip_norm=1.0)
  c.schedule = dict(warmup_steps=10_000)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 10_000
  c.evals = dict(run="zeroshot_imagenet")
  return c
