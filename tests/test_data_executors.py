"""The data pipeline on a real local Ray instance: every output byte equal to the local executor's, a
Ray worker killed mid-step is retried to the same bytes, and an Ember error inside a task comes back
as its one line."""

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import SMALL_RUN, STDLIB_CONFIG, every_output

from data_prep.config import load_config
from data_prep.pipeline import run_pipeline, run_step
from data_prep.report import DataError


@pytest.fixture(scope="module")
def local_ray():
    """A real Ray instance on this machine: 2 CPUs, no dashboard; the pipeline uses it instead of starting one."""
    if os.environ.get("CI"):
        import ray  # CI installs the `ray` extra (Makefile EXTRAS): a missing one is a failure there
    else:
        ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_executor_writes_the_same_bytes_as_the_local_one(local_ray, small_local_run, tmp_path):
    cfg = load_config(STDLIB_CONFIG, [f"--output_dir={tmp_path / 'out'}", *SMALL_RUN, "--executor=ray"])
    reports = run_pipeline(cfg)
    assert reports and {r.step for r in reports} >= {"read", "split", "pack/train"}
    assert every_output(cfg.root) == every_output(small_local_run.root)
    # Datatrove marked every task complete: a rerun finds nothing to do and changes nothing.
    for step, tasks in (("filter", 2), ("dedup", 1), ("split", 2), ("tokenizer", 1), ("pack", 2)):
        assert len(list((cfg.root / "executor" / step / "completions").iterdir())) == tasks, step
    before = {p: p.stat().st_mtime_ns for p in (cfg.root / "tokens").rglob("*")}
    run_pipeline(cfg)
    assert {p: p.stat().st_mtime_ns for p in (cfg.root / "tokens").rglob("*")} == before


def _kill_the_worker_writing(directory: Path, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the Ray worker (datatrove's RankWorker actor) whose task is writing a shard in `directory`."""
    while not stop.is_set():
        for process in psutil.process_iter(["cmdline"]):
            try:
                if not (process.info["cmdline"] or [""])[0].startswith("ray::RankWorker"):
                    continue
                if not any(Path(f.path).parent == directory and Path(f.path).name.startswith(".")
                           for f in process.open_files()):
                    continue
                # The task runs in a child of the actor; the actor is the Ray worker.
                parent = process.parent()
                actor = parent if (parent.cmdline() or [""])[0].startswith("ray::RankWorker") else process
                killed.update(actor=actor.pid, task=process.pid)
                os.kill(actor.pid, signal.SIGKILL)
                return
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue
        time.sleep(0.01)


def test_a_killed_ray_worker_is_retried_to_identical_outputs(local_ray, tmp_path):
    # A few hundred documents make each filter task last seconds, long enough to be killed mid-write.
    common = ["--num_shards=2", "--sources.0.max_docs=300"]
    reference = load_config(STDLIB_CONFIG, [f"--output_dir={tmp_path / 'local'}", *common])
    run_step(reference, "filter")
    cfg = load_config(STDLIB_CONFIG, [f"--output_dir={tmp_path / 'ray'}", *common, "--executor=ray"])
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=_kill_the_worker_writing, args=(cfg.root / "filtered", killed, stop))
    killer.start()
    try:
        run_pipeline(cfg, ["filter"])
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was caught writing a shard"
    time.sleep(0.5)
    assert not psutil.pid_exists(killed["task"]) or psutil.Process(killed["task"]).status() == psutil.STATUS_ZOMBIE
    logs = "".join(p.read_text() for p in (cfg.root / "executor" / "filter" / "logs").glob("*.log"))
    assert "Processing done" in logs
    assert len(list((cfg.root / "executor" / "filter" / "completions").iterdir())) == 2
    assert every_output(cfg.root) == every_output(reference.root)
    assert not [p for p in cfg.root.rglob(".*") if p.name.endswith((".tmp", ".partial"))]


def test_an_ember_error_inside_a_ray_task_is_one_line(local_ray, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "fine"}\n{"text": \n')
    cfg = load_config(raw={"output_dir": str(tmp_path / "out"), "strict": True, "executor": "ray",
                           "sources": [{"name": "s", "paths": [str(data)]}]})
    with pytest.raises(DataError) as err:
        run_pipeline(cfg)
    assert str(err.value) == f"{data}:2: malformed_json"
