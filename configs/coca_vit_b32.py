"""CoCa ViT-B/32 (Yu et al. 2022, in OpenCLIP's coca_ViT-B-32 configuration), for a pod / cluster.

  python -m vlm_jax.train --config configs/coca_vit_b32.py --workdir gs://bucket/coca_b32 \
      --config.data.train_shards='gs://bucket/laion2b/{000000..231349}.tar' \
      --config.tokenizer.model_path=gs://bucket/bpe_simple_vocab_16e6.txt.gz

Contrastive weight 1, captioning weight 2 (the paper's), attention-pooled image embedding,
a 12-layer 512-wide causal text tower and a 12-layer multimodal decoder cross-attending to the
image tokens. Global batch 32768, AdamW lr 5e-4 (beta2 0.98, wd 0.2), 2000 warmup steps,
cosine, 13B samples seen (about 400k steps).
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.ml_collections.ConfigDict()
  config.model = common.model_config("coca", embed_dim=512)
  m = config.model
  m.image = common.vit_config("B/32", image_size=224, pool="map")
  m.image.ln_pre = True
  m.image.ln_eps = 1e-5
  m.text = common.text_config(vocab_size=49408, context_length=76, width=512, depth=12,
                              num_heads=8, mlp_dim=2048)
  m.text.pool = "eos"
  m.text.ln_eps = 1e-5
  m.decoder = common.decoder_config(width=512, depth=12, num_heads=8, mlp_dim=2048)
  m.decoder.ln_eps = 1e-5
  config.loss = common.loss_config("coca")
  config.loss.contrastive_impl = "chunked"

  config.data = common.data_config("wds", image_size=224)
  config.data.mean = (0.48145466, 0.4578275, 0.40821073)
  config.data.std = (0.26862954, 0.26130258, 0.27577711)
  config.tokenizer = common.tokenizer_config(vocab_size=49408, context_length=76)
  config.tokenizer.kind = "bpe"

  config.mesh = common.mesh_config(data=1, fsdp=-1)
  config.sharding_rules = common.sharding_rules()

  config.update(common.train_config(total_steps=400_000, batch_size=32768, lr=5e-4,
                                    warmup_steps=2000))
  config.optim.weight_decay = 0.2
  config.optim.grad_clip_norm = 1.0
  config.model.remat = True
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  config.evals = common.eval_config(run="zeroshot_imagenet,caption")
  return config
