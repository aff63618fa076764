"""Where the pipeline's tasks run: this machine (`local`), a Ray cluster (`ray`) or Slurm (`slurm`).

The steps themselves live in `data_prep.pipeline`: three per-shard steps (filter, split, pack) and
two global ones (dedup, tokenizer). The pipeline hands its `run_task` to the executor here (this module
does not import it), so every executor runs the same functions, the outputs are byte-identical whichever
ran them, and every shard function skips a shard whose output exists, so finished shards are never redone.

- `local`: shards in a process pool on this machine (`--workers`), global steps in this process. Not
  datatrove's `LocalPipelineExecutor`: on one machine it adds nothing Ember lacks (a shard's output file is
  its completion marker), while it starts a forkserver and a manager process per step (seconds on a small
  run; the forkserver re-imports `__main__`), logs Ember's one-line errors as tracebacks, and polls a
  dependency every 2 minutes.
- `ray`: each step is a `datatrove.executor.RayPipelineExecutor` with one task per shard (one task
  for a global step): a placement group per task, a task whose worker dies (killed, preempted,
  out of memory) is resubmitted, completed tasks are marked under `<output_dir>/executor/<step>/`.
  The driver runs the steps one after the other, so each global step starts when every shard of
  the step before it is done. It connects to `ray.address` (or `RAY_ADDRESS`) or starts a local
  Ray instance with `ray.num_cpus` CPUs.
- `slurm`: each step is a `datatrove.executor.SlurmPipelineExecutor` (an array job for a per-shard
  step, one task for a global step, and a last task that writes the report), chained with
  `--dependency=afterok`; tasks requeue on SIGUSR1 (pre-emption) and skip what is done. `run`
  submits the chain and returns; `python -m data_prep status --config C.yaml` shows progress.

Datatrove's pipeline steps receive `(data, rank, world_size)`; `ShardTask` adapts an Ember step to
that call. Ember's own one-line errors (a bad config value, bad input under `--strict`) are written
to `<output_dir>/executor/<step>/errors/<rank>` by the task, so the driver can repeat them as one line
instead of a remote traceback.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

from data_prep.config import ConfigError, PipelineConfig
from data_prep.io import atomic_write_text
from data_prep.report import DataError, PipelineError

GLOBAL_STEPS = ("dedup", "tokenizer")
EXECUTOR_DIR = "executor"  # under output_dir: datatrove's logs, completion markers, stats, job scripts
# What one task runs, `data_prep.pipeline.run_task(cfg, step, rank)`: rank is the shard (0 for a global step).
TaskFunction = Callable[[PipelineConfig, str, int], None]
_EMBER_ERRORS = {"ConfigError": ConfigError, "DataError": DataError}
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    Datatrove's Ray worker runs each task in a forked child; if the worker is killed, an orphaned
    child would keep writing the shard while the retried task writes it too.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class ShardTask:
    """One Ember step as a datatrove pipeline callable: rank = shard index (0 for a global step)."""

    def __init__(self, cfg: PipelineConfig, step: str, run: TaskFunction) -> None:
        self.cfg, self.step, self.run = cfg, step, run

    def __repr__(self) -> str:
        return f"ember data_prep {self.step}"

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        _die_with_parent()
        try:
            self.run(self.cfg, self.step, rank)
        except (ConfigError, DataError, PipelineError) as err:
            errors = step_dir(self.cfg, self.step) / "errors"
            errors.mkdir(parents=True, exist_ok=True)
            (errors / f"{rank:05d}").write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
            raise
        return None


def step_dir(cfg: PipelineConfig, step: str) -> Path:
    return cfg.root / EXECUTOR_DIR / step


def _tasks(cfg: PipelineConfig, step: str) -> int:
    return 1 if step in (*GLOBAL_STEPS, "report") else cfg.num_shards


def _raise_task_error(cfg: PipelineConfig, step: str) -> None:
    """Repeat the first Ember error a task of `step` recorded, as the same one-line exception."""
    errors = sorted((step_dir(cfg, step) / "errors").glob("[0-9]*"))
    if errors:
        error = json.loads(errors[0].read_text())
        raise _EMBER_ERRORS.get(error["type"], PipelineError)(error["message"])


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------

def run_ray(cfg: PipelineConfig, steps: list[str], run: TaskFunction) -> dict[str, float]:
    """Run `steps` in order on Ray, each task by `run`; returns the seconds each step took. Raises when a task
    failed for good."""
    import time

    import ray

    started_here = not ray.is_initialized()
    if started_here:
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
        # A local instance gets exactly `num_cpus`; a cluster has its own resources.
        local = {"num_cpus": cfg.ray.num_cpus} if address is None else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=cfg.ray.log_to_driver,
                 configure_logging=False, **local)
    timings = {}
    try:
        for step in steps:
            start = time.perf_counter()
            shutil.rmtree(step_dir(cfg, step) / "errors", ignore_errors=True)
            tasks = _tasks(cfg, step)
            executor = RayPipelineExecutor(
                pipeline=[ShardTask(cfg, step, run)], tasks=tasks, workers=cfg.ray.workers,
                logging_dir=str(step_dir(cfg, step)), cpus_per_task=cfg.ray.cpus_per_task,
                mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb, skip_completed=True)
            executor.run()
            _raise_task_error(cfg, step)
            incomplete = executor.get_incomplete_ranks()
            if incomplete:
                raise PipelineError(f"{step}: {len(incomplete)} of {tasks} Ray tasks did not finish (shards "
                                    f"{', '.join(map(str, incomplete[:10]))}); logs in {step_dir(cfg, step)}/logs; "
                                    f"rerun to retry them")
            timings[step] = time.perf_counter() - start
    finally:
        if started_here:
            ray.shutdown()
    return timings


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------

class EmberSlurmExecutor(SlurmPipelineExecutor):
    """Leaves out unset sbatch options: datatrove writes a bare `--partition` when there is none, which
    sbatch refuses; without one, Slurm uses the cluster's default partition."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        return {k: v for k, v in super().get_sbatch_args(max_array).items() if v is not None}


