"""Configuration of the Ember transformer: a causal decoder or a bidirectional encoder.

`EmberConfig` is the single source of truth for an Ember model: every architectural switch the
LLaMA / GPT-2 / PaLM / T5 / BERT families differ on lives here, and the modeling code reads nothing else.
Named presets (`EmberConfig.from_preset`) give the standard shapes.

This file is also shipped next to saved checkpoints as remote code, so it imports only from
`transformers`, `huggingface_hub` and the standard library. It also tells peft, whenever peft is imported,
which modules an Ember model's adapters target by default (`register_with_peft`), as peft knows for LLaMA.
"""

import importlib.abc
import importlib.util
import sys
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import RopeParameters

POSITION_EMBEDDING_TYPES = ("rope", "alibi", "learned", "sinusoidal", "relative")
NORM_TYPES = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich", "deepnorm")
# MLP type -> (gated, default activation). Gated: down(act(gate(x)) * up(x)) (Shazeer 2020); plain: down(act(up(x))).
MLP_TYPES: dict[str, tuple[bool, str]] = {
    "swiglu": (True, "silu"),
    "geglu": (True, "gelu_pytorch_tanh"),
    "reglu": (True, "relu"),
    "gelu": (False, "gelu_pytorch_tanh"),
    "relu": (False, "relu"),
    "swish": (False, "silu"),
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Backends that accept an additive float bias as their attention mask (ALiBi and the relative bias need one).
BIAS_CAPABLE_ATTENTION = ("eager", "sdpa")
BIASED_POSITIONS = ("alibi", "relative")
CLASSIFIER_POOLINGS = ("last", "mean")

# Shapes follow the published models they are named after: "1b" is TinyLlama-1.1B, "7b" is
# LLaMA-2-7B, "gpt2-124m" is GPT-2 small (LayerNorm, learned positions, GELU, MHA, biases).
PRESETS: dict[str, dict[str, Any]] = {
    # The quickstart's: in its nine-minute CPU budget, steps count for more than width; this shape takes over
    # twice nano's steps in less time and ends lower (benchmarks/results/quickstart_levers.md).
    "micro": dict(
        vocab_size=4096, hidden_size=96, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "nano": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "125m": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
    ),
    "350m": dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
    ),
    "1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        norm_eps=1e-5,
    ),
    "7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        norm_eps=1e-5,
    ),
    "gpt2-124m": dict(
        vocab_size=50257, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
        position_embedding_type="learned", norm_type="layernorm", norm_eps=1e-5, mlp_type="gelu",
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        bos_token_id=50256, eos_token_id=50256,
    ),
}


