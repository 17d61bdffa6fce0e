"""vlm_jax: vision-language model pretraining and evaluation in JAX / Flax."""
import os

# TensorFlow serves data only (TFDS): its oneDNN kernels are never used for the model, and its
# C++ INFO lines at import are noise on every command. Set these variables yourself to override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
