"""CoCa ViT-B/32 (Yu et al. 2022, in OpenCLIP's coca_ViT-B-32 configuration), for a pod / cluster.

  python -m vlm_jax.train --config configs/coca_vit_b32.py --workdir gs://bucket/coca_b32 \
      --config.data.train_shards='gs://bucket/laion2b/{000000..231349}.tar' \
      --config.tokenizer.model_path=gs://bucket/bpe_simple_vocab_16e6.txt.gz

Contrastive weight 1, captioning weight 2 (the paper's), attention-pooled image embedding,
a 12-layer 512-wide causal text tower and a 12-layer multimodal decoder cross-attending to the
image tokens. Global batch 32768, AdamW lr 5e-4 (beta2 0.98, wd 0.2), 2000 warmup steps,
cosine, 13B samples seen (about 400k steps).
"""
import ml_collections

from . import clip_vit_b16


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.task = "coca"
  c.model = dict(
      embed_dim=512, remat=True, scan=True, remat_policy="dots_no_batch", attention="auto",
      image=dict(name="vit", variant="B/32", image_size=224, pool="map", ln_pre=True,
                 ln_eps=1e-5),
      text=dict(name="transformer", vocab_size=49408, context_length=76, width=512, depth=12,
                num_heads=8, mlp_dim=2048, pool="eos", ln_eps=1e-5),
      decoder=dict(name="cross_attention", width=512, depth=12, num_heads=8, mlp_dim=2048,
                   ln_eps=1e-5))
  c.loss = dict(contrastive="softmax", contrastive_impl="chunked", contrastive_weight=1.0,
                caption_weight=2.0)
  c.data = dict(source="wds", image_size=224, mean=clip_vit_b16.OPENAI_MEAN,
                std=clip_vit_b16.OPENAI_STD)
  c.tokenizer = dict(kind="bpe", vocab_size=49408, context_length=76)
  c.mesh = dict(data=1, fsdp=-1)
  c.total_steps = 400_000
  c.batch_size = 32768
  c.optim = dict(lr=5e-4, weight_decay=0.2, grad_clip_norm=1.0)
  c.schedule = dict(warmup_steps=2000)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 10_000
  c.evals = dict(run="zeroshot_imagenet,caption")
  return c
