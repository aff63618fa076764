"""Ember's model: `EmberConfig`, `EmberModel`, `EmberForCausalLM`.

Importing this package registers the classes with transformers' Auto classes, and marks them so
`save_pretrained` writes the code files and an `auto_map` next to the weights: a checkpoint then
loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` anywhere, even
where Ember is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ember import PRESETS, EmberConfig
from .modeling_ember import EmberForCausalLM, EmberModel, EmberPreTrainedModel

AutoConfig.register(EmberConfig.model_type, EmberConfig, exist_ok=True)
AutoModel.register(EmberConfig, EmberModel, exist_ok=True)
AutoModelForCausalLM.register(EmberConfig, EmberForCausalLM, exist_ok=True)

EmberConfig.register_for_auto_class()
EmberModel.register_for_auto_class("AutoModel")
EmberForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PRESETS", "EmberConfig", "EmberForCausalLM", "EmberModel", "EmberPreTrainedModel"]
