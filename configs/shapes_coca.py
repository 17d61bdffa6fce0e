"""The demo: a tiny CoCa trained on the embedded `shapes` dataset, CPU-sized (minutes on 2 cores).

  python -m vlm_jax.train --config configs/shapes_coca.py --workdir runs/shapes_coca
  python -m vlm_jax.train --config configs/shapes_coca.py:tiny ...   # the 256-example test set

arg: 'demo' (default: shapes/demo, 20k training images) or 'tiny' (shapes/tiny, for tests).
"""
from configs import common


def get_config(arg=None):
  return shapes_config("coca", arg)


def shapes_config(kind, arg=None):
  """Shared by shapes_coca / shapes_clip / shapes_siglip."""
  variant = arg or "demo"
  if variant not in ("demo", "tiny"):
    raise ValueError(f"config arg: unknown shapes variant {variant!r}; expected demo or tiny")
  config = common.ml_collections.ConfigDict()
  vocab, length = 256, 24

  config.model = common.model_config(kind, embed_dim=64)
  m = config.model
  m.image = common.vit_config("mu/4", image_size=32, pool="gap")
  m.image.update(width=64, depth=2, num_heads=4, mlp_dim=128)
  m.text = common.text_config(vocab_size=vocab, context_length=length, width=64, depth=2,
                              num_heads=4, mlp_dim=128)
  m.decoder = common.decoder_config(width=64, depth=2, num_heads=4, mlp_dim=128)
  m.text.causal = kind != "siglip"
  config.loss = common.loss_config(kind)

  config.data = common.data_config("tfds", f"shapes/{variant}", image_size=32)
  config.data.eval_split = "test"
  config.data.min_scale = 1.0                       # keep the positions the captions mention
  config.tokenizer = common.tokenizer_config(vocab_size=vocab, context_length=length)

  config.mesh = common.mesh_config()
  config.sharding_rules = common.sharding_rules()

  steps = 1200 if variant == "demo" else 50
  config.update(common.train_config(total_steps=steps, batch_size=64, lr=2e-3,
                                    warmup_steps=min(100, steps // 5)))
  config.optim.weight_decay = 1e-4
  config.log_every_steps = 50 if variant == "demo" else 10
  config.checkpoint_every_steps = 400 if variant == "demo" else 25
  config.keep_checkpoints = 2
  config.evals = common.eval_config()
  return config
