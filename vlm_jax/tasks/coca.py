"""CoCa: the contrastive task plus a captioning decoder, trained on both losses from one forward pass.

Batch fields: `image`, `text`. Model: `CoCa` (TwoTower + a decoder cross-attending to the image
tower's tokens; the decoder shares the text tower's tokenizer, so its vocabulary and length
default to `model.text`'s). Loss: `contrastive_weight * contrastive + caption_weight * caption`
(the paper's 1 and 2); `loss.contrastive='none'` keeps the caption term only. The contrastive
term is global and the caption term local, so accumulation is exact GradCache for both.

Predict functions: those of the contrastive and the captioning tasks.
"""
from __future__ import annotations

from vlm_jax import models
from vlm_jax.tasks import base
from vlm_jax.tasks import captioning
from vlm_jax.tasks import contrastive


class CocaTask(contrastive.ContrastiveTask):
  name = "coca"
  description = "CoCa: contrastive image and text towers plus a captioning decoder"
  default_evals = "zeroshot,retrieval,caption"
  towers = {"image": ("image", "vit"), "text": ("text", "transformer"),
            "decoder": ("decoder", "cross_attention")}
  allows_no_contrastive = True

  def loss_config(self):
    c = super().loss_config()
    c.update(captioning.caption_loss_config(2.0))
    return c

  def decoder_text(self, config) -> base.TextSpec:
    """The decoder's vocabulary and caption length: its own fields, else the text tower's."""
    d, t = config.model.decoder, config.model.text
    return base.TextSpec(vocab_size=int(d.vocab_size or t.vocab_size),
                         context_length=int(d.context_length or t.context_length))

  def validate(self, config):
    problems = super().validate(config)
    if config.loss.contrastive == "none" and not config.loss.caption_weight:
      problems.append("loss: contrastive='none' and caption_weight=0 leave nothing to train")
    spec, text = self.decoder_text(config), self.text_spec(config)
    if spec.context_length > text.context_length or spec.vocab_size > text.vocab_size:
      problems.append(f"model.decoder: vocab_size {spec.vocab_size} / context_length "
                      f"{spec.context_length} exceed the text tower's ({text.vocab_size} / "
                      f"{text.context_length}); both read the same tokens")
    return problems

  def build_model(self, config):
    spec = self.decoder_text(config)
    return models.CoCa(decoder=captioning.build_decoder(config, spec.vocab_size,
                                                        spec.context_length),
                       **self._two_tower_kwargs(config))

  def objective(self, config, model):
    weights, global_terms = self.contrastive_terms(config)
    local_terms = None
    if config.loss.caption_weight:
      weights["caption_loss"] = float(config.loss.caption_weight)
      local_terms = captioning.caption_terms(config.loss)
    return base.Objective(
        forward=self.forward_fn(model), weights=weights, global_keys=self.contrastive_outputs,
        global_terms=global_terms, local_terms=local_terms, logged=("logit_scale", "logit_bias"))

  def predict_fns(self, config, model):
    fns = super().predict_fns(config, model)
    fns.update(captioning.caption_predict_fns(model))
    return fns

  def forward_flops(self, config):
    spec = self.decoder_text(config)
    return super().forward_flops(config) + captioning.decoder_flops(
        config, spec.vocab_size, spec.context_length)


TASK = CocaTask()
