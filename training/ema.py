"""An exponential moving average of the weights, kept while training (`EMACallback`); the mean of saved
checkpoints is `training/average.py`.

- `EMACallback(decay)`: after every optimizer step, ema <- decay x ema + (1 - decay) x weights (in float32).
  Its state is part of every checkpoint (`ema_state.pt`, or one `ema_state_<rank>.pt` per rank when FSDP2
  shards the weights), so a resumed run continues the same average; `swapped_in(model)` puts the averaged
  weights into the model for a while, e.g. to save them as `<output_dir>/ema` with the Trainer's own save.

An average of n steps with decay d spans about 1 / (1 - d) steps: 0.999 averages the last thousand or so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

EMA_FILE = "ema_state.pt"
EMA_RANK_FILE = "ema_state_{rank}.pt"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class EMACallback(TrainerCallback):
    """An exponential moving average of the trainable weights, updated after each optimizer step."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.model: nn.Module | None = None

    def _parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.model.named_parameters() if p.requires_grad)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        if not self.shadow:  # a resumed run loads the saved average afterwards (`load`)
            self.shadow = {name: _local(p).detach().float().clone() for name, p in self._parameters()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        names, params = zip(*self._parameters())
        shadows = [self.shadow[name] for name in names]
        torch._foreach_lerp_(shadows, [_local(p).detach().float() for p in params], 1.0 - self.decay)

    def _sharded(self) -> bool:
        return any(hasattr(p, "to_local") for _, p in self._parameters())

    def save(self, checkpoint: str | Path, rank: int) -> None:
        """Into a checkpoint folder: one file, or one per rank when the weights are sharded."""
        if self._sharded():
            torch.save(self.shadow, Path(checkpoint) / EMA_RANK_FILE.format(rank=rank))
        elif rank == 0:
            torch.save(self.shadow, Path(checkpoint) / EMA_FILE)

    def load(self, checkpoint: str | Path, rank: int) -> None:
        folder = Path(checkpoint)
        path = folder / (EMA_RANK_FILE.format(rank=rank) if self._sharded() else EMA_FILE)
        if not path.is_file():
            raise ValueError(f"{path}: missing; this checkpoint was saved without ema_decay (or on another number "
                             "of ranks)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.keys() != self.shadow.keys():
            raise ValueError(f"{path}: holds other parameters than this model's")
        self.shadow = {name: tensor.to(self.shadow[name].device) for name, tensor in saved.items()}

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module | None = None) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        if model is not None:
            self.model = model
        kept = {}
        for name, p in self._parameters():
            local = _local(p)
            kept[name] = local.detach().clone()
            local.copy_(self.shadow[name].to(local.dtype))
        try:
            yield
        finally:
            for name, p in self._parameters():
                _local(p).copy_(kept[name])