def slurm_executors(cfg: PipelineConfig, steps: list[str], run: TaskFunction) -> list[Any]:
    """One Slurm executor per step (and one for the report), each depending on the one before; `run` runs a task."""
    executors: list[Any] = []
    for step in [*steps, "report"]:
        executors.append(EmberSlurmExecutor(
            pipeline=[ShardTask(cfg, step, run)], tasks=_tasks(cfg, step), time=cfg.slurm.time,
            partition=cfg.slurm.partition, qos=cfg.slurm.qos, cpus_per_task=cfg.slurm.cpus_per_task,
            mem_per_cpu_gb=cfg.slurm.mem_per_cpu_gb, workers=cfg.slurm.workers,
            job_name=f"{cfg.slurm.job_name}_{step}", logging_dir=str(step_dir(cfg, step)),
            slurm_logs_folder=str(step_dir(cfg, step) / "slurm_logs"),
            env_command=cfg.slurm.env_command or _activate_this_python(),
            sbatch_args=dict(cfg.slurm.sbatch_args), mail_user=cfg.slurm.mail_user,
            depends=executors[-1] if executors else None, skip_completed=True))
    return executors


def _activate_this_python() -> str:
    """The job runs the Python (and datatrove's launch_pickled_pipeline) this command runs with."""
    bin_dir = Path(sys.executable).parent
    return f'export PATH="{bin_dir}:$PATH"'


def submit_slurm(cfg: PipelineConfig, steps: list[str], run: TaskFunction) -> dict[str, Any]:
    """Submit the step chain, each task run by `run`; returns {step: job id}, also saved to
    `<output_dir>/executor/slurm_jobs.json`.

    A step whose tasks are all complete is not submitted (its job id is -1).
    """
    if shutil.which("sbatch") is None:
        raise ConfigError("executor: slurm needs sbatch on PATH (run on a Slurm login node)")
    _clear_previous_submission(cfg)
    for step in [*steps, "report"]:  # a resubmission starts from a clean error record
        shutil.rmtree(step_dir(cfg, step) / "errors", ignore_errors=True)
    executors = slurm_executors(cfg, steps, run)
    executors[-1].run()  # launches its dependencies first, in order
    jobs = {step: executor.job_id for step, executor in zip([*steps, "report"], executors)}
    atomic_write_text(cfg.root / EXECUTOR_DIR / "slurm_jobs.json", json.dumps(jobs, indent=2))
    return jobs


