"""Optimizer parameter groups and learning-rate schedules for pretraining with the HF Trainer.

- `decay_parameter_names`: which parameters get weight decay (weight matrices only); `PretrainingTrainer`
  hands it to the Trainer's own AdamW, so the split holds under DDP, FSDP and DeepSpeed alike.
- `lr_scheduler_kwargs`: Ember's schedule names ("cosine", "wsd") as `TrainingArguments` scheduler settings.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that get weight decay: the weight matrices of linear maps.

    A parameter decays when it has two or more dimensions and does not belong to an `nn.Embedding`. That
    covers the attention and MLP projections, an untied `lm_head`, the MoE router and the MoE experts'
    stacked (3-D) matrices. Left out: every 1-D parameter (norm weights, norm and projection biases), token
    embeddings and learned position embeddings. Embeddings are exempt as in OLMo 2: AdamW's decoupled decay
    shrinks every row at every step, while a token's row gets gradient only in batches where the token
    occurs, so rare tokens' rows would drift towards zero.

    Tied weights: `named_parameters()` yields a shared tensor once, and an `lm_head` tied to the token
    embedding *is* the embedding's parameter, so it is exempt as an embedding. Both readings are defensible
    (the matrix is also the output projection); we follow the input role, since the embedding is the
    parameter the tie points to and its rows for rare tokens are the ones decay would erode.

    Under FSDP the Trainer refuses a ready-made optimizer; a Trainer subclass can return this list from
    `get_decay_parameter_names` to get the same split from the Trainer's own AdamW.
    """
    embedding_ids = {id(p) for module in model.modules() if isinstance(module, nn.Embedding)
                     for p in module.parameters(recurse=False)}
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and id(p) not in embedding_ids]




SCHEDULES = ("cosine", "wsd")


def lr_scheduler_kwargs(schedule: str, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                        max_steps: int | None = None) -> tuple[str, dict[str, Any]]:
    """(`lr_scheduler_type`, `lr_scheduler_kwargs`) for `TrainingArguments` from one of our schedule names.

    Warmup is linear and set as usual through `warmup_steps` / `warmup_ratio`.

    - "cosine": cosine decay from the peak to `min_lr_ratio` x peak at the last step (transformers'
      "cosine_with_min_lr").
    - "wsd": warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, a constant peak, then a decay to
      `min_lr_ratio` x peak over the last `decay_fraction` of `max_steps` (transformers'
      "warmup_stable_decay", which needs the decay length in steps, hence `max_steps`). The decay follows
      1 - sqrt(progress), a cooldown Hägele et al. 2024 found better than a linear one. transformers starts
      this schedule's warmup at `min_lr_ratio` x peak rather than at zero.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
    if schedule == "cosine":
        return "cosine_with_min_lr", {"min_lr_rate": min_lr_ratio}
    if schedule == "wsd":
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {decay_fraction}")
        if max_steps is None or max_steps < 1:
            raise ValueError(f"max_steps: the 'wsd' schedule needs the total number of steps, got {max_steps}")
        num_decay_steps = max(1, round(decay_fraction * max_steps))
        return "warmup_stable_decay", {"num_decay_steps": num_decay_steps, "min_lr_ratio": min_lr_ratio,
                                       "decay_type": "1-sqrt"}
    raise ValueError(f"schedule: unknown name {schedule!r}; choose one of {SCHEDULES}")
