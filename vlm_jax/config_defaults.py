"""The library's defaults for every config section that is not a task's own.

An experiment config (`configs/<experiment>.py`) is plain data: it names a task and sets what
differs from these defaults. `vlm_jax.config_utils.complete` puts the two together:

    task       the objective (`vlm_jax.tasks`); it supplies `model` and `loss`
    model      towers by name (`model.image.name = 'vit'`) with their defaults, plus the
               task's own fields (see the task module)
    loss       the task's loss fields
    data       input pipeline (`data_config` below)
    tokenizer  text tokenizer (`tokenizer_config`)
    mesh, sharding_rules   device mesh and logical axis rules (`vlm_jax.sharding`)
    evals      evaluations (`vlm_jax.evals`); `evals.run='auto'`: the task's evals the data supports
    ...        trainer fields at the top level (`train_config`): seed, total_steps, batch_size,
               optim, schedule, checkpoints, logging

Fields with no sensible default are `placeholder(type)`: they exist (so overrides are type-checked)
but hold None until set.
"""
import ml_collections

placeholder = ml_collections.config_dict.placeholder


def train_config() -> ml_collections.ConfigDict:
  """Trainer fields (optimizer, schedule, accumulation, checkpoints, logging, evals).

  These live at the TOP level of a config, so the command line reads `--config.total_steps=…`,
  `--config.optim.lr=…`, `--config.init_from=…`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256               # GLOBAL batch per optimizer step (all processes, micro-batches)
  c.grad_accum_steps = 1           # k micro-batches of batch_size/k per step, same update

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3                # peak learning rate
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.1       # decoupled (AdamW); applied to params with ndim >= 2 only
  c.optim.no_decay = ""            # regex over param paths also excluded from decay
  c.optim.grad_clip_norm = 1.0     # global-norm clipping; 0 / None = off
  c.optim.clip_with_step_norm = True  # clip with the norm the step computes anyway (False: the
                                      # clip computes it again, optax's own; the reference)
  c.freeze = ""                    # regex over param paths kept frozen (LiT: '^image/')
  c.ema_decay = placeholder(float)  # e.g. 0.9999: keep an EMA of the params (None = no EMA)
  c.ema_warmup = True              # decay min(ema_decay, (1+n)/(10+n)) after n updates

  c.schedule = ml_collections.ConfigDict()
  c.schedule.kind = "cosine"       # 'cosine' | 'rsqrt' | 'constant' (all after linear warmup)
  c.schedule.warmup_steps = 100    # longer than total_steps: clamped to a tenth of the run
  c.schedule.warmup_fraction = placeholder(float)  # of total_steps; wins over warmup_steps
  c.schedule.end_lr_factor = 0.0   # cosine: final lr = lr * end_lr_factor
  c.schedule.timescale = placeholder(int)   # rsqrt: lr * sqrt(timescale / step); default warmup
  c.schedule.cooldown_steps = 0    # rsqrt: linear decay to 0 over the last steps

  c.max_consecutive_nonfinite = 10  # this many skipped (NaN/Inf) steps in a row stop the run
  c.nonfinite_guard = "cond"       # skip a NaN/Inf step: 'cond' (update in lax.cond) | 'select'
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.init_from = placeholder(str)   # checkpoint dir (workdir or step dir) to load params from, or
                                   # subtree=dir entries, comma-separated: image=runs/clip,lm=runs/gpt2
  c.init_from_skip = ""            # regex of params NOT to take from init_from (e.g. a new head)
  c.progress_bar = True
  c.eval_every_steps = 0           # 0 = evals only at the end
  return c


def data_config() -> ml_collections.ConfigDict:
  """Input pipeline (vlm_jax.data.pipeline). The global batch size is a trainer field; the
  pipeline gets the per-process share."""
  c = ml_collections.ConfigDict()
  c.source = "tfds"              # 'tfds' | 'wds' (tar shards) | 'jsonl' | 'imagefolder' | 'vqav2'
                                 # | 'text' (a text corpus, no images: text-only tasks)
  # TFDS: dataset name (with config/version), data_dir, splits, reader.
  c.name = "shapes/tiny"         # e.g. 'shapes/demo', 'coco_captions', 'cifar10'
  c.data_dir = placeholder(str)  # None: shapes in the vlm_jax cache ($VLM_JAX_CACHE), others in TFDS's default
  c.train_split = "train"
  c.eval_split = "validation"
  c.tfds_reader = "auto"         # 'auto' | 'data_source' (array_record) | 'as_dataset' (tfrecord)
  c.tfds_skip_decode = True      # images stay encoded; the pipeline decodes (and counts bad ones)
  # Field mapping ('/'-separated feature paths), for TFDS records.
  c.image_key = "image"
  c.text_key = "captions"        # coco_captions: 'captions/text'; '' = no text
  c.label_key = "label"          # '' = no label
  c.id_key = "id"                # record id for logs; coco_captions: 'image/filename'; '' = index
  c.questions_key = ""           # VQA questions + answers (shapes: 'questions'); '' = none
  # Retrieval-augmented captioning (prefix_lm): `python -m vlm_jax.index neighbours` output for
  # the training images; each caption's prompt is its image's first neighbours_k captions.
  c.neighbours = placeholder(str)
  c.neighbours_k = 3
  c.neighbours_same_phrasing = False   # prompt with each neighbour's caption at the target's
                                       # index (parallel phrasings, as shapes' four templates)
  # Training on a weighted mixture of sources (vlm_jax.data.sources.mixture): entries of
  # data-field overrides plus a weight, e.g. (dict(weight=0.7, source='tfds', name='cc12m'),
  # dict(weight=0.3, source='jsonl', train_jsonl='coco.jsonl')); all random-access sources or
  # all sequential ones (tar shards).
  c.mixture = ()
  # WebDataset-style tar shards: brace and/or glob patterns, e.g. 'shards/{00000..00099}.tar'.
  c.train_shards = placeholder(str)
  c.eval_shards = placeholder(str)
  c.shard_group = 4              # shards whose samples are shuffled together
  # captions.jsonl ({"image": path, "caption": str | [str], "label": int?}); image paths
  # relative to image_root (default: the jsonl's folder).
  c.train_jsonl = placeholder(str)
  c.eval_jsonl = placeholder(str)
  c.image_root = placeholder(str)
  # VQAv2 files: questions JSON, annotations JSON (optional for a test split), COCO-named images.
  c.train_vqa_questions = placeholder(str)
  c.train_vqa_annotations = placeholder(str)
  c.train_vqa_images = placeholder(str)
  c.eval_vqa_questions = placeholder(str)
  c.eval_vqa_annotations = placeholder(str)
  c.eval_vqa_images = placeholder(str)
  # A plain text corpus (UTF-8, one document a line), for tasks that read no images.
  c.train_text = placeholder(str)
  c.eval_text = placeholder(str)
  # ImageFolder: root/<class_name>/<images>, classes in sorted folder order.
  c.train_folder = placeholder(str)
  c.eval_folder = placeholder(str)
  # Class names, comma-separated, in label order; None: from the source (TFDS ClassLabel,
  # ImageFolder folders) or the built-in lists. A classifier's run records them here.
  c.classnames = placeholder(str)
  # Images.
  c.image_size = 32
  c.mean = (0.5, 0.5, 0.5)       # OpenAI CLIP: (0.48145466, 0.4578275, 0.40821073)
  c.std = (0.5, 0.5, 0.5)        # OpenAI CLIP: (0.26862954, 0.26130258, 0.27577711)
  c.train_crop = "random_resized"  # 'random_resized' | 'resize' (eval: resize + centre crop)
  c.eval_crop = "center"         # 'center' (central square, resize) | 'openai' (bicubic short
                                 # side, crop) | 'resize' (the whole image, as SigLIP)
  c.min_scale = 0.9              # random-resized-crop area range [min_scale, max_scale]
  c.max_scale = 1.0
  # Order, parallelism, prefetch.
  c.shuffle_seed = 0
  c.num_epochs = placeholder(int)  # None: repeat forever (the trainer stops by step)
  c.shuffle_buffer = 10_000      # tfds 'as_dataset' reader only
  c.worker_count = 0             # grain worker processes (0: decode in threads of this process)
  c.read_threads = 4             # decode threads per process (grain ReadOptions / tar reader)
  c.prefetch = 2                 # batches put on device ahead of the trainer
  return c


def tokenizer_config() -> ml_collections.ConfigDict:
  """Tokenizer (vlm_jax.data.tokenizers). context_length must match the model's text."""
  c = ml_collections.ConfigDict()
  c.kind = "sentencepiece"       # 'sentencepiece' | 'bpe' (OpenAI CLIP's merges file) | 'hf' (tokenizer.json, vocab.json + merges.txt, vocab.txt)
  c.model_path = placeholder(str)  # None: a SentencePiece model trained on the training captions
  c.vocab_size = 1024            # size of a tokenizer trained here
  c.context_length = 32
  c.pad = "pad"                  # 'pad' (the pad id) | 'eos' (pad with eos, as SigLIP)
  c.canonicalize = False         # lower-case, drop punctuation first (SigLIP)
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (axes data, fsdp, tensor); one size may be -1 = all remaining devices.

  data=-1 is pure data parallelism; fsdp=N also shards params and optimizer state N ways;
  tensor=N splits heads / MLP / vocabulary N ways. The product must equal the device count.
  """
  c = ml_collections.ConfigDict()
  c.data = -1
  c.fsdp = 1
  c.tensor = 1
  return c


def base_config(task, tower_names=None) -> ml_collections.ConfigDict:
  """Every section's defaults for `task` (a `vlm_jax.tasks.Task`); `tower_names` (model section
  -> tower name) picks towers other than the task's defaults."""
  from vlm_jax import evals  # pylint: disable=g-import-not-at-top
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.task = task.name
  c.model = task.model_config(tower_names)
  c.loss = task.loss_config()
  c.data = data_config()
  c.tokenizer = tokenizer_config()
  c.mesh = mesh_config()
  c.sharding_rules = [tuple(rule) for rule in sharding.DEFAULT_RULES]
  c.update(train_config())
  c.evals = evals.evals_config()
  return c
