"""Ember's model: `EmberConfig`, `EmberModel`, `EmberForCausalLM` and the task heads
`EmberForMaskedLM`, `EmberForSequenceClassification`, `EmberForTokenClassification`.

Importing this package registers the classes with transformers' Auto classes, and marks them so
`save_pretrained` writes the code files and an `auto_map` next to the weights: a checkpoint then
loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or the Auto class
of its head) anywhere, even where Ember is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_ember import PRESETS, EmberConfig
from .modeling_ember import EmberForCausalLM, EmberModel, EmberPreTrainedModel
from .modeling_ember_heads import EmberForMaskedLM, EmberForSequenceClassification, EmberForTokenClassification

IGNORE_INDEX = -100  # the label of a position no loss scores (what torch's cross-entropy and transformers skip)

AUTO_CLASSES = {
    AutoModel: EmberModel,
    AutoModelForCausalLM: EmberForCausalLM,
    AutoModelForMaskedLM: EmberForMaskedLM,
    AutoModelForSequenceClassification: EmberForSequenceClassification,
    AutoModelForTokenClassification: EmberForTokenClassification,
}

AutoConfig.register(EmberConfig.model_type, EmberConfig, exist_ok=True)
EmberConfig.register_for_auto_class()
for auto_class, model_class in AUTO_CLASSES.items():
    auto_class.register(EmberConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "EmberConfig",
    "EmberForCausalLM",
    "EmberForMaskedLM",
    "EmberForSequenceClassification",
    "EmberForTokenClassification",
    "EmberModel",
    "EmberPreTrainedModel",
]
