"""SigLIP ViT-B/16 at 224px (Zhai et al. 2023; big_vision's recipe), for a TPU pod.

  python -m vlm_jax.train --config configs/siglip_vit_b16.py --workdir gs://bucket/siglip_b16 \
      --config.data.train_shards='gs://bucket/webli/{00000..09999}.tar' \
      --config.tokenizer.model_path=gs://bucket/c4_en_32k.model

Sigmoid loss (t' = log 10, b = -10), global batch 32768, 9B examples seen (about 275k steps);
AdamW lr 1e-3, beta2 0.95, weight decay 1e-4, 10k warmup steps then cosine. Image tower: MAP
pooling, learned position embeddings; text tower bidirectional, 64 tokens, 32k SentencePiece
vocabulary, last-token pooling. The ring ('chunked') sigmoid loss keeps per-device memory flat.
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.ml_collections.ConfigDict()
  config.model = common.model_config("siglip", embed_dim=768)
  m = config.model
  m.image = common.vit_config("B/16", image_size=224, pool="map")
  m.text = common.text_config(vocab_size=32_000, context_length=64, width=768, depth=12,
                              num_heads=12, mlp_dim=3072)
  m.text.causal = False
  m.text.pool = "last"
  config.loss = common.loss_config("siglip")
  config.loss.contrastive_impl = "chunked"

  config.data = common.data_config("wds", image_size=224)
  config.data.train_crop = "resize"             # SigLIP: plain resize, no crop augmentation
  config.tokenizer = common.tokenizer_config(vocab_size=32_000, context_length=64)

  config.mesh = common.mesh_config(data=1, fsdp=-1)
  config.sharding_rules = common.sharding_rules()

  config.update(common.train_config(total_steps=275_000, batch_size=32768, lr=1e-3,
                                    warmup_steps=10_000))
  config.optim.weight_decay = 1e-4
  config.optim.b2 = 0.95
  config.optim.grad_clip_norm = 1.0
  config.model.remat = True
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  config.evals = common.eval_config(run="zeroshot_imagenet")
  return config
