"""Shared configuration pieces.

Every experiment config (`configs/<experiment>.py`) builds its ConfigDict from these functions
and overrides what differs. Configs are plain Python; the returned ConfigDicts are locked by the
experiment's `get_config`, so a mistyped key (on the command line or in code) fails fast with its
name. Fields that have no sensible default are `placeholder(type)`: they exist (so overrides are
type-checked) but hold None until set.
"""
import math

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def vit_config(variant="mu/8", image_size=32, pool="map"):
  """Image tower. `variant` is `<size>/<patch>`; the widths/depths come from the variant table in
  `vlm_jax.models.vit` unless overridden here (width, depth, num_heads, mlp_dim)."""
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.image_size = image_size
  c.width = placeholder(int)
  c.depth = placeholder(int)
  c.num_heads = placeholder(int)
  c.mlp_dim = placeholder(int)
  c.pool = pool                  # 'map' (attention pooling) | 'gap' | 'cls'
  c.posemb = "learn"             # 'learn' | 'sincos2d'
  c.class_token = False          # OpenAI CLIP: True (with pool='cls', ln_pre=True)
  c.ln_pre = False
  c.act = "gelu"                 # 'gelu' (exact) | 'gelu_tanh' | 'quick_gelu'
  c.ln_eps = 1e-6
  c.use_bias = True              # biases in attention / MLP
  c.patch_bias = True            # bias of the patch embedding (OpenAI CLIP: False)
  c.dropout = 0.0
  return c


def text_config(vocab_size=1024, context_length=32, width=64, depth=2, num_heads=4, mlp_dim=256):
  """Text tower (token + position embedding, Transformer encoder, pooling)."""
  c = ml_collections.ConfigDict()
  c.vocab_size = vocab_size
  c.context_length = context_length
  c.width = width
  c.depth = depth
  c.num_heads = num_heads
  c.mlp_dim = mlp_dim
  c.causal = True                # causal (CLIP) or bidirectional (SigLIP) self-attention
  c.pool = "last"                # 'eos' (argmax id, OpenAI CLIP) | 'last' (last real token) | 'first' | 'mean'
  c.pad_id = 0                   # tokens equal to pad_id are masked out
  c.act = "gelu"
  c.ln_eps = 1e-6
  c.use_bias = True
  c.dropout = 0.0
  return c


def decoder_config(width=64, depth=2, num_heads=4, mlp_dim=256):
  """CoCa multimodal decoder: causal self-attention + cross-attention to image tokens + MLP."""
  c = ml_collections.ConfigDict()
  c.width = width
  c.depth = depth
  c.num_heads = num_heads
  c.mlp_dim = mlp_dim
  c.tie_embeddings = False       # vocabulary head shares the decoder's token embedding
  c.act = "gelu"
  c.ln_eps = 1e-6
  c.use_bias = True
  c.dropout = 0.0
  return c


def model_config(kind="coca", embed_dim=64):
  """kind: 'clip' (softmax contrastive two-tower), 'siglip' (sigmoid two-tower), 'coca'."""
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.embed_dim = embed_dim
  c.image = vit_config()
  c.text = text_config()
  c.decoder = decoder_config()
  c.proj_bias = False            # projections to the joint space are plain matrices by default
  c.logit_scale_init = math.log(10.0) if kind == "siglip" else math.log(1 / 0.07)
  c.logit_bias_init = -10.0 if kind == "siglip" else placeholder(float)
  c.max_logit_scale = 100.0      # temperature cap (CLIP)
  c.dtype = "auto"               # compute dtype: 'auto' = bfloat16 on TPU/GPU, float32 on CPU
  c.param_dtype = "float32"
  c.remat = False                # nn.remat on every Transformer block
  c.scan = False                 # nn.scan over the Transformer blocks
  return c


def loss_config(kind="coca"):
  c = ml_collections.ConfigDict()
  c.contrastive = "sigmoid" if kind == "siglip" else "softmax"   # 'softmax' | 'sigmoid' | 'none'
  c.contrastive_weight = 1.0
  c.caption_weight = 2.0 if kind == "coca" else 0.0              # CoCa paper: 1.0 / 2.0
  c.label_smoothing = 0.0
  # 'plain': the loss on the global batch as written (XLA partitions it);
  # 'chunked': memory-lean shard_map versions (sigmoid: ring of B_local x B_local blocks;
  # softmax: each device computes only its rows, B_local x B_global);
  # 'ring': softmax also as a ring (B_local x B_local) -- all give the same values and gradients.
  c.contrastive_impl = "plain"
  return c


def mesh_config(data=-1, fsdp=1, tensor=1):
  """Device mesh (axes data, fsdp, tensor); one size may be -1 = all remaining devices.

  data=-1 is pure data parallelism; fsdp=N also shards params and optimizer state N ways;
  tensor=N splits heads / MLP / vocabulary N ways. The product must equal the device count.
  """
  c = ml_collections.ConfigDict()
  c.data = data
  c.fsdp = fsdp
  c.tensor = tensor
  return c


