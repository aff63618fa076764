"""Downstream tasks while pretraining: lm-eval tasks (evaluation/downstream.py) every N steps, on rank 0.

The scores are logged with the other metrics (`downstream/<task>/<metric>`, and `downstream_seconds`, what the
evaluation cost), so they reach the log lines, `report_to` trackers, trainer_state.json and the run report's
plot. Only rank 0 evaluates, on its own copy of the weights: the other ranks wait for it at the next
collective, so the model must be whole on every rank (DDP or one process; not FSDP, ZeRO-3 or tensor parallel).
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from cli import ConfigError
from evaluation.downstream import PREFIX, SECONDS, build_task_manager, evaluate_downstream


def downstream_metrics(results: dict) -> dict[str, float]:
    """lm-eval's results as flat `downstream/<task>/<metric>` numbers (standard errors, sample counts and filter
    names left out)."""
    metrics = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and not metric.endswith("_stderr")
                    and metric != "sample_len"):
                metrics[f"{PREFIX}{task}/{metric}"] = float(value)
    return metrics


class DownstreamEvalCallback(TrainerCallback):
    """Runs `tasks` every `every` steps and at the last step, on rank 0, and logs them through `trainer.log`."""

    def __init__(self, tasks: list[str], include_paths: list[str], every: int, limit: float | None = None):
        self.tasks, self.every, self.limit = list(tasks), every, limit
        try:
            import lm_eval  # noqa: F401  (lm-evaluation-harness: the optional eval extra)
        except ImportError:
            raise ConfigError("downstream_tasks: needs lm-evaluation-harness; pip install -e '.[eval]'") from None
        try:  # an unknown task or folder fails before training, named as this run's setting
            self.manager = build_task_manager(self.tasks, list(include_paths))
        except ValueError as err:  # "tasks: ..." / "include_path: ..."
            raise ConfigError(f"downstream_{err}") from None
        self.trainer = None  # set by `bind`: the scores are logged as the trainer's own metrics

    def bind(self, trainer) -> DownstreamEvalCallback:
        self.trainer = trainer
        return self

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if step % self.every and step != state.max_steps:
            return
        if not state.is_world_process_zero:
            return
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                results = evaluate_downstream(model, processing_class, self.tasks, self.manager, limit=self.limit,
                                              max_length=model.config.max_position_embeddings)
        finally:
            model.train(was_training)
        metrics = {**downstream_metrics(results), SECONDS: time.perf_counter() - start}
        should_log = control.should_log  # the Trainer's own log of this step is still to come: logging resets it
        self.trainer.log(metrics)
        control.should_log = should_log
