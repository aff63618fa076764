"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer the HF Trainer can drive.

    trainer = PretrainingTrainer(..., optimizer_options=OptimizerArguments(optimizer="muon"))

Muon (Jordan et al. 2024) replaces each hidden matrix's momentum-averaged gradient by the nearest
semi-orthogonal matrix (5 Newton-Schulz iterations, torch's implementation `torch.optim.Muon` ships) before
the step. It applies to 2-D hidden weights only; embeddings, the output head, norms, biases and the MoE
router stay with AdamW (`muon_parameter_groups`). The experts of an MoE layer are stored as one 3-D tensor
(experts x out x in): each expert's matrix is orthogonalised on its own.

Step size. An orthogonalised update has RMS about 1/sqrt(max(m, n)), so each matrix's learning rate is
scaled by its shape (`muon_lr_scaling`):
- "match_rms_adamw" (default): 0.2 * sqrt(max(m, n)), from Liu et al. 2025 ("Muon is Scalable for LLM
  Training", Moonlight): the update's RMS is then 0.2, about AdamW's, so Muon reuses AdamW's learning rate
  and weight decay;
- "original": sqrt(max(1, m / n)), Jordan's rule; it needs a learning rate of its own (0.02 in his runs).
Weight decay is decoupled, p <- p * (1 - lr * weight_decay), with the unscaled learning rate, as for AdamW.

One optimizer holds both kinds of parameter groups, so the Trainer's learning-rate schedule scales both, its
checkpoints hold both states (`optimizer.pt`, or FSDP2's sharded optimizer files) and a resume is exact.
Gradient accumulation and DDP need nothing special: Muon reads the accumulated, all-reduced gradient. A
parameter without a gradient is passed over, which is how `NonFiniteGuardCallback` skips a step.

FSDP2 shards every matrix by rows across ranks (DTensor `Shard(0)`). Newton-Schulz needs the whole matrix,
so each rank gathers the full momentum-averaged update (`full_tensor()`, one all-gather per matrix), every
rank orthogonalises it identically and keeps its own rows. That costs one matrix per parameter in memory
and the all-gather traffic of the weights per step; fine up to a few billion parameters, beyond which the
work should be split across ranks. FSDP1 (flat parameters) and DeepSpeed ZeRO (flat partitions) hide the
matrices and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr, _zeropower_via_newtonschulz

from cli import ConfigError

OPTIMIZERS = ("adamw", "muon")
LR_SCALINGS = ("match_rms_adamw", "original")


def _output_embedding_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        head = getattr(module, "get_output_embeddings", lambda: None)() if module is not None else None
        if head is not None and getattr(head, "weight", None) is not None:
            ids.add(id(head.weight))
    return ids


def muon_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters Muon updates: hidden weight matrices.

    - the weight of every `nn.Linear` except the output head (attention and MLP projections; LoRA's A and B);
    - every 3-D parameter: stacked expert matrices (`EmberExperts.gate_up_proj`, `down_proj`).
    Everything else goes to AdamW: token and position embeddings (`nn.Embedding`), the output head (tied or
    not: its rows are per-token like an embedding's), 1-D parameters (norms, biases) and other 2-D
    parameters that are not a Linear layer's weight, e.g. the MoE router, whose rows are per-expert logits.
    """
    head = _output_embedding_ids(model)
    linear = {id(module.weight) for module in model.modules()
              if isinstance(module, nn.Linear) and id(module.weight) not in head}
    return [name for name, p in model.named_parameters()
            if p.requires_grad and ((p.ndim == 2 and id(p) in linear) or p.ndim == 3)]


def orthogonalize(update: torch.Tensor, ns_steps: int = 5) -> torch.Tensor:
    """The Newton-Schulz orthogonalisation of a matrix (or of each matrix of a 3-D stack), as `update`'s dtype
    and layout: a DTensor is gathered whole, orthogonalised, and each rank keeps its own shard."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(update, DTensor):
        whole = orthogonalize(update.full_tensor(), ns_steps)
        mesh = update.device_mesh
        replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return replicated.redistribute(mesh, update.placements)
    if update.ndim == 3:
        return torch.stack([orthogonalize(matrix, ns_steps) for matrix in update])
    if update.device.type != "cpu":
        return _zeropower_via_newtonschulz(update, (DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps, EPS).to(update.dtype)
    return _newton_schulz_float32(update, ns_steps)


def _newton_schulz_float32(update: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """torch's Newton-Schulz iteration (same quintic, same coefficients, same normalisation) in float32.

    torch runs it in bfloat16, which GPUs multiply at several times float32's rate; CPUs without AMX multiply
    bfloat16 more slowly than float32 (2.4x on the AVX-512 EPYC of benchmarks/results), and there the
    iteration is a large part of a small model's step.
    """
    a, b, c = DEFAULT_A, DEFAULT_B, DEFAULT_C
    tall = update.size(0) > update.size(1)
    x = update.float().T if tall else update.float()
    x = x / x.norm().clamp(min=EPS)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


class MuonWithAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups marked `muon=True` take Muon steps instead.

    Muon groups carry `lr`, `weight_decay`, `momentum`, `nesterov`, `ns_steps` and `lr_scaling`; the other
    groups are plain AdamW groups. `step` runs Muon on its groups, then AdamW's own `step` (with its fused or
    foreach kernels) on the rest. The state of a Muon parameter is its momentum buffer (plus a step count).
    """

    def __init__(self, param_groups: list[dict[str, Any]], **adamw_kwargs: Any):
        for group in param_groups:
            group.setdefault("muon", False)
        super().__init__(param_groups, **adamw_kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        groups = self.param_groups
        self.param_groups = [group for group in groups if not group["muon"]]
        try:
            super().step()
        finally:
            self.param_groups = groups
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:  # no gradient (or the NaN guard dropped it): no step, state untouched
                continue
            grad = param.grad
            state = self.state[param]
            if not state:
                # "step" too: AdamW's __setstate__ converts every parameter state's step when it loads a state dict
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["step"] += 1
            buffer = state["momentum_buffer"]
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            update = orthogonalize(update, group["ns_steps"])
            scaled_lr = _adjust_lr(lr, group["lr_scaling"], param.shape[-2:])
            param.mul_(1 - lr * decay)
            param.add_(update, alpha=-scaled_lr)


def muon_parameter_groups(model: nn.Module, decay_names: set[str], *, lr: float, muon_lr: float,
                          weight_decay: float, momentum: float, nesterov: bool, ns_steps: int,
                          lr_scaling: str) -> list[dict[str, Any]]:
    """Muon's group (hidden matrices) and AdamW's two (weight-decayed `decay_names`, the rest without decay)."""
    muon = set(muon_parameter_names(model))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in named if name in muon], "muon": True, "lr": muon_lr,
         "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
         "lr_scaling": lr_scaling},
        {"params": [p for name, p in named if name not in muon and name in decay_names], "lr": lr,
         "weight_decay": weight_decay},
        {"params": [p for name, p in named if name not in muon and name not in decay_names], "lr": lr,
         "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def muon_optimizer(model: nn.Module, options: Any, decay_names: set[str], *, lr: float, weight_decay: float,
                   **adamw_kwargs: Any) -> MuonWithAdamW:
    """`MuonWithAdamW` over `model` with the Muon settings of `options` (an `OptimizerArguments`): Muon on the hidden
    matrices at `options.muon_learning_rate` (default `lr`), AdamW at `lr` on the rest, `decay_names` decayed."""
    groups = muon_parameter_groups(
        model, decay_names, lr=lr, muon_lr=options.muon_learning_rate or lr, weight_decay=weight_decay,
        momentum=options.muon_momentum, nesterov=options.muon_nesterov, ns_steps=options.muon_ns_steps,
        lr_scaling=options.muon_lr_scaling)
    return MuonWithAdamW(groups, lr=lr, **adamw_kwargs)


class OptimizerChoiceMixin:
    """For a `transformers.Trainer` subclass: `optimizer_options.optimizer == "muon"` builds `MuonWithAdamW`; with
    "adamw" (or no options) the Trainer's own optimizer is built, unchanged.

    The AdamW half takes the Trainer's own AdamW settings (`adam_beta1/2`, `adam_epsilon`, fused or not,
    from `optim`) and its weight-decay split (`get_decay_parameter_names`).
    """

    optimizer_options = None  # an OptimizerArguments, set by the subclass's __init__

    def create_optimizer(self, model=None):
        options = self.optimizer_options
        if self.optimizer is not None or options is None or options.optimizer != "muon":
            return super().create_optimizer(model)
        if self.is_deepspeed_enabled:
            raise ConfigError("optimizer: muon needs whole weight matrices, and DeepSpeed ZeRO flattens them into "
                              "partitions; use FSDP2 (accelerate_configs/fsdp2.yaml) or DDP")
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ConfigError("optimizer: muon needs whole weight matrices, and FSDP1 flattens them; use FSDP2 "
                              "(accelerate_configs/fsdp2.yaml)")
        opt_model = self.model if model is None else model
        adamw_cls, adamw_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if adamw_cls is not torch.optim.AdamW:
            raise ConfigError(f"optim: {self.args.optim} cannot pair with optimizer: muon; use adamw_torch or "
                              "adamw_torch_fused for the parameters Muon does not take")
        self.optimizer = muon_optimizer(opt_model, options, set(self.get_decay_parameter_names(opt_model)),
                                        lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                        **{k: v for k, v in adamw_kwargs.items() if k != "lr"})
        return self.optimizer
