"""The Ember transformer: a causal decoder (LLaMA family) or a bidirectional encoder (BERT family).

A model whose architecture switches (position encoding, norm type and placement, QK-norm, MLP and
activation, attention heads, sliding window, mixture of experts, causal or bidirectional attention)
all come from `EmberConfig`. Module names match transformers' `LlamaForCausalLM`
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `lm_head`), so a LLaMA-compatible
Ember checkpoint converts to stock classes by renaming nothing. The task heads (masked LM, sequence
and token classification) live in `modeling_ember_heads.py`.

Attention goes through transformers' `ALL_ATTENTION_FUNCTIONS` (eager, sdpa, flash_attention_2,
flex_attention), masks come from `transformers.masking_utils` (causal, bidirectional, sliding window,
packed documents, prefix blocks), the KV cache is `DynamicCache`, RoPE
frequencies come from `ROPE_INIT_FUNCTIONS`, and the loss is `self.loss_function`, which honours
`num_items_in_batch` so gradient accumulation is exact.

This file is also shipped next to saved checkpoints as remote code: it imports only from torch,
transformers and its sibling `configuration_ember.py`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_bidirectional_sliding_window_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_ember import BIASED_POSITIONS, EmberConfig, check_attention_backend


class EmberRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 loses too much precision in the mean of squares.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def build_norm(config: EmberConfig, enabled: bool = True) -> nn.Module:
    """The config's normalisation over the hidden width, or an identity where a placement has no norm."""
    if not enabled:
        return nn.Identity()
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return EmberRMSNorm(config.hidden_size, eps=config.norm_eps)


class EmberRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE; scaled variants use transformers' `ROPE_INIT_FUNCTIONS`."""

    def __init__(self, config: EmberConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: EmberConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Unscaled RoPE (Su et al. 2021): inv_freq_i = theta^(-2i/d) for i < d/2."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 even under autocast: positions up to 1e5 need the mantissa.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotate query/key pairs by their position's angle (half-split layout, as in HF LLaMA)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def sinusoidal_position_embeddings(position_ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Fixed encodings of Vaswani et al. (2017), sin half then cos half: PE(p, i) = sin|cos(p / 10000^(2i/d)).

    Computed from `position_ids` on the fly, so packed documents restart at position 0 and no
    buffer needs initialising when weights load on the meta device.
    """
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float) / dim))
    angles = position_ids[..., None].float() * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): the geometric sequence 2^(-8i/n), i = 1..n.

    For a head count that is not a power of two, the paper takes the slopes of the nearest lower
    power of two and fills the rest with every other slope of the next power of two.
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_len: int, kv_len: int, past_seen_tokens: int) -> torch.Tensor:
    """ALiBi's linear distance penalty, -slope * |query - key| per head, shaped (1, heads, q_len, kv_len).

    The distance is symmetric, so an encoder or a bidirectional prefix is penalised in both directions;
    in a decoder the keys after the query are masked anyway.
    """
    q_pos = torch.arange(q_len, device=slopes.device) + past_seen_tokens
    k_pos = torch.arange(kv_len, device=slopes.device)
    distance = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)
    return -slopes[None, :, None, None] * distance


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket (Raffel et al. 2020) of each key-minus-query offset.

    Half of a direction's buckets hold one small distance each; the other half cover distances up to
    `max_distance` on a logarithmic scale, and farther keys share the last bucket. A decoder sees only
    keys at or before the query, so all its buckets describe the past; an encoder gives each direction
    half of them.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    scale = (num_buckets - exact) / math.log(max_distance / exact)
    far = exact + (torch.log(distance.float().clamp(min=1) / exact) * scale).long()
    far = far.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class EmberRelativePositionBias(nn.Module):
    """A learned bias per head and relative-position bucket, one table shared by all layers (as in T5)."""

    def __init__(self, config: EmberConfig):
        super().__init__()
        self.bidirectional = not config.is_causal
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nn.Embedding(self.num_buckets, config.num_attention_heads)

    def forward(self, q_len: int, kv_len: int, past_seen_tokens: int) -> torch.Tensor:
        """The bias for queries at past_seen_tokens + [0, q_len) over keys [0, kv_len): (1, heads, q_len, kv_len)."""
        device = self.embedding.weight.device
        q_pos = torch.arange(q_len, device=device) + past_seen_tokens
        k_pos = torch.arange(kv_len, device=device)
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.num_buckets,
                                           self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0).float()


def add_attention_bias(mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Turn a boolean or additive 4D mask into an additive float mask carrying a per-head position bias."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    biased = mask.to(torch.float32) + bias.to(mask.device)
    return biased.to(mask.dtype if mask.is_floating_point() else torch.float32)


def create_attention_mask(
    config: EmberConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Cache | None,
    position_ids: torch.Tensor | None,
    block_sequence_ids: torch.Tensor | None = None,
    materialize: bool = False,
):
    """The attention mask of `config`'s pattern, in the form the attention backend takes.

    Decoder: causal (or sliding-window causal); with no 2D mask and no cache, documents packed in a row
    are kept apart where `position_ids` restart; tokens sharing a non-negative `block_sequence_ids`
    value see each other both ways (a prefix-LM prefix), -1 stays causal. Encoder: every token sees
    every unpadded token (or those within `sliding_window` on either side), and packed documents are
    kept apart the same way. `materialize` always returns a tensor, for a position bias to be added.
    """
    if config.is_causal:
        mask_function = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
        return mask_function(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             past_key_values=past_key_values, position_ids=position_ids,
                             block_sequence_ids=block_sequence_ids, allow_is_causal_skip=not materialize)
    documents = None
    if position_ids is not None and attention_mask is None:
        documents = find_packed_sequence_indices(position_ids.expand(inputs_embeds.shape[0], -1))
    mask_function = (create_bidirectional_mask if config.sliding_window is None
                     else create_bidirectional_sliding_window_mask)
    return mask_function(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         and_mask_function=packed_sequence_mask_function(documents) if documents is not None else None,
                         allow_is_bidirectional_skip=not materialize)


class EmberMLP(nn.Module):
    """Gated (SwiGLU / GeGLU / ReGLU, Shazeer 2020): down(act(gate(x)) * up(x)); plain (GPT-2): down(act(up(x)))."""

    def __init__(self, config: EmberConfig):
        super().__init__()
        self.is_gated = config.is_gated_mlp
        if self.is_gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        for proj in self.children():  # DeepNorm initialises every MLP map with gain beta (`_init_weights`)
            proj.deepnorm_scaled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


@use_experts_implementation
class EmberExperts(nn.Module):
    """Gated experts (SwiGLU by default) stored as 3D tensors, laid out as transformers' Mixtral stores them."""

    def __init__(self, config: EmberConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        # Loop over the experts that received tokens; each runs one dense matmul on its tokens.
        for expert_idx in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert_idx)
            gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            expert_out = expert_out * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output


class EmberTopKRouter(nn.Module):
    def __init__(self, config: EmberConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        probs = router_logits.float().softmax(dim=-1)
        top_weights, top_index = probs.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_weights, top_index  # weights stay float32, as Mixtral's do


class EmberSparseMoeBlock(nn.Module):
    """Top-k routed mixture of gated experts (Shazeer et al. 2017; Mixtral's top-2 layout)."""

    def __init__(self, config: EmberConfig):
        super().__init__()
        self.gate = EmberTopKRouter(config)
        self.experts = EmberExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        return self.experts(flat, top_k_index, top_k_weights).reshape(shape)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim) for GQA/MQA."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


class EmberAttention(nn.Module):
    def __init__(self, config: EmberConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = config.is_causal  # read by the sdpa / flash backends when they get no mask
        self.use_rope = config.position_embedding_type == "rope"
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_bias)
        # DeepNorm initialises the value and output maps (not queries and keys) with gain beta (`_init_weights`).
        self.v_proj.deepnorm_scaled = self.o_proj.deepnorm_scaled = True
        # QK-norm (OLMo 2, Qwen3): RMSNorm over each head's query and key vectors bounds the attention logits.
        self.q_norm = EmberRMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = EmberRMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.use_rope:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.config.sliding_window,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights


class EmberDecoderLayer(GradientCheckpointingLayer):
    """One transformer block (of a decoder or an encoder); `config.norm_placement` puts the norms:

        pre       h = x + attn(norm_1(x))                   out = h + mlp(norm_2(h))
        sandwich  h = x + norm_1'(attn(norm_1(x)))          out = h + norm_2'(mlp(norm_2(h)))
        post      h = norm_2(x + attn(x))                   out = norm_3(h + mlp(h))
        deepnorm  h = norm_2(alpha * x + attn(x))           out = norm_3(alpha * h + mlp(h))

    norm_1 is `input_layernorm`, norm_2 `post_attention_layernorm` (between attention and MLP in every
    placement), norm_1' / norm_2' `attention_output_layernorm` / `mlp_output_layernorm`, norm_3
    `post_mlp_layernorm`; placements that lack one hold an identity in its place.
    """

    def __init__(self, config: EmberConfig, layer_idx: int):
        super().__init__()
        placement = config.norm_placement
        self.self_attn = EmberAttention(config, layer_idx)
        self.mlp = EmberSparseMoeBlock(config) if config.is_moe else EmberMLP(config)
        self.post_norm = placement in ("post", "deepnorm")
        self.residual_scale = config.deepnorm_alpha if placement == "deepnorm" else 1.0
        # With embedding_norm the first block reads normalised embeddings: it has no input norm (ModernBERT).
        self.input_layernorm = build_norm(config, enabled=not self.post_norm
                                          and not (config.embedding_norm and layer_idx == 0))
        self.attention_output_layernorm = build_norm(config, enabled=placement == "sandwich")
        self.post_attention_layernorm = build_norm(config)
        self.mlp_output_layernorm = build_norm(config, enabled=placement == "sandwich")
        self.post_mlp_layernorm = build_norm(config, enabled=self.post_norm)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.post_norm:
            alpha = self.residual_scale
            hidden_states = self.post_attention_layernorm(alpha * hidden_states + self.dropout(attn_output))
            mlp_output = self.mlp(hidden_states)
            return self.post_mlp_layernorm(alpha * hidden_states + self.dropout(mlp_output))
        hidden_states = hidden_states + self.dropout(self.attention_output_layernorm(attn_output))
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.dropout(self.mlp_output_layernorm(mlp_output))


class EmberPreTrainedModel(PreTrainedModel):
    config: EmberConfig
    config_class = EmberConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EmberDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # MoE routing is data dependent; dense models compile fine regardless
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(EmberTopKRouter, index=0),
        "hidden_states": EmberDecoderLayer,
        "attentions": EmberAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, EmberTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        deepnorm = self.config.norm_placement == "deepnorm"
        gain = self.config.deepnorm_beta if deepnorm else 1.0
        if deepnorm and isinstance(module, nn.Linear) and getattr(module, "deepnorm_scaled", False):
            init.normal_(module.weight, mean=0.0, std=std * gain)
        elif isinstance(module, EmberExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std * gain)
            init.normal_(module.down_proj, mean=0.0, std=std * gain)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers records only the saved class's Auto entry; one checkpoint serves the bare model and
        # every head its attention pattern allows, so list them whenever the code files travel with it.
        # Heads live in modeling_ember_heads.py, which is copied only when a head class is saved.
        if self._auto_class is not None:
            auto_map = {"AutoConfig": "configuration_ember.EmberConfig", "AutoModel": "modeling_ember.EmberModel"}
            if self.config.is_causal:
                auto_map["AutoModelForCausalLM"] = "modeling_ember.EmberForCausalLM"
            module = type(self).__module__.rsplit(".", 1)[-1]
            if module != "modeling_ember":
                for auto_class, name in HEAD_AUTO_CLASSES.items():
                    if auto_class != "AutoModelForMaskedLM" or not self.config.is_causal:
                        auto_map[auto_class] = f"{module}.{name}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


# The Auto classes of the task heads in modeling_ember_heads.py.
HEAD_AUTO_CLASSES = {
    "AutoModelForMaskedLM": "EmberForMaskedLM",
    "AutoModelForSequenceClassification": "EmberForSequenceClassification",
    "AutoModelForTokenClassification": "EmberForTokenClassification",
}


class EmberModel(EmberPreTrainedModel):
    """The embeddings and the stack of blocks, without a head: a decoder or, with `is_causal=False`, an encoder."""

    def __init__(self, config: EmberConfig):
        super().__init__(config)
        config.check_architecture()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_norm = build_norm(config, enabled=config.embedding_norm)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([EmberDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        # Post placements end every block with a norm, so the stack needs no final one.
        self.norm = build_norm(config, enabled=config.norm_placement in ("pre", "sandwich"))
        if config.position_embedding_type == "rope":
            self.rotary_emb = EmberRotaryEmbedding(config)
        if config.position_embedding_type == "relative":
            self.relative_position_bias = EmberRelativePositionBias(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        block_sequence_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        block_sequence_ids: (batch, seq_len), decoders only. Tokens sharing a value >= 0 attend to each
            other in both directions (the prefix of a prefix LM; give each packed document its own
            value); -1 marks causal tokens. Only for a forward without a filled cache.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if not self.config.is_causal and (use_cache or past_key_values is not None):
            raise ValueError("use_cache: an encoder (is_causal=False) has no KV cache")
        if block_sequence_ids is not None and not self.config.is_causal:
            raise ValueError("block_sequence_ids: an encoder is bidirectional everywhere; only decoders take blocks")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        if block_sequence_ids is not None and past_seen_tokens > 0:
            raise ValueError("block_sequence_ids: only for a forward without cached tokens (the prompt)")
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        position_type = self.config.position_embedding_type
        if position_type == "learned":
            if past_seen_tokens + inputs_embeds.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"max_position_embeddings: sequence of {past_seen_tokens + inputs_embeds.shape[1]} tokens exceeds "
                    f"the learned position table ({self.config.max_position_embeddings})"
                )
            inputs_embeds = inputs_embeds + self.embed_positions(position_ids)
        elif position_type == "sinusoidal":
            inputs_embeds = inputs_embeds + sinusoidal_position_embeddings(
                position_ids, self.config.hidden_size, inputs_embeds.dtype
            )

        mask_args = (self.config, inputs_embeds, attention_mask, past_key_values, position_ids, block_sequence_ids)
        if position_type in BIASED_POSITIONS:
            # One bias for all layers, added to the mask: ALiBi's fixed slopes or the shared relative table.
            check_attention_backend(self.config)
            mask = create_attention_mask(*mask_args, materialize=True)
            q_len, kv_len = mask.shape[-2:]
            if position_type == "alibi":
                slopes = alibi_slopes(self.config.num_attention_heads).to(inputs_embeds.device)
                bias = alibi_bias(slopes, q_len, kv_len, past_seen_tokens)
            else:
                bias = self.relative_position_bias(q_len, kv_len, past_seen_tokens)
            mask = add_attention_bias(mask, bias)
        else:
            mask = create_attention_mask(*mask_args)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if position_type == "rope" else None
        hidden_states = self.embed_dropout(self.embed_norm(inputs_embeds))
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


def router_aux_loss(config: EmberConfig, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mixtral's load-balancing loss over every layer's router logits (padding excluded with a 2D mask)."""
    return load_balancing_loss_func(
        router_logits,
        config.num_local_experts,
        config.num_experts_per_tok,
        attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None,
    )


class EmberForCausalLM(EmberPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: EmberConfig):
        super().__init__(config)
        if not config.is_causal:
            raise ValueError("is_causal: EmberForCausalLM needs a decoder (is_causal=True); "
                             "an encoder takes EmberForMaskedLM")
        self.model = EmberModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        block_sequence_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels: token ids to predict, unshifted (the loss shifts them); -100 marks ignored positions.
            Alternatively `shift_labels` (already shifted, e.g. from packed blocks) in the kwargs.
        output_router_logits: return router logits and the load-balancing loss (MoE). In training
            with labels the aux loss is always computed and `router_aux_loss_coef` times it is added
            to `loss`; in eval `loss` stays the pure LM loss.
        logits_to_keep: if an int n > 0, only the last n positions get logits (generation); a
            tensor selects positions explicitly.
        block_sequence_ids: bidirectional blocks of a prefix LM, see `EmberModel.forward`.
        """
        add_aux_loss = self.config.is_moe and labels is not None and self.training
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        output_router_logits = self.config.is_moe and (output_router_logits or add_aux_loss)

        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            block_sequence_ids=block_sequence_ids,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits:
            aux_loss = router_aux_loss(self.config, outputs.router_logits, attention_mask)
            if add_aux_loss:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


__all__ = ["EmberForCausalLM", "EmberModel", "EmberPreTrainedModel"]
