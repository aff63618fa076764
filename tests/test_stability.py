"""Options for better models per unit of compute: the batch-size ramp's token accounting and exact resume, the
block order with empty slots and skipped blocks, EMA math and resume, checkpoint averaging with tied weights,
the z-loss value, the loss-spike test, and bad settings as one-line errors naming the field."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import NANO_CPU, tiny_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from cli import ConfigError
from data_prep.token_dataset import PackedDataset
from recipes import pretrain as pretrain_recipe
from training.data_order import BatchRamp, StepBatchSampler, block_ranges, blocks_of_ranges
from training.ema import EMACallback
from training.plan import RunPlan
from training.spikes import DataState, LossSpikeCallback, judge_blocks
from training.trainer import PretrainingTrainer, collate_packed

pytestmark = pytest.mark.usefixtures("one_torch_thread")



# ---- batch-size warmup ----------------------------------------------------------------------------------------


def test_ramp_grows_linearly_in_tokens_and_keeps_the_token_budget_exact():
    ramp = BatchRamp(micro_tokens=1000, accumulation=8, start_tokens=2000, warmup_tokens=40_000)
    steps = ramp.schedule(max_tokens=100_500)
    assert steps[0] == 2 and steps[-1] <= 8 and max(steps) == 8
    assert steps == sorted(steps[:-1]) + steps[-1:]  # never shrinks, except the last step taking what is left
    assert sum(steps) * 1000 == 101_000  # the budget in whole micro-batches, exactly
    done = 0
    for count in steps[:-1]:
        expected = max(2, min(8, int((2000 + 6000 * min(done, 40_000) / 40_000) // 1000)))
        assert count == expected, (done, count)
        done += count * 1000
    full = BatchRamp(micro_tokens=1000, accumulation=8).schedule(max_steps=5)
    assert full == [8] * 5
    assert sum(BatchRamp(1000, 8, 0, 40_000).schedule(max_steps=3)) == 3  # start 0: one micro-batch


def test_step_sampler_lays_out_slots_and_skipped_blocks_leave_earlier_positions_alone():
    sampler = StepBatchSampler(num_blocks=20, batch_size=2, world_size=2, accumulation=3, steps=[1, 2, 3], seed=0,
                               shuffle=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 * 3 * 2
    assert batches[:6] == [[], [], [], [], [0, 1], [2, 3]]  # step 1: two empty slots, then one real slot per rank
    assert batches[6:12] == [[], [], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert sampler.blocks_of_steps(2, 2) == list(range(4, 12)) and sampler.blocks_through(3) == 24
    assert batches[12:] == [[12, 13], [14, 15], [16, 17], [18, 19], [0, 1], [2, 3]]  # the second pass begins
    assert sampler.epoch_at(3) == 24 / 20

    # Skipping the blocks of step 2 changes nothing before it, and step 2 then reads what step 3 read.
    skipping = StepBatchSampler(20, 2, 2, 3, [1, 2, 3], seed=0, shuffle=False, skipped=range(4, 12))
    again = list(skipping)
    assert again[:6] == batches[:6] and again[6:12] == [[], [], [12, 13], [14, 15], [16, 17], [18, 19]]
    assert not set(skipping.blocks_of_steps(1, 3)) & set(range(4, 12))  # nor in the second pass

    shuffled = StepBatchSampler(20, 2, 2, 3, [3, 3], seed=7)
    order = [block for batch in shuffled for block in batch]
    assert sorted(order[:20]) == list(range(20)) and order[:20] != list(range(20))
    assert order == [block for batch in StepBatchSampler(20, 2, 2, 3, [3, 3], seed=7) for block in batch]
    assert block_ranges([9, 3, 4, 5]) == [[3, 6], [9, 10]] and blocks_of_ranges([[3, 6], [9, 10]]) == {3, 4, 5, 9}


class ReadCountingDataset(PackedDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def __getitem__(self, index):
        self.reads.append(int(index))
        return super().__getitem__(index)


def ramp_trainer(data_dir: Path, out: Path, steps: list[int], **kwargs) -> PretrainingTrainer:
    model = tiny_model(vocab_size=512, max_position_embeddings=64, seed=0)
    model.config.use_cache = False
    args = TrainingArguments(output_dir=str(out), max_steps=len(steps), per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, save_steps=3, logging_steps=1, use_cpu=True,
                             report_to="none", seed=0, remove_unused_columns=False, dataloader_num_workers=0,
                             disable_tqdm=True)
    dataset = ReadCountingDataset(data_dir / "tokens" / "train", return_position_ids=True)
    plan = RunPlan(seq_len=dataset.seq_len, micro_batch_size=2, accumulation=4, data_parallel=1, max_steps=len(steps),
                   step_micro_batches=tuple(steps))
    return PretrainingTrainer(model=model, args=args, data_collator=collate_packed, train_dataset=dataset, plan=plan,
                              **kwargs)


def history(trainer: PretrainingTrainer, keys=("step", "epoch", "loss", "grad_norm", "batch_tokens")) -> list[dict]:
    return [{k: e.get(k) for k in keys} for e in trainer.state.log_history if "loss" in e]


def test_ramped_run_trains_exactly_its_tokens_and_resumes_exactly(data_dir, tmp_path):
    steps = [1, 1, 2, 3, 4, 4]
    full = ramp_trainer(data_dir, tmp_path / "run", steps)
    full.train()
    assert sorted(full.train_dataset.reads) == sorted(set(full.train_dataset.reads))  # no block twice
    assert len(full.train_dataset.reads) == sum(steps) * 2  # exactly the ramp's blocks, none for the empty slots
    logged = history(full)
    assert [e["batch_tokens"] for e in logged] == [count * 2 * 64 for count in steps]
    assert logged[-1]["epoch"] == sum(steps) * 2 / len(full.train_dataset)

    resumed = ramp_trainer(data_dir, tmp_path / "run", steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert history(resumed) == logged  # bit for bit, epoch included
    assert resumed.train_dataset.reads == full.train_dataset.reads[(1 + 1 + 2) * 2:]  # nothing consumed read again


def test_warmup_longer_than_the_run_and_other_bad_settings_are_one_line_errors(data_dir, tmp_path, capsys):
    base = {"data_dir": str(data_dir), "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 4, "max_steps": 10}
    for overrides, message in (
            ({"batch_size_warmup_tokens": 10_000},
             "batch_size_warmup_tokens: 10,000 tokens is not shorter than the run ("),
            ({"batch_size_warmup_tokens": 1000, "gradient_accumulation_steps": 1},
             "batch_size_warmup_tokens: the batch grows by gradient accumulation"),
            ({"loss_spike_zscore": 5, "save_strategy": "no"},
             "loss_spike_zscore: a rollback needs checkpoints to go back to"),
            ({"ema_decay": 1.5}, "ema_decay: must be in (0, 1), got 1.5"),
            ({"ema_decay": 0.0}, "ema_decay: must be in (0, 1), got 0.0"),
            ({"z_loss": -1.0}, "z_loss: must be >= 0, got -1.0"),
            ({"optimizer": "adam"}, "optimizer: unknown optimizer 'adam'; choose one of adamw, muon"),
            ({"loss_spike_window": 1}, "loss_spike_window: must be >= 2 steps, got 1")):
        assert pretrain_recipe.main(config=NANO_CPU, overrides={**base, **overrides}) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (overrides, lines)


# ---- EMA and checkpoint averaging -----------------------------------------------------------------------------


def test_ema_follows_the_recurrence_and_swaps_in_and_out():
    model = torch.nn.Linear(3, 2)
    ema = EMACallback(0.9)
    args, state, control = None, TrainerState(), TrainerControl()
    ema.on_train_begin(args, state, control, model=model)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.on_step_end(args, state, control)
        for name, p in model.named_parameters():
            expected[name] = 0.9 * expected[name] + 0.1 * p.detach()
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=0, atol=1e-6)
    current = model.weight.detach().clone()
    with ema.swapped_in():
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, current)
    with pytest.raises(ValueError, match=r"ema_decay: must be in \(0, 1\), got 1"):
        EMACallback(1.0)


def test_ema_state_is_checkpointed_and_a_resumed_run_continues_the_same_average(data_dir, tmp_path):
    steps = [4] * 6
    full = ramp_trainer(data_dir, tmp_path / "run", steps, ema=EMACallback(0.8))
    full.train()
    assert (tmp_path / "run" / "checkpoint-3" / "ema_state.pt").is_file()
    resumed = ramp_trainer(data_dir, tmp_path / "run", steps, ema=EMACallback(0.8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for name, tensor in full.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], tensor), name
    weights = dict(full.model.named_parameters())
    assert any(not torch.equal(weights[name], tensor) for name, tensor in full.ema.shadow.items())


@pytest.mark.parametrize("tied", [True, False])
def test_average_of_checkpoints_is_the_mean_and_keeps_ties(tmp_path, capsys, tied):
    from modeling.loading import load_model
    from training import average

    folders = []
    for seed in (1, 2, 3):
        tiny_model(seed=seed, tie_word_embeddings=tied).save_pretrained(tmp_path / f"c{seed}")
        folders.append(tmp_path / f"c{seed}")
    assert average.main([*map(str, folders), f"--output={tmp_path / 'avg'}"]) == 0
    loaded = load_model(tmp_path / "avg")
    parts = [dict(tiny_model(seed=seed, tie_word_embeddings=tied).named_parameters()) for seed in (1, 2, 3)]
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, sum(part[name] for part in parts) / 3, rtol=0, atol=1e-7)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    if not tied:
        embed = sum(part["model.embed_tokens.weight"] for part in parts) / 3
        assert not torch.allclose(loaded.lm_head.weight, embed)
    capsys.readouterr()
    assert average.main([str(folders[0]), "--output=x"]) == 2
    assert capsys.readouterr().err == "error: checkpoints: give two or more checkpoint folders to average\n"


# ---- z-loss --------------------------------------------------------------------------------------------------


def test_z_loss_adds_the_mean_squared_log_normaliser_to_the_training_loss_only(tmp_path):
    model = tiny_model().train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = PretrainingTrainer(model=model, args=args, data_collator=collate_packed, z_loss=1e-2)
    ids = torch.randint(0, 128, (2, 9))
    inputs = collate_packed([{"input_ids": row[:-1], "shift_labels": row[1:]} for row in ids])
    inputs["shift_labels"][0, :3] = -100  # ignored positions count neither in the loss nor in the z-loss
    inputs["labels"] = inputs["shift_labels"].clone()
    loss = trainer.compute_loss(model, inputs)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"]).logits
    keep = inputs["shift_labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], inputs["shift_labels"][keep])
    z = torch.logsumexp(logits[keep], dim=-1).square().mean()
    torch.testing.assert_close(loss.detach(), ce + 1e-2 * z, rtol=1e-5, atol=1e-6)
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert math.isclose(logs["z_loss"], float(z), rel_tol=1e-5)
    model.eval()  # evaluation: the plain language-model loss
    torch.testing.assert_close(trainer.compute_loss(model, inputs).detach(), ce, rtol=1e-5, atol=1e-6)


# ---- loss spikes ---------------------------------------------------------------------------------------------


def test_spike_detector_flags_only_a_loss_far_above_the_window():
    detector = LossSpikeCallback(zscore=4.0, window=5)
    state, control = TrainerState(), TrainerControl()
    losses = iter([5.0, 4.9, 5.1, 4.95, 5.05, 5.02, float("nan"), 5.15, 9.0])
    detector.step_loss = lambda: next(losses)
    for step in range(1, 10):
        state.global_step = step
        control.should_save = True
        detector.on_step_end(None, state, control)
        if step < 9:
            assert detector.spike is None and not control.should_training_stop, step
    assert detector.spike["spike_step"] == 9 and detector.spike["loss"] == 9.0 and detector.spike["zscore"] > 4
    assert control.should_training_stop and not control.should_save
    assert detector.losses == [5.1, 4.95, 5.05, 5.02, 5.15]  # the last 5 finite non-spike losses
    assert json.loads(json.dumps(detector.state()))["attributes"]["losses"] == detector.losses

    state_on_disk = DataState({1, 2, 3, 7}, [{"spike_step": 9, "rollback": 1}])
    assert DataState.from_json(json.loads(json.dumps(state_on_disk.to_json()))) == state_on_disk
    newer = DataState({8}, [{"spike_step": 12, "rollback": 2}])
    newer.merge(state_on_disk)
    assert newer.skipped == {1, 2, 3, 7, 8} and [e["rollback"] for e in newer.rollbacks] == [1, 2]


def test_blocks_are_judged_against_the_blocks_trained_before():
    reference = [4.0, 4.2, 3.9, 4.1, 4.0, 4.3, 3.8, 9.0]  # one odd reference block does not move the line
    center, spread, anomalous = judge_blocks(reference, {10: 4.4, 11: 7.5, 12: 4.0, 13: 6.1}, zscore=5.0)
    assert center == 4.05 and 5.0 < center + 5 * spread < 6.1
    assert anomalous == [11, 13]
    # A reference with no spread at all still has a line: 2% of its median per standard deviation.
    assert judge_blocks([5.0] * 6, {1: 5.4, 2: 5.6}, zscore=5.0) == (5.0, 0.1, [2])


def test_a_shift_restarts_the_spike_window_at_its_checkpoint():
    state = DataState(set(), [{"spike_step": 9, "rollback": 1, "resumed_from_step": 5, "decision": "skip"},
                              {"spike_step": 30, "rollback": 2, "resumed_from_step": 25, "decision": "shift"}])
    assert state.restarts() == {25}
    detector = LossSpikeCallback(zscore=4.0, window=5)
    detector.restart_at = state.restarts()
    for step, kept in ((20, 3), (25, 0)):
        trainer_state = TrainerState(global_step=step, stateful_callbacks={
            "LossSpikeCallback": {"attributes": {"losses": [5.0, 5.1, 4.9]}}})
        detector.on_train_begin(None, trainer_state, TrainerControl())
        assert len(detector.losses) == kept


def test_bad_options_reach_the_trainer_as_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="z_loss: must be >= 0"):
        PretrainingTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                           z_loss=-1.0)


def test_a_streamed_run_ramps_its_batch_and_resumes_exactly(data_dir, tmp_path):
    """A stream cannot take empty slots from a sampler: the trainer pads each ramped step itself."""
    from data_prep.documents import open_document_stream
    from data_prep.pipeline import packing_settings
    from data_prep.token_dataset import StreamingPackedDataset
    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_dir / "tokenizer")

    def run(resume: str | None = None) -> PretrainingTrainer:
        stream = StreamingPackedDataset(open_document_stream(data_dir / "documents" / "train"), tokenizer,
                                        packing_settings(data_dir), return_position_ids=True)
        model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=64, seed=0)
        model.config.use_cache = False
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=3, save_steps=2, logging_steps=1, use_cpu=True,
                                 report_to="none", seed=0, remove_unused_columns=False, dataloader_num_workers=0,
                                 disable_tqdm=True)
        plan = RunPlan(seq_len=stream.seq_len, micro_batch_size=2, accumulation=3, data_parallel=1, max_steps=5,
                       step_micro_batches=(1, 2, 2, 3, 3))
        trainer = PretrainingTrainer(model=model, args=args, data_collator=collate_packed, train_dataset=stream,
                                     plan=plan)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    logged = history(full)
    assert [e["batch_tokens"] for e in logged] == [n * 2 * 64 for n in (1, 2, 2, 3, 3)]
    assert [e["epoch"] for e in logged] == [step / 5 for step in range(1, 6)]
    # The stream stopped after exactly the ramp's blocks: its saved position is that many examples in.
    for step, blocks in ((2, 3 * 2), (4, 8 * 2)):
        state = json.loads((tmp_path / "run" / f"checkpoint-{step}" / "stream_state_0.json").read_text())
        reference = StreamingPackedDataset(open_document_stream(data_dir / "documents" / "train"), tokenizer,
                                           packing_settings(data_dir))
        examples = iter(reference)
        for _ in range(blocks):
            next(examples)
        assert {k: v for k, v in state.items() if k != "world_size"} == reference.state_dict()
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    assert history(resumed) == logged
