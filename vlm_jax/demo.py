r"""The CPU demo: prepare the embedded shapes data, train a tiny CoCa, evaluate, print the figures.

  python -m vlm_jax.demo --workdir runs/shapes_coca [--config.total_steps=...]
  python -m vlm_jax.demo --config configs/shapes_prefixlm.py     # prefix-LM captioning + VQA
  python -m vlm_jax.demo --config configs/shapes_bert_mlm.py     # BERT masked-LM

The workdir defaults to runs/<config file name>. The figures checked against targets depend on
the task (`TARGETS`).

The dataset is generated once into the vlm_jax cache (`vlm_jax.data.cache`: $VLM_JAX_CACHE,
default ~/.cache/vlm_jax), where `evaluate`, the launch scripts and the notebooks find it too; training resumes if the workdir already holds a checkpoint (a finished run only
re-evaluates). Zero-shot classification, retrieval and captioning are measured on the shapes
test split by the trainer's final evaluation.
"""
import os
import time

from absl import flags
from absl import logging

from vlm_jax import cli
from vlm_jax import config_utils
from vlm_jax import preemption

# The demo's experiment file, in the repository next to the package.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "shapes_coca.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")

# task -> {metric: the least value the demo config reaches on the shapes test split}.
TARGETS = {
    "coca": {"zeroshot/shapes/top1": 0.90, "caption/shapes/cider": 1.0},
    "contrastive": {"zeroshot/shapes/top1": 0.8},
    "prefix_lm": {"vqa/shapes/accuracy": 0.85, "caption/shapes/cider": 1.0},
    "masked_lm": {"masked_lm/shapes/accuracy": 0.6},
    "captioning": {"caption/shapes/cider": 1.0},
    "vqa_classifier": {"vqa/shapes/accuracy": 0.7},
    "image_text_matching": {"matching/shapes/accuracy": 0.8},
    "classification": {"classification/shapes/top1": 0.8},
}


def main(argv):
  del argv
  spec = cli.config_spec() or DEFAULT_CONFIG
  config = config_utils.load_config(spec, cli.config_overrides())
  from vlm_jax.data import cache  # pylint: disable=g-import-not-at-top
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(spec.split(":")[0]))[0])
  t0 = time.time()
  where = cache.tfds_data_dir(config.data.name, config.data.data_dir)
  print(f"[demo] preparing {config.data.name} in {where} ...", flush=True)
  runtime.prepare_data(config)
  t1 = time.time()
  print(f"[demo] data ready ({t1 - t0:.0f}s); training {config.total_steps} steps of "
        f"{config.batch_size} into {workdir}", flush=True)
  try:
    final = train.train_and_evaluate(config, workdir)
  except preemption.Preempted as e:
    print(f"[demo] stopped: {e}; run it again to resume", flush=True)
    return preemption.EXIT_PREEMPTED
  except (ValueError, FileNotFoundError, train.NonFiniteError) as e:
    cli.fail(e)
  t2 = time.time()
  print(f"\n[demo] done: data {t1 - t0:.0f}s, train + eval {t2 - t1:.0f}s, total {t2 - t0:.0f}s")
  print("[demo] results on the shapes test split:")
  ok = True
  for key in sorted(final):
    if key.startswith("eval/") and not key.endswith("num_examples"):
      print(f"  {key[5:]:40s} {final[key]:.4f}")
  for key, target in TARGETS.get(config.task, {}).items():
    value = final.get("eval/" + key)
    met = value is not None and value >= target
    ok &= met
    print(f"  target {key} >= {target}: {'met' if met else 'NOT met'} ({value})")
  if not ok:
    logging.warning("demo targets not met")
  return 0


if __name__ == "__main__":
  cli.run(main)
