"""The data pipeline on a real one-machine Slurm (slurmctld + slurmd + munge, started by the fixture):
the dependent array jobs write every output byte the local executor writes, `status` follows them, and
after a task is killed a second `run` resubmits only what is missing."""

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import SMALL_RUN, STDLIB_CONFIG, every_output

from data_prep.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

def _data_prep(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)


def _queued(env) -> str:
    """This user's queued or running Ember jobs, "name STATE" per line."""
    queue = subprocess.run(["squeue", "-h", "--me", "-o", "%j %T"], env=env, capture_output=True, text=True).stdout
    return "\n".join(line for line in queue.splitlines() if "ember_data" in line)


def _wait_for_report(env, config: Path, output: Path, timeout: float = 600) -> str:
    """Until the report is written and the chain has left the queue: the report step's job (and the
    stats-merging job datatrove queues after each step) may still be running when report.json appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _data_prep(env, "status", "--config", str(config))
        if (output / "report.json").exists() and not _queued(env):
            return _data_prep(env, "status", "--config", str(config)).stdout
        time.sleep(2)
    raise AssertionError(f"the Slurm chain did not finish in {timeout} s:\n{status.stdout}{status.stderr}\n"
                         f"{_queued(env)}")


def _write_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The small stdlib config with its own output_dir, as a file `sbatch` jobs and `status` can read."""
    output = tmp_path / name
    cfg = load_config(STDLIB_CONFIG, [f"--output_dir={output}", *SMALL_RUN, "--executor=slurm"])
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return config, output


def test_slurm_array_jobs_write_the_same_bytes_as_the_local_executor(slurm, small_local_run, tmp_path):
    config, output = _write_config(tmp_path, "slurm")
    submitted = _data_prep(slurm, "run", "--config", str(config))
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "submitted to Slurm" in submitted.stdout
    status = _wait_for_report(slurm, config, output)
    rows = {line.split()[0]: line.split() for line in status.splitlines()[1:]}
    for step, tasks in (("filter", 2), ("dedup", 1), ("split", 2), ("tokenizer", 1), ("pack", 2), ("report", 1)):
        assert rows[step][1:4] == [str(tasks), str(tasks), "0"], status
        assert f"COMPLETED {tasks}" in " ".join(rows[step]), status
    assert every_output(output) == every_output(small_local_run.root)
    # The generated job scripts: an array per shard step, one task per global step, afterok chaining.
    script = (output / "executor" / "filter" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --array=0-0" in (output / "executor" / "dedup" / "launch_script.slurm").read_text()


def test_a_killed_slurm_task_is_resubmitted_and_finished_shards_are_kept(slurm, small_local_run, tmp_path):
    config, output = _write_config(tmp_path, "killed")
    submitted = _data_prep(slurm, "run", "--config", str(config))
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    jobs = json.loads((output / "executor" / "slurm_jobs.json").read_text())
    filter_job = str(jobs["filter"])
    # Kill array task 1 of the filter job as soon as it runs (Python is still starting: mid-task).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        running = subprocess.run(["squeue", "-h", "-j", filter_job, "-t", "RUNNING", "-o", "%i"], env=slurm,
                                 capture_output=True, text=True).stdout.split()
        if f"{filter_job}_1" in running:
            subprocess.run(["scancel", "--signal=KILL", "--full", f"{filter_job}_1"], env=slurm, check=True)
            break
        time.sleep(0.2)
    else:
        raise AssertionError("filter task 1 never ran")
    shard0 = output / "filtered" / "00000-of-00002.jsonl.zst"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not shard0.exists():
        time.sleep(0.5)
    while time.monotonic() < deadline:  # until the controller sees the chain can never run
        reasons = subprocess.run(["squeue", "-h", "-j", str(jobs["dedup"]), "-o", "%r"], env=slurm,
                                 capture_output=True, text=True).stdout
        if "DependencyNeverSatisfied" in reasons:
            break
        time.sleep(0.5)
    assert shard0.exists() and not (output / "filtered" / "00001-of-00002.jsonl.zst").exists()
    kept = shard0.stat().st_mtime_ns
    status = _data_prep(slurm, "status", "--config", str(config)).stdout
    assert "CANCELLED" in status or "FAILED" in status, status
    # A second run cancels the stuck chain, resubmits and finishes; shard 0 is not redone.
    again = _data_prep(slurm, "run", "--config", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    _wait_for_report(slurm, config, output)  # times out if the stuck first chain were left pending
    assert shard0.stat().st_mtime_ns == kept
    assert every_output(output) == every_output(small_local_run.root)