def sharding_rules():
  """Logical axis -> mesh axis rules (ordered; see vlm_jax.sharding.DEFAULT_RULES for why)."""
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  return [tuple(rule) for rule in sharding.DEFAULT_RULES]


def train_config(total_steps=1000, batch_size=256, lr=1e-3, warmup_steps=100):
  """Trainer fields (optimizer, schedule, accumulation, checkpoints, logging, evals).

  These live at the TOP level of an experiment config: `config.update(train_config(...))`, so the
  command line reads `--config.total_steps=…`, `--config.optim.lr=…`, `--config.init_from=…`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = total_steps
  c.batch_size = batch_size        # GLOBAL batch per optimizer step (all processes, all micro-batches)
  c.grad_accum_steps = 1           # k micro-batches of batch_size/k per step, same update as batch_size

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = lr                  # peak learning rate
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.1       # decoupled (AdamW); applied to params with ndim >= 2 only
  c.optim.no_decay = ""            # regex over param paths also excluded from decay, e.g. 'embedding'
  c.optim.grad_clip_norm = 1.0     # global-norm clipping; 0 / None = off
  c.freeze = ""                    # regex over param paths kept frozen (LiT: '^image/')

  c.schedule = ml_collections.ConfigDict()
  c.schedule.kind = "cosine"       # 'cosine' | 'rsqrt' | 'constant' (all after linear warmup)
  c.schedule.warmup_steps = warmup_steps
  c.schedule.end_lr_factor = 0.0   # cosine: final lr = lr * end_lr_factor
  c.schedule.timescale = placeholder(int)   # rsqrt: lr * sqrt(timescale / step); default warmup_steps
  c.schedule.cooldown_steps = 0    # rsqrt: linear decay to 0 over the last steps

  c.max_consecutive_nonfinite = 10  # this many skipped (NaN/Inf) steps in a row stop the run
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.init_from = placeholder(str)   # checkpoint dir (workdir or a step dir) to load params from
  c.init_from_skip = ""            # regex of params NOT to take from init_from (e.g. a new head)
  c.progress_bar = True
  c.eval_every_steps = 0           # 0 = evals only at the end
  return c


def data_config(source="tfds", name="shapes/tiny", image_size=32):
  """Input pipeline (vlm_jax.data.pipeline). The global batch size is a trainer field; the
  pipeline gets the per-process share."""
  c = ml_collections.ConfigDict()
  c.source = source              # 'tfds' | 'wds' (tar shards) | 'jsonl' (captions.jsonl + images)
  # TFDS: dataset name (with config/version), data_dir, splits, reader.
  c.name = name                  # e.g. 'shapes/tiny', 'coco_captions', 'cifar10'
  c.data_dir = placeholder(str)  # None: the TFDS default
  c.train_split = "train"
  c.eval_split = "validation"
  c.tfds_reader = "auto"         # 'auto' | 'data_source' (array_record) | 'as_dataset' (tfrecord)
  c.tfds_skip_decode = True      # images stay encoded; the pipeline decodes (and counts bad ones)
  # Field mapping ('/'-separated feature paths), for TFDS records.
  c.image_key = "image"
  c.text_key = "captions"        # coco_captions: 'captions/text'
  c.label_key = "label"          # '' or None: no label (batches carry -1)
  c.id_key = "id"                # record id for logs; coco_captions: 'image/filename'; '' = index
  # WebDataset-style tar shards: brace and/or glob patterns, e.g. 'shards/{00000..00099}.tar'.
  c.train_shards = placeholder(str)
  c.eval_shards = placeholder(str)
  c.shard_group = 4              # shards whose samples are shuffled together
  # captions.jsonl ({"image": path, "caption": str | [str]}); image paths relative to image_root
  # (default: the jsonl's folder).
  c.train_jsonl = placeholder(str)
  c.eval_jsonl = placeholder(str)
  c.image_root = placeholder(str)
  # Images.
  c.image_size = image_size
  c.mean = (0.5, 0.5, 0.5)       # OpenAI CLIP: (0.48145466, 0.4578275, 0.40821073)
  c.std = (0.5, 0.5, 0.5)        # OpenAI CLIP: (0.26862954, 0.26130258, 0.27577711)
  c.train_crop = "random_resized"  # 'random_resized' | 'resize' (eval: resize + centre crop)
  c.eval_crop = "center"         # 'center' (central square, resize) | 'openai' (bicubic short side, crop)
  c.min_scale = 0.9              # random-resized-crop area range [min_scale, max_scale]
  c.max_scale = 1.0
  # Captions: train draws one per example (seeded); eval uses the first, and with
  # eval_all_captions also returns up to eval_max_captions of them for retrieval.
  c.eval_all_captions = False
  c.eval_max_captions = 5
  # Order, parallelism, prefetch.
  c.shuffle_seed = 0
  c.num_epochs = placeholder(int)  # None: repeat forever (the trainer stops by step)
  c.shuffle_buffer = 10_000      # tfds 'as_dataset' reader only
  c.worker_count = 0             # grain worker processes (0: decode in threads of this process)
  c.read_threads = 4             # decode threads per process (grain ReadOptions / tar reader)
  c.prefetch = 2                 # batches put on device ahead of the trainer
  return c


def tokenizer_config(vocab_size=1024, context_length=32):
  """Tokenizer (vlm_jax.data.tokenizer). vocab_size/context_length must match model.text."""
  c = ml_collections.ConfigDict()
  c.kind = "sentencepiece"
  c.model_path = placeholder(str)
  c.vocab_size = vocab_size
  c.context_length = context_length
  return c


def eval_entry(kind, *, dataset=None, split=None, tag=None, templates="auto", label_key=None,
               text_key=None):
  """One evaluation (vlm_jax.evals). Dataset fields left None fall back to `config.data` (the
  eval split of the training dataset); image size and normalisation always come from there."""
  c = ml_collections.ConfigDict()
  c.kind = kind                    # 'zeroshot' | 'retrieval' | 'caption'
  c.tag = placeholder(str) if tag is None else tag   # <dataset> in metric names; default: TFDS name
  c.source = placeholder(str)      # 'tfds' | 'wds' | 'jsonl' (None: data.source)
  c.dataset = placeholder(str) if dataset is None else dataset   # TFDS name, e.g. 'cifar10'
  c.split = placeholder(str) if split is None else split         # e.g. 'test', 'validation[:1000]'
  c.data_dir = placeholder(str)
  c.image_key = placeholder(str)
  c.text_key = placeholder(str) if text_key is None else text_key
  c.label_key = placeholder(str) if label_key is None else label_key
  c.id_key = placeholder(str)
  c.shards = placeholder(str)      # wds: brace/glob pattern of tar shards
  c.jsonl = placeholder(str)       # jsonl: captions.jsonl path
  c.image_root = placeholder(str)
  c.batch_size = placeholder(int)  # None: evals.batch_size (global, all processes)
  if kind == "zeroshot":
    c.templates = templates        # 'auto' (shapes -> its prompts, else clip80) | 'clip80' |
                                   # 'clip7' | 'photo' | 'shapes' | 'a {}.|a photo of a {}.'
    c.classnames = placeholder(str)  # comma-separated; None: built-in list or the ClassLabel names
    c.ks = (1, 5)
  elif kind == "retrieval":
    c.max_captions = 5             # captions per image (data.eval_max_captions)
    c.ks = (1, 5, 10)
  elif kind == "caption":
    c.max_captions = 5             # reference captions per image
    c.max_len = placeholder(int)   # generated tokens incl. eos; None: context_length - 1
    c.beam_size = 1                # 1 = greedy
    c.length_penalty = 0.0         # GNMT alpha for beam search
    c.metrics = "bleu,cider,rouge"   # add ",meteor" for METEOR (needs Java, ~10-30 s per eval)
    c.tokenizer = "auto"           # caption tokenisation for scoring: 'auto' | 'java' | 'python'
    c.loglik = True                # also the references' per-token NLL / perplexity
    c.log_examples = 3
  else:
    raise ValueError(f"evals.<name>.kind: unknown eval kind {kind!r}; expected zeroshot, "
                     "retrieval or caption")
  return c


def evals_config(run="zeroshot,retrieval,caption", batch_size=64):
  """Evaluations run by the trainer (at eval_every_steps and at the end) and by
  `python -m vlm_jax.evaluate`. `run` names the entries below to run (comma-separated)."""
  c = ml_collections.ConfigDict()
  c.run = run
  c.batch_size = batch_size        # global eval batch, padded to the data-parallel device count
  c.zeroshot = eval_entry("zeroshot")
  c.retrieval = eval_entry("retrieval")
  c.caption = eval_entry("caption")
  # Off by default (datasets that must be prepared locally); enable with e.g.
  # --config.evals.run=zeroshot,zeroshot_cifar10. These have no captions: text_key points at a
  # string feature only so that the pipeline finds text; zero-shot ignores it.
  c.zeroshot_cifar10 = eval_entry("zeroshot", dataset="cifar10", split="test", tag="cifar10",
                                  templates="clip80", label_key="label", text_key="id")
  c.zeroshot_imagenet = eval_entry("zeroshot", dataset="imagenet2012", split="validation",
                                   tag="imagenet", templates="clip80", label_key="label",
                                   text_key="file_name")
  c.zeroshot_imagenet.id_key = "file_name"
  return c


eval_config = evals_config   # the name the experiment configs look up
