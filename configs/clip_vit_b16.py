"""CLIP ViT-B/16 (Radford et al. 2021; OpenCLIP's LAION-400M recipe), for a TPU pod / GPU cluster.

  python -m vlm_jax.train --config configs/clip_vit_b16.py --workdir gs://bucket/clip_b16 \
      --config.data.train_shards='gs://bucket/laion400m/{00000..41407}.tar' \
      --config.tokenizer.model_path=gs://bucket/bpe_simple_vocab_16e6.txt.gz

32 epochs of 400M image-text pairs at a global batch of 32768 (about 390k steps); AdamW
lr 5e-4, beta2 0.98, eps 1e-6, weight decay 0.2, 2000 warmup steps then cosine. The OpenAI text
tower: causal, 77 tokens, 49408-id byte-level BPE (tokenizer.kind='bpe'), eos pooling.
arg: 'fsdp' shards params/optimizer over all devices instead of pure data parallelism.
"""
from configs import common


def get_config(arg=None):
  config = common.ml_collections.ConfigDict()
  config.model = common.model_config("clip", embed_dim=512)
  m = config.model
  m.image = common.vit_config("B/16", image_size=224, pool="cls")
  m.image.class_token = True
  m.image.ln_pre = True
  m.image.patch_bias = False                # OpenAI / OpenCLIP conv1 has no bias
  m.image.ln_eps = 1e-5
  m.text = common.text_config(vocab_size=49408, context_length=77, width=512, depth=12,
                              num_heads=8, mlp_dim=2048)
  m.text.pool = "eos"
  m.text.ln_eps = 1e-5
  config.loss = common.loss_config("clip")
  config.loss.contrastive_impl = "chunked"    # B_local x B_global logits per device

  config.data = common.data_config("wds", image_size=224)
  config.data.mean = (0.48145466, 0.4578275, 0.40821073)
  config.data.std = (0.26862954, 0.26130258, 0.27577711)
  config.data.min_scale = 0.9
  config.tokenizer = common.tokenizer_config(vocab_size=49408, context_length=77)
  config.tokenizer.kind = "bpe"

  config.mesh = common.mesh_config(data=1, fsdp=-1) if arg == "fsdp" else common.mesh_config()
  config.sharding_rules = common.sharding_rules()

  config.update(common.train_config(total_steps=390_000, batch_size=32768, lr=5e-4,
                                    warmup_steps=2000))
  config.optim.weight_decay = 0.2
  config.optim.b2 = 0.98
  config.optim.eps = 1e-6
  config.optim.grad_clip_norm = 0.0   # OpenCLIP default: no clipping
  config.model.remat = True
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  config.evals = common.eval_config(run="zeroshot_imagenet")
  return config