def _clear_previous_submission(cfg: PipelineConfig) -> None:
    """Cancel the jobs of an earlier submission that can never start (a task they depend on failed);
    refuse to submit while any of its jobs is still queued or running (two chains would race)."""
    jobs_file = cfg.root / EXECUTOR_DIR / "slurm_jobs.json"
    if not jobs_file.exists():
        return
    # By name, which also finds datatrove's stats-merging job of each step.
    names = ",".join(f"{cfg.slurm.job_name}_{step}" for step in json.loads(jobs_file.read_text()))
    result = subprocess.run(["squeue", "-h", "--me", "-n", names, "-o", "%F %T %r"], capture_output=True, text=True,
                            timeout=30)
    queued = [(line.split(maxsplit=2) + ["", ""])[:3] for line in result.stdout.splitlines() if line.strip()]
    if not queued:
        return
    jobs = sorted({job for job, _, _ in queued}, key=int)
    # Stuck: nothing runs or waits for resources, and some job waits for a dependency that failed
    # (the jobs after it wait on it with reason "Dependency" and will never start either).
    waiting_on_dependencies = all(state == "PENDING" and reason.startswith("Dependency") for _, state, reason in queued)
    if not (waiting_on_dependencies and any(reason == "DependencyNeverSatisfied" for _, _, reason in queued)):
        raise PipelineError(f"Slurm jobs {', '.join(jobs)} of the previous submission are still queued or "
                            f"running; wait for them (python -m data_prep status) or scancel them")
    subprocess.run(["scancel", *jobs], check=False, timeout=30)
    print(f"[data_prep] cancelled jobs {', '.join(jobs)} of the previous submission: a task they depend on failed")


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

def progress(cfg: PipelineConfig, steps: list[str]) -> list[dict[str, Any]]:
    """Per step: tasks, completed tasks (datatrove's markers), failed tasks, and the Slurm job state."""
    jobs_file = cfg.root / EXECUTOR_DIR / "slurm_jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
    rows = []
    for step in [*steps, "report"]:
        directory = step_dir(cfg, step)
        completions = directory / "completions"
        done = len(list(completions.iterdir())) if completions.is_dir() else 0
        errors = directory / "errors"
        failed = sorted(p.name for p in errors.iterdir()) if errors.is_dir() else []
        row = {"step": step, "tasks": _tasks(cfg, step), "completed": done, "failed": failed}
        if step in jobs:
            row["job_id"] = jobs[step]
            row["state"] = _slurm_state(str(jobs[step]))
        rows.append(row)
    return rows


def _slurm_state(job_id: str) -> str:
    """The states of a job's array tasks, "COMPLETED 2, RUNNING 1": from the controller while it
    remembers the job (`scontrol`), else from accounting (`sacct`, where the cluster keeps it)."""
    if job_id in ("-1", "None"):
        return "nothing to run"
    states: list[str] = []
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                                timeout=30)
        states = re.findall(r"\bJobState=(\S+)", result.stdout) if result.returncode == 0 else []
    if not states and shutil.which("sacct"):
        result = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                                timeout=30)
        if result.returncode == 0:
            states = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    if not states:
        return "unknown"
    return ", ".join(f"{state} {n}" for state, n in sorted(Counter(states).items()))


def format_progress(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'step':<12}{'tasks':>8}{'done':>8}{'failed':>8}  job"]
    for row in rows:
        job = f"{row['job_id']} ({row['state']})" if "job_id" in row else ""
        lines.append(f"{row['step']:<12}{row['tasks']:>8}{row['completed']:>8}{len(row['failed']):>8}  {job}")
    return "\n".join(lines)
