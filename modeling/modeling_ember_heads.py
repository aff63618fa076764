"""Task heads on the Ember trunk: masked LM, sequence classification, token classification.

`EmberForMaskedLM` pretrains an encoder (`is_causal=False`) BERT-style; the classification heads take
either an encoder or a decoder trunk. They are transformers' generic ones
(`GenericForSequenceClassification` pools the last non-padding token, `GenericForTokenClassification`
scores every token), built on `EmberModel` directly so that they also load as remote code, where
`AutoModel` does not know Ember. The sequence head also pools by the mean over the text
(`config.classifier_pooling`, the default for encoders): a masked-LM encoder's last token carries
mostly its own neighbourhood, not a summary of the text. All heads keep the trunk under `model.`, so a checkpoint of one
head (or of `EmberForCausalLM`) initialises another.

This file is shipped next to saved checkpoints as remote code: it imports only from torch,
transformers and its siblings `modeling_ember.py` and `configuration_ember.py`.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_ember import EmberConfig
from .modeling_ember import EmberModel, EmberPreTrainedModel, build_norm, router_aux_loss


class EmberPredictionHead(nn.Module):
    """`mlm_head_transform`: dense, activation and norm on each state before the output projection (BERT,
    ModernBERT)."""

    def __init__(self, config: EmberConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]
        self.norm = build_norm(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


class EmberForMaskedLM(EmberPreTrainedModel):
    """An encoder with a language-model head scoring every position; the loss counts only labelled ones."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EmberConfig):
        super().__init__(config)
        if config.is_causal:
            raise ValueError("is_causal: EmberForMaskedLM needs a bidirectional encoder; set is_causal=False")
        self.model = EmberModel(config)
        self.vocab_size = config.vocab_size
        self.head = EmberPredictionHead(config) if config.mlm_head_transform else nn.Identity()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        labels: the original token id at each masked position, -100 elsewhere (not shifted). With
            `num_items_in_batch` in the kwargs the loss is a sum over that many labels (exact under
            gradient accumulation); MoE encoders add the load-balancing loss in training.
        """
        add_aux_loss = self.config.is_moe and labels is not None and self.training
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_router_logits=add_aux_loss,
            **kwargs,
        )
        logits = self.lm_head(self.head(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if add_aux_loss:
                aux_loss = router_aux_loss(self.config, outputs.router_logits, attention_mask)
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class EmberForSequenceClassification(GenericForSequenceClassification, EmberPreTrainedModel):
    """One label per text, from the last non-padding token or the mean over the non-padding tokens
    (`config.classifier_pooling`; `attention_mask`, else `config.pad_token_id`, marks padding)."""

    def __init__(self, config: EmberConfig):
        EmberPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = EmberModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        if self.config.classifier_pooling == "last":
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, **kwargs)
        hidden_states = outputs.last_hidden_state
        if attention_mask is not None:
            keep = attention_mask.to(hidden_states.dtype)
        elif input_ids is not None and self.config.pad_token_id is not None:
            keep = (input_ids != self.config.pad_token_id).to(hidden_states.dtype)
        else:
            keep = hidden_states.new_ones(hidden_states.shape[:2])
        pooled = (hidden_states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                                attentions=outputs.attentions)


class EmberForTokenClassification(GenericForTokenClassification, EmberPreTrainedModel):
    """One label per token (dropout `hidden_dropout` before the scoring layer)."""

    def __init__(self, config: EmberConfig):
        EmberPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = EmberModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


__all__ = ["EmberForMaskedLM", "EmberForSequenceClassification", "EmberForTokenClassification"]
