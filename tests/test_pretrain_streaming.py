"""The streaming data path of recipes/pretrain.py: documents tokenized and packed on the fly, each rank
reading its own share, and a resume that continues every rank's stream from the checkpoint's
`stream_state_<rank>.json` (not from the start, not by re-reading and dropping batches)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_error, tiny_model
from test_pretrain_resume import training_log_lines
from transformers import TrainingArguments

from data_prep.documents import open_document_stream
from data_prep.token_dataset import StreamingPackedDataset
from data_prep.tokenizer import load_tokenizer
from training.trainer import PretrainingTrainer, collate_packed, is_rank_stream

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CPU_DDP = REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"
SMALL_MODEL = "--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
              "num_attention_heads: 4, num_key_value_heads: 2}"
MAX_STEPS, SAVE_STEPS = 8, 4
COMPARED = ("step", "epoch", "loss", "grad_norm", "learning_rate")


def run_streaming(data_dir: Path, output_dir: Path, *extra: str, ranks: int = 2,
                  expect_status: int = 0) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP)] if ranks == 2
              else [sys.executable])
    command = [*launch, str(RECIPE),
               "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={output_dir}", SMALL_MODEL,
               "--streaming=true", f"--max_steps={MAX_STEPS}", f"--save_steps={SAVE_STEPS}", "--warmup_steps=2",
               "--logging_steps=1", "--eval_strategy=no", "--per_device_train_batch_size=2",
               "--dataloader_num_workers=0", "--disable_tqdm=true", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert result.returncode == expect_status, result.stderr[-3000:]
    return result


def history(output_dir: Path, step: int) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [{key: entry.get(key) for key in COMPARED} for entry in state["log_history"] if "loss" in entry]


def test_two_rank_streaming_run_resumes_each_stream_exactly(data_dir, tmp_path):
    full = tmp_path / "full"
    run_streaming(data_dir, full)
    checkpoint = full / f"checkpoint-{SAVE_STEPS}"
    states = [json.loads((checkpoint / f"stream_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] != states[1]  # each rank has its own position in its own share

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    lines = run_streaming(data_dir, resumed, "--resume_from_checkpoint=auto").stdout.splitlines()
    assert len(training_log_lines(lines)) == MAX_STEPS - SAVE_STEPS
    expected = history(full, MAX_STEPS)
    assert [entry["step"] for entry in expected] == list(range(1, MAX_STEPS + 1))
    assert [entry["epoch"] for entry in expected] == [step / MAX_STEPS for step in range(1, MAX_STEPS + 1)]
    # bitwise: the streams went on from where they were saved; the epoch goes on too, it does not restart at 0
    assert history(resumed, MAX_STEPS) == expected

    # The 2-rank streams resumed by one process: each stream is a share of the documents, so refused.
    alone = tmp_path / "one_process"
    alone.mkdir()
    shutil.copytree(checkpoint, alone / checkpoint.name)
    result = run_streaming(data_dir, alone, "--resume_from_checkpoint=auto", ranks=1, expect_status=2)
    assert recipe_error(result.stderr) == (
        f"error: resume_from_checkpoint: {alone / checkpoint.name} holds the streams of 2 ranks and this run has "
        "1; resume a streaming run with the same number of processes")


def test_rank_shares_are_disjoint_and_cover_the_documents(data_dir):
    documents = data_dir / "documents" / "train"
    everything = [doc["id"] for doc in open_document_stream(documents)]
    shares = [[doc["id"] for doc in open_document_stream(documents, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(everything) and not set(shares[0]) & set(shares[1])


def test_streaming_mistakes_are_one_line_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no document files"):
        open_document_stream(tmp_path)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    stream = StreamingPackedDataset(open_document_stream(data_dir / "documents" / "train"), tokenizer)
    assert is_rank_stream(stream)
    model = tiny_model(vocab_size=len(tokenizer))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, use_cpu=True, report_to="none",
                             remove_unused_columns=False, dataloader_num_workers=2)
    with pytest.raises(ValueError, match="dataloader_num_workers: must be 0"):
        PretrainingTrainer(model=model, args=args, train_dataset=stream, data_collator=collate_packed)
    args.dataloader_num_workers = 0
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=stream, data_collator=collate_packed)
    assert args.ignore_data_skip
    with pytest.raises(ValueError, match=r"stream_state_0\.json: missing"):
        trainer._load_rng_state(str(tmp_path))