@strict
class EmberConfig(PreTrainedConfig):
    r"""
    Configuration of an Ember model. Defaults are LLaMA-2-7B's architecture choices (a causal decoder).

    Args:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the MLP (of each expert, for MoE).
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Key/value heads: equal to `num_attention_heads` for MHA, 1 for MQA,
            anything dividing it for GQA. Defaults to `num_attention_heads`.
        head_dim: Per-head width. Defaults to `hidden_size // num_attention_heads`.
        max_position_embeddings: Longest sequence the model is meant for (size of the learned
            position table; reference length for RoPE scaling).
        rope_parameters: RoPE settings, `{"rope_type": ..., "rope_theta": ..., ...}` with
            `rope_type` one of default / linear / dynamic / yarn / llama3 (transformers' RoPE
            functions compute the frequencies). Only used with `position_embedding_type="rope"`.
        position_embedding_type: "rope" | "alibi" | "learned" | "sinusoidal" | "relative" (T5's
            bucketed bias per head, one table shared by all layers).
        relative_attention_num_buckets / relative_attention_max_distance: T5's relative-position
            buckets (half exact, half logarithmic up to the max distance; an encoder splits them
            between the two directions). Only used with `position_embedding_type="relative"`.
        is_causal: True for a decoder (each token sees itself and earlier tokens); False for a
            bidirectional encoder (every token sees every token of its document), as BERT.
        norm_type: "rmsnorm" | "layernorm" (LayerNorm carries a bias, as in GPT-2).
        norm_eps: Epsilon of every normalisation layer.
        norm_placement: "pre" (x + f(norm(x)), GPT-2/LLaMA) | "post" (norm(x + f(x)), the original
            Transformer and BERT) | "sandwich" (x + norm(f(norm(x))), CogView / Gemma 2) | "deepnorm"
            (norm(alpha * x + f(x)) with the value/output/MLP weights initialised scaled by beta,
            Wang et al. 2022, for deep stacks). Post placements have no final norm.
        qk_norm: RMSNorm over each head's queries and keys before the attention scores (OLMo 2, Qwen3).
        embedding_norm: A norm over the token embeddings before the first block, which then has no input
            norm of its own (ModernBERT; with pre or sandwich placement).
        mlm_head_transform: The masked-LM head transforms each state (dense, activation, norm) before the
            output projection, as BERT and ModernBERT do; an encoder setting.
        mlp_type: "swiglu" | "geglu" | "reglu" (gated: down(act(gate(x)) * up(x))) or "gelu" | "relu" |
            "swish" (plain: down(act(up(x)))).
        hidden_act: Activation of the MLP. Defaults to the one `mlp_type` names ("silu" for swiglu and
            swish, "relu" for reglu and relu, "gelu_pytorch_tanh" (GPT-2's tanh approximation) for
            geglu and gelu).
        sliding_window: If set, each token attends to at most this many previous tokens (in an
            encoder: to tokens at most this far away on either side).
        attention_bias / mlp_bias: Biases on the attention / MLP projections.
        attention_dropout: Dropout on attention probabilities (training only).
        hidden_dropout: Dropout on the embeddings and on each residual branch (training only).
        tie_word_embeddings: Share the input embedding matrix with the output head.
        use_cache: Return a KV cache from forward passes. Defaults to True for decoders; an encoder has
            no cache.
        classifier_pooling: How `EmberForSequenceClassification` turns token states into one vector:
            "last" (the last non-padding token, which in a decoder has read the whole text) or "mean"
            (the average over non-padding tokens, the usual choice for an encoder, whose masked-LM
            training gives no token a summary role). Defaults to "last" for decoders, "mean" for encoders.
        initializer_range: Standard deviation of the normal initialisation of weight matrices.
        num_local_experts: Number of MoE experts per layer; 0 means a dense MLP.
        num_experts_per_tok: Experts each token is routed to (top-k).
        router_aux_loss_coef: Weight of the load-balancing loss added to the LM loss in training.
        output_router_logits: Return router logits (and the aux loss) from every forward.
    """

    model_type = "ember"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    base_model_tp_plan: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan: ClassVar[dict[str, tuple[list[str], list[str]]]] = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_parameters: RopeParameters | dict | None = None
    position_embedding_type: str = "rope"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    is_causal: bool = True
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_placement: str = "pre"
    qk_norm: bool = False
    embedding_norm: bool = False
    mlm_head_transform: bool = False
    mlp_type: str = "swiglu"
    hidden_act: str | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    use_cache: bool | None = None
    classifier_pooling: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act is None and self.mlp_type in MLP_TYPES:
            self.hidden_act = MLP_TYPES[self.mlp_type][1]
        if self.use_cache is None:
            self.use_cache = self.is_causal
        if self.classifier_pooling is None:
            self.classifier_pooling = "last" if self.is_causal else "mean"
        # Check Ember's own rules first: they raise a plain one-line ValueError naming the field.
        self.check_architecture()
        super().__post_init__(**kwargs)

    def check_architecture(self) -> None:
        """Raise a one-line `ValueError` naming the field if the settings cannot build a model."""
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("mlp_type", self.mlp_type, tuple(MLP_TYPES))
        _check_choice("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act: unknown activation {self.hidden_act!r}; see transformers.activations.ACT2FN")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.position_embedding_type == "sinusoidal" and self.hidden_size % 2 != 0:
            raise ValueError(f"hidden_size: sinusoidal positions need an even width, got {self.hidden_size}")
        rope_type = (self.rope_parameters or {}).get("rope_type", (self.rope_parameters or {}).get("type"))
        if rope_type is not None and rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type: expected one of {ROPE_TYPES}, got {rope_type!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window: must be a positive integer or None, got {self.sliding_window}")
        if self.position_embedding_type in BIASED_POSITIONS:
            if self.sliding_window is not None:
                raise ValueError(f"sliding_window: not supported together with "
                                 f"position_embedding_type={self.position_embedding_type!r}")
            check_attention_backend(self)
        if self.position_embedding_type == "relative":
            # Each direction needs at least one exact and one logarithmic bucket, and the log range must be non-empty.
            per_direction = self.relative_attention_num_buckets // (1 if self.is_causal else 2)
            if per_direction < 2:
                raise ValueError(f"relative_attention_num_buckets: too few buckets ({self.relative_attention_num_buckets}) "
                                 f"for {'a decoder' if self.is_causal else 'an encoder (two directions)'}")
            if self.relative_attention_max_distance <= per_direction // 2:
                raise ValueError(f"relative_attention_max_distance: must exceed the {per_direction // 2} exact buckets, "
                                 f"got {self.relative_attention_max_distance}")
        if not self.is_causal and self.use_cache:
            raise ValueError("use_cache: an encoder (is_causal=False) has no KV cache; set use_cache=False")
        if self.mlm_head_transform and self.is_causal:
            raise ValueError("mlm_head_transform: only an encoder's masked-LM head has one (is_causal=False)")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.num_local_experts < 0:
            raise ValueError(f"num_local_experts: must be >= 0, got {self.num_local_experts}")
        if self.num_local_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok: must be in [1, num_local_experts={self.num_local_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.num_local_experts > 0 and not self.is_gated_mlp:
            raise ValueError(f"mlp_type: MoE experts are gated MLPs (swiglu, geglu, reglu), got {self.mlp_type!r}")
        if self.num_local_experts > 0 and self.mlp_bias:
            raise ValueError("mlp_bias: MoE experts have no biases; set mlp_bias=False when num_local_experts > 0")

    def validate_architecture(self) -> None:
        """Part of transformers' `@strict` validation (runs again on save)."""
        self.check_architecture()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EmberConfig":
        """Build a config from a named preset (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def is_gated_mlp(self) -> bool:
        return MLP_TYPES[self.mlp_type][0]

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm's residual scale for an encoder-only or decoder-only stack of N layers: (2N)^(1/4)."""
        return (2 * self.num_hidden_layers) ** 0.25

    @property
    def deepnorm_beta(self) -> float:
        """DeepNorm's initialisation gain of the value, output and MLP weights: (8N)^(-1/4)."""
        return (8 * self.num_hidden_layers) ** -0.25


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}: expected one of {choices}, got {value!r}")


def check_attention_backend(config: EmberConfig) -> None:
    """ALiBi and the relative bias add a per-head bias to the scores; only backends taking a float mask can."""
    backend = getattr(config, "_attn_implementation", None)
    position = config.position_embedding_type
    if position in BIASED_POSITIONS and backend is not None and backend not in BIAS_CAPABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation: position_embedding_type={position!r} needs a backend that takes an additive "
            f"bias {BIAS_CAPABLE_ATTENTION}, got {backend!r}"
        )


# peft picks an adapter's default targets by model type from its own tables, in which "ember" is not. Ember's
# modules carry LLaMA's names, so each table's "llama" entry fits; LoRA's default is every attention and MLP
# projection (Ember's finetuning default too), where peft's LLaMA entry has only q_proj and v_proj.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_TABLES = "peft.utils.constants"


def register_with_peft(tables: Any = None) -> None:
    """Add model type "ember" to peft's default-target tables: now if peft is imported, else when it is."""
    tables = tables or sys.modules.get(_PEFT_TABLES)
    if tables is None:
        if not any(type(finder).__name__ == "_PeftTablesHook" for finder in sys.meta_path):  # remote code: own copy
            sys.meta_path.insert(0, _PeftTablesHook())
        return
    for name, table in vars(tables).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and "llama" in table:
            table.setdefault(EmberConfig.model_type, table["llama"])
    tables.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[EmberConfig.model_type] = list(LORA_TARGET_MODULES)


class _PeftTablesHook(importlib.abc.MetaPathFinder):
    """Import hook that registers Ember in peft's tables right after peft defines them (one use)."""

    def find_spec(self, name, path=None, target=None):
        if name != _PEFT_TABLES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def run_then_register(module):
                run(module)
                register_with_peft(module)

            spec.loader.exec_module = run_then_register
        return spec


register_with_peft()

__all__ = ["EmberConfig", "LORA_TARGET_MODULES", "MLP_TYPES", "NORM_PLACEMENTS", "POSITION_EMBEDDING_TYPES", "PRESETS",
           "register_with_peft"]
