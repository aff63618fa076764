"""Which checkpoint a resumed run starts from."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def saved_step(checkpoint: Path) -> int | None:
    """The global step recorded in the checkpoint's trainer state; None when the file is missing or cut short."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state.get("global_step") if isinstance(state, dict) else None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that a resume can trust, or None if there is none.

    For `--resume_from_checkpoint=auto`, in place of `transformers.trainer_utils.get_last_checkpoint`,
    which goes by the folder name alone. The Trainer writes a checkpoint in place, not to a staging folder
    renamed at the end: the main process writes the model files, the optimizer, the scheduler and its RNG
    state, and `trainer_state.json` last. A kill in between leaves a `checkpoint-N` folder holding part of
    that; resuming from it, `Trainer.train` stops on the missing trainer state (or a truncated file), and so
    does every later automatic resume until someone deletes the folder. Here a checkpoint counts when its
    `trainer_state.json` is valid JSON whose `global_step` is the N in the folder's name: written last, it
    vouches for the files before it. A save never touches earlier checkpoints (the `save_total_limit`
    rotation deletes old folders only after the new trainer state is written), so a kill mid-save sends the
    resume one checkpoint back, and the resumed run rewrites the partial folder when it gets there.

    Not checked: the other ranks' `rng_state_<rank>.pth`, which they write with no barrier to the main
    process. The world size the checkpoint was written with is not recorded, and requiring the resuming
    run's ranks would reject every checkpoint after a change of world size. A kill that catches a rank that
    far behind leaves its RNG file missing (the Trainer then resumes without that rank's RNG state, which
    only dropout would notice) or truncated (loading it fails with an error).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir():
            candidates.append((int(match.group(1)), entry))
    for step, checkpoint in sorted(candidates, reverse=True):
        if saved_step(checkpoint) == step:
            return str(checkpoint)
        logger.warning("%s is incomplete (no valid %s for step %d): not resuming from it",
                       checkpoint, TRAINER_STATE_NAME, step)
    return None
