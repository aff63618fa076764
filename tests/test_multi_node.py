"""Multi-node training on one host: two `accelerate launch` processes with accelerate_configs/multi_node_cpu_ddp.yaml,
`--machine_rank 0/1 --main_process_ip 127.0.0.1`, one CPU rank each, run recipes/pretrain.py. They meet at a
static rendezvous, train, checkpoint and resume, and every logged loss equals the single-machine 2-process
run (cpu_ddp.yaml) bit for bit. Also the Slurm launch template of accelerate_configs/README.md, run as
Slurm would run it (one task per node) with SLURM_* variables set by hand."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import launch_failure
from test_pretrain_resume import COMPARED, MAX_STEPS, RUN_ARGS, logged_history, training_log_lines

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CONFIGS = REPO_ROOT / "accelerate_configs"
SBATCH_TEMPLATE = CONFIGS / "slurm_multi_node.sbatch"
STEPS, SAVE = 12, 6
ARGS = [a for a in RUN_ARGS if not a.startswith(("--max_steps", "--save_steps"))] + [
    f"--max_steps={STEPS}", f"--save_steps={SAVE}"]
assert STEPS < MAX_STEPS
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *options]


def train_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [str(RECIPE), "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={output_dir}", *ARGS,
            *extra]


def run_two_machines(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Machine 0 and machine 1 as two launchers; returns machine 0's stdout lines (rank 0 logs)."""
    port = free_port()
    machines = []
    for rank in (0, 1):
        command = launch("multi_node_cpu_ddp.yaml", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                         "--main_process_port", str(port)) + train_args(data_dir, output_dir, *extra)
        machines.append(subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE))
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for rank, (machine, (_, stderr)) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank}:\n{stderr[-3000:]}"
    return outputs[0][0].splitlines()


@pytest.fixture(scope="module")
def one_machine(data_dir, tmp_path_factory) -> Path:
    """The reference: the same recipe on one machine, 2 CPU ranks (cpu_ddp.yaml)."""
    out = tmp_path_factory.mktemp("one_machine") / "run"
    result = subprocess.run(launch("cpu_ddp.yaml") + train_args(data_dir, out), cwd=REPO_ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, launch_failure(result)
    return out


def test_two_machines_train_checkpoint_and_resume_like_one(data_dir, one_machine, tmp_path):
    out = tmp_path / "run"
    lines = run_two_machines(data_dir, out)
    assert len(training_log_lines(lines)) == STEPS
    expected = logged_history(one_machine, STEPS)
    assert [entry["step"] for entry in expected] == list(range(1, STEPS + 1))
    assert logged_history(out, STEPS) == expected
    assert (out / "model.safetensors").exists()
    # Each rank saved its own RNG state into the shared checkpoint folder.
    assert {p.name for p in (out / f"checkpoint-{SAVE}").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                       "rng_state_1.pth"}

    # Resume from the middle checkpoint, as after a node failure: the second half is trained again and
    # matches too.
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    (out / "model.safetensors").unlink()
    lines = run_two_machines(data_dir, out, "--resume_from_checkpoint=auto")
    assert len(training_log_lines(lines)) == STEPS - SAVE  # only the steps after the checkpoint
    assert logged_history(out, STEPS) == expected
    assert set(COMPARED) <= set(expected[0])


def test_the_slurm_template_node_part_starts_both_machines(data_dir, one_machine, tmp_path):
    """accelerate_configs/slurm_multi_node.sbatch runs once per node under `srun`; here its two node tasks are
    started by hand with the variables srun sets, and must train like the one-machine run."""
    out = tmp_path / "run"
    port = free_port()
    processes = []
    for node in (0, 1):
        env = {**ENV, "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": str(node), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "EMBER_ACCELERATE_CONFIG": str(CONFIGS / "multi_node_cpu_ddp.yaml"),
               "PROCESSES_PER_NODE": "1", "PYTHON": sys.executable}
        command = ["bash", str(SBATCH_TEMPLATE), "--node-task", *train_args(data_dir, out)[1:]]
        processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=600) for p in processes]
    for node, (process, (_, stderr)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"node {node}:\n{stderr[-3000:]}"
    assert logged_history(out, STEPS) == logged_history(one_machine, STEPS)


def test_the_slurm_template_runs_under_slurm(slurm, data_dir, one_machine, tmp_path):
    """The whole template under a real (one-machine) Slurm: sbatch, srun one task per node, accelerate launch.
    One node here, so 2 CPU ranks on it; the same losses as the one-machine run."""
    out = tmp_path / "run"
    env = {**slurm, **{k: v for k, v in ENV.items() if k not in slurm or k.startswith(("OMP", "TOKENIZERS"))},
           "EMBER_ACCELERATE_CONFIG": str(CONFIGS / "multi_node_cpu_ddp.yaml"), "PROCESSES_PER_NODE": "2",
           "PYTHON": sys.executable}
    log = tmp_path / "slurm-%j.out"
    job = subprocess.run(["sbatch", "--wait", "--nodes=1", f"--output={log}", str(SBATCH_TEMPLATE),
                          *train_args(data_dir, out)[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert job.returncode == 0, f"{job.stderr[-2000:]}\n{logs[-3000:]}"
    assert logged_history(out, STEPS) == logged_history(one_machine, STEPS)
