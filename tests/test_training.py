"""Trainer plumbing: parameter groups and AdamW, packed-batch collation and document masking, the
throughput and non-finite-gradient callbacks, LR schedules and gradient accumulation, through a real
`Trainer` on CPU with tiny models and real packed shards."""

import json
import logging
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from data_prep.config import PackConfig, TokenizerConfig
from data_prep.packing import pack_documents
from data_prep.token_dataset import PackedDataset
from data_prep.tokenizer import train_tokenizer
from training.callbacks import (
    EtaCallback,
    NonFiniteGuardCallback,
    ThroughputCallback,
    device_peak_flops,
    format_log,
    peak_memory_gb,
)
from training.optim import decay_parameter_names, lr_scheduler_kwargs
from training.trainer import PretrainingTrainer, collate_packed

VOCAB = 320
SEQ_LEN = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """One packed shard of stdlib paragraphs (documents of a few to ~100 tokens), seq_len 32."""
    root = tmp_path_factory.mktemp("data")
    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    tokenizer = train_tokenizer([text], TokenizerConfig(vocab_size=VOCAB), root / "tokenizer")
    assert len(tokenizer) <= VOCAB
    documents = [{"text": paragraph, "kind": "text"} for paragraph in text.split("\n\n") if paragraph.strip()]
    pack_documents(documents, tokenizer, root / "tokens" / "s0", PackConfig(seq_len=SEQ_LEN))
    return root / "tokens"


@pytest.fixture(scope="module")
def dataset(shards) -> PackedDataset:
    return PackedDataset(shards, return_position_ids=True)


def small_model(**overrides):
    return tiny_model(vocab_size=VOCAB, **overrides)


# --- parameter groups and optimizer ---------------------------------------------------------------------------

DECAYED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                    "up_proj.weight", "down_proj.weight", "lm_head.weight", "mlp.gate.weight",
                    "experts.gate_up_proj", "experts.down_proj")


def trainer_param_groups(model, tmp_path: Path, weight_decay: float = 0.1) -> list[dict]:
    """The parameter groups of the AdamW that `PretrainingTrainer` builds for `model`."""
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=weight_decay, use_cpu=True, report_to=[])
    return PretrainingTrainer(model=model, args=args).create_optimizer().param_groups


@pytest.mark.parametrize("overrides", [
    dict(),  # untied, RMSNorm, RoPE
    dict(tie_word_embeddings=True, norm_type="layernorm", position_embedding_type="learned",
         attention_bias=True, mlp_bias=True, mlp_type="gelu"),
    dict(tie_word_embeddings=True, num_local_experts=4, num_experts_per_tok=2),
], ids=["untied-rmsnorm", "tied-layernorm-learned-biases", "moe"])
def test_decay_groups_split_every_trainable_parameter_once(overrides, tmp_path):
    model = small_model(**overrides)
    model.model.layers[1].input_layernorm.weight.requires_grad_(False)  # frozen: in neither group
    decay, no_decay = trainer_param_groups(model, tmp_path)
    assert set(decay_parameter_names(model)) == {name for name, p in model.named_parameters()
                                                  if any(p is q for q in decay["params"])}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)

    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}  # parameters() yields tied tensors once
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable

    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if n.endswith(DECAYED_SUFFIXES) and p.requires_grad}
    assert all(p.ndim >= 2 for p in decay["params"])
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in not_decayed
    assert all(n.endswith(("norm.weight", "bias", "embed_tokens.weight", "embed_positions.weight"))
               for n in not_decayed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if overrides.get("position_embedding_type") == "learned":
        assert "model.embed_positions.weight" in not_decayed
        assert any(n.endswith("norm.bias") for n in not_decayed) and any(".o_proj.bias" in n for n in not_decayed)


def test_trainer_builds_adamw_with_the_decay_split_and_args_hyperparameters(tmp_path):
    model = small_model(tie_word_embeddings=True, norm_type="layernorm", position_embedding_type="learned")
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-6, weight_decay=0.1, use_cpu=True, report_to=[])
    optimizer = PretrainingTrainer(model=model, args=args).create_optimizer()
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (0.8, 0.95)
    assert optimizer.defaults["eps"] == 1e-6
    decayed = set(decay_parameter_names(model))
    expected = [[id(p) for n, p in model.named_parameters() if p.requires_grad and (n in decayed) == wanted]
                for wanted in (True, False)]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == expected


@pytest.mark.parametrize("implementation", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_adamw_leaves_parameters_without_gradient_untouched(implementation):
    # What the non-finite guard relies on: grad None means no update, no decay, no moment or step change.
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5, **implementation)
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    weights = {k: v.clone() for k, v in layer.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    for param in layer.parameters():
        param.grad = None
    optimizer.step()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(optimizer.state[layer.weight][k], v) for k, v in moments.items())


# --- collation and document masking ---------------------------------------------------------------------------

def test_collate_packed_loss_is_cross_entropy_over_every_position(dataset):
    examples = [dataset[i] for i in (0, 5, 9)]
    batch = collate_packed(examples)
    assert set(batch) == {"input_ids", "labels", "shift_labels", "position_ids"}
    for key, tensor in batch.items():
        assert tensor.shape == (3, SEQ_LEN) and tensor.dtype == torch.long and tensor.is_contiguous(), key
    assert torch.equal(batch["labels"], batch["shift_labels"])
    assert batch["labels"].data_ptr() != batch["shift_labels"].data_ptr()
    assert torch.equal(batch["input_ids"][1], examples[1]["input_ids"])
    assert torch.equal(batch["position_ids"][2], examples[2]["position_ids"])
    assert "position_ids" not in collate_packed([{k: v for k, v in e.items() if k != "position_ids"}
                                                 for e in examples])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collate_packed([{"input_ids": e["input_ids"], "position_ids": e["position_ids"]} for e in examples])
    with pytest.raises(ValueError, match="different keys"):
        collate_packed([examples[0], {"input_ids": examples[1]["input_ids"], "shift_labels": examples[1]["input_ids"]}])

    model = small_model()
    with torch.no_grad():
        output = model(**batch, use_cache=False)
    manual = F.cross_entropy(output.logits.float().reshape(-1, VOCAB), batch["shift_labels"].reshape(-1))
    torch.testing.assert_close(output.loss, manual)


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    return list(zip(starts, [*starts[1:], len(position_ids)]))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_position_ids_mask_attention_across_documents(dataset, attn_implementation):
    rows = [i for i in range(len(dataset)) if len(document_spans(dataset[i]["position_ids"])) >= 2][:2]
    assert len(rows) == 2
    batch = collate_packed([dataset[i] for i in rows])
    model = small_model(attn_implementation=attn_implementation)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        # Each document run on its own, positions from 0: what the packed row must reproduce.
        separate = torch.zeros_like(packed.logits)
        for row in range(len(rows)):
            for start, end in document_spans(batch["position_ids"][row]):
                alone = model(input_ids=batch["input_ids"][row:row + 1, start:end], use_cache=False)
                separate[row, start:end] = alone.logits[0]
        # With a KV cache, transformers does not derive the document mask from position_ids.
        with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True)

    torch.testing.assert_close(packed.logits, separate, atol=1e-5, rtol=1e-5)
    expected_loss = F.cross_entropy(separate.reshape(-1, VOCAB), batch["shift_labels"].reshape(-1))
    torch.testing.assert_close(packed.loss, expected_loss)
    second_start, second_end = document_spans(batch["position_ids"][0])[1]
    leak = (with_cache.logits[0, second_start:second_end] - separate[0, second_start:second_end]).abs().max()
    assert leak > 1e-3  # the documents do see each other without the mask


# --- callbacks -------------------------------------------------------------------------------------------------

class ScriptedClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_callback_reports_tokens_flops_mfu_and_memory(tmp_path):
    callback = ThroughputCallback(flops_per_token=600.0, tokens_per_step=100, peak_flops_per_device=1e6,
                                  num_devices=2, warmup_steps=2)
    clock = callback.clock = ScriptedClock()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, now in enumerate([10.0, 13.0, 13.5, 14.0, 15.0], start=1):  # steps 1-2: warm-up
        clock.now = now
        state.global_step = step
        callback.on_step_end(args, state, control)
    logs = callback.training_log_metrics()

    # 3 timed steps in 2 s: 150 tokens/s; 600 x 150 / 2 devices = 45 kFLOP/s per device; MFU 0.045.
    assert logs["tokens_per_s"] == pytest.approx(150.0)
    assert logs["tflops_per_device"] == pytest.approx(45e3 / 1e12)
    assert logs["mfu"] == pytest.approx(0.045)
    assert logs["peak_memory_gb"] > 0

    clock.now = 30.0  # an evaluation ran from 15 s to 30 s
    callback.on_evaluate(args, state, control)
    clock.now = 34.0
    callback.on_step_end(args, state, control)
    assert callback.training_log_metrics()["tokens_per_s"] == pytest.approx(25.0)  # one 4 s step, not the eval
    assert callback.training_log_metrics() == {}  # no new steps since the last log


def test_eta_callback_estimates_the_rest_at_a_tenth_a_quarter_and_half(tmp_path, capsys):
    path = tmp_path / "run_report" / "eta.json"
    callback = EtaCallback(warmup_steps=2, min_steps=4, path=path)
    clock = callback.clock = ScriptedClock()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state, control = TrainerState(max_steps=102), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step in range(1, 103):  # steps 1-2 warm up slowly; then 0.5 s a step, 1 s from step 13 on
        clock.now += 5.0 if step <= 2 else 0.5 if step <= 12 else 1.0
        if step == 7:  # a 20 s evaluation before step 7's end: not a step's time
            clock.now += 20.0
            callback.on_evaluate(args, state, control)
            clock.now += 0.5
        state.global_step = step
        callback.on_step_end(args, state, control)
        if step < 12:  # the first window: 10 % of the 100 steps after the warm-up, steps 3-12
            assert callback.estimates == [] and not path.exists()
        if step == 12:  # 10 timed steps of 0.5 s each (the warm-up and the evaluation left out): 90 steps, 45 s
            (first,) = callback.estimates
            assert first["step_seconds"] == pytest.approx(0.5) and first["window"] == [3, 12]
            assert first["remaining_steps"] == 90 and first["remaining_seconds"] == pytest.approx(45.0)
            assert json.loads(path.read_text())["estimates"][0]["remaining_seconds"] == pytest.approx(45.0)
            assert "the 90 steps left take ~45s" in capsys.readouterr().out

    # a quarter (steps 3-27: 10 x 0.5 s + 15 x 1 s = 0.8 s a step, 75 steps left) and half (3-52: 0.9 s, 50 left)
    assert [e["fraction"] for e in callback.estimates] == [0.1, 0.25, 0.5]
    assert [e["at_step"] for e in callback.estimates] == [12, 27, 52]
    assert [e["remaining_seconds"] for e in callback.estimates] == pytest.approx([45.0, 60.0, 45.0])
    # The range: the steps left at the pace of the window's fastest and slowest quarter. At a tenth every step took
    # 0.5 s; at a quarter the first quarter of steps 3-27 took 0.5 s a step, the last two 1 s.
    assert [e["remaining_range_seconds"] for e in callback.estimates[:2]] == [pytest.approx([45.0, 45.0]),
                                                                               pytest.approx([37.5, 75.0])]
    assert len(json.loads(path.read_text())["estimates"]) == 3

    short = EtaCallback(path=tmp_path / "short.json")  # no steps left after any window: no estimate
    state = TrainerState(max_steps=8)
    short.on_train_begin(args, state, control)
    for step in range(1, 9):
        state.global_step = step
        short.on_step_end(args, state, control)
    assert short.estimates == [] and not (tmp_path / "short.json").exists()


def test_device_peak_flops(monkeypatch):
    assert device_peak_flops() is None  # CPU
    assert device_peak_flops(123e12) == 123e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops() == 989e12
    assert device_peak_flops(5e14) == 5e14
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10G")
    assert device_peak_flops() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_memory_gb() > 0.01  # this process's peak resident set


# --- through the Trainer ---------------------------------------------------------------------------------------

class NaNLossTrainer(PretrainingTrainer):
    """Makes the loss NaN (hence every gradient NaN) on the given 1-based optimizer steps."""

    nan_steps: frozenset = frozenset()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step + 1 in self.nan_steps else loss


class WeightRecorder(TrainerCallback):
    """Weights at the start (key 0) and after each optimizer step, and the logs as reporters receive them."""

    def __init__(self):
        self.weights, self.logs = {}, []

    def _record(self, state, model):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(output_dir, dataset, *, max_steps, batch_size=2, accumulation=1, trainer_cls=PretrainingTrainer,
          callbacks=(), resume_from_checkpoint=None, **overrides) -> Trainer:
    model = small_model().train()
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, weight_decay=0.1, use_cpu=True, seed=0,
        remove_unused_columns=False,
        **{"logging_steps": 1, "disable_tqdm": True, "save_strategy": "no", "report_to": [], **overrides},
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collate_packed,
                          callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def weights_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def training_logs(trainer: Trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def test_nan_step_is_skipped_and_training_goes_on(tmp_path, dataset):
    guard, recorder = NonFiniteGuardCallback(max_consecutive=3), WeightRecorder()
    throughput = ThroughputCallback(flops_per_token=1e6, tokens_per_step=2 * SEQ_LEN, peak_flops_per_device=1e12,
                                    num_devices=1)
    NaNLossTrainer.nan_steps = frozenset({3})
    trainer = train(tmp_path, dataset, max_steps=6, trainer_cls=NaNLossTrainer, callbacks=(throughput, guard, recorder))

    weights = recorder.weights
    assert weights_equal(weights[3], weights[2])  # the NaN step changed nothing
    assert not weights_equal(weights[2], weights[1]) and not weights_equal(weights[4], weights[3])
    assert all(value.isfinite().all() for value in weights[6].values())
    assert trainer.state.global_step == 6 and guard.skipped_steps == 1 and guard.stop_reason is None
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {5}  # 6 steps, one skipped: the moments were not updated either

    logs = training_logs(trainer)
    assert sorted(logs) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(entry["loss"]) for entry in logs.values())
    assert [logs[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    # Throughput from step 3 on (steps 1 and 2 are warm-up), in the history and in what reporters received.
    assert "tokens_per_s" not in logs[2] and all("tokens_per_s" in logs[s] for s in range(3, 7))
    assert logs[4]["tflops_per_device"] == pytest.approx(1e6 * logs[4]["tokens_per_s"] / 1e12)
    assert logs[4]["mfu"] == pytest.approx(logs[4]["tflops_per_device"]) and logs[4]["peak_memory_gb"] > 0
    reported = [entry for entry in recorder.logs if "loss" in entry]
    assert [entry["skipped_steps"] for entry in reported] == [0, 0, 1, 1, 1, 1]
    assert all(k in reported[-1] for k in ("tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gb"))


def test_skipped_step_count_survives_a_resume(tmp_path, dataset):
    NaNLossTrainer.nan_steps = frozenset({2})
    saving = dict(save_strategy="steps", save_steps=3)
    train(tmp_path, dataset, max_steps=3, trainer_cls=NaNLossTrainer, callbacks=(NonFiniteGuardCallback(),), **saving)
    guard = NonFiniteGuardCallback()  # a new process's guard starts from zero
    resumed = train(tmp_path, dataset, max_steps=5, trainer_cls=NaNLossTrainer, callbacks=(guard,),
                    resume_from_checkpoint=str(tmp_path / "checkpoint-3"), **saving)

    assert guard.skipped_steps == 1 and guard.consecutive == 0
    logs = training_logs(resumed)
    assert [logs[s]["skipped_steps"] for s in (4, 5)] == [1, 1]


@pytest.mark.parametrize("tied", [True, False])
def test_resume_warns_only_about_weights_really_missing(tmp_path, tied):
    trainer = PretrainingTrainer(model=small_model(tie_word_embeddings=tied),
                                 args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    trainer.save_model(str(tmp_path / "checkpoint"))
    weights = tmp_path / "checkpoint" / "model.safetensors"
    if not tied:  # drop a weight for real
        state = load_file(weights)
        del state["lm_head.weight"]
        save_file(state, weights, metadata={"format": "pt"})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    try:
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))
    finally:
        trainer_logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if "missing keys" in r.getMessage()]
    model = trainer.model
    if tied:
        assert "lm_head.weight" not in load_file(weights) and warnings == []
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert warnings == ["There were missing keys in the checkpoint model loaded: ['lm_head.weight']."]


def test_consecutive_nan_steps_stop_training_with_a_checkpoint(tmp_path, dataset):
    guard, recorder = NonFiniteGuardCallback(max_consecutive=3), WeightRecorder()
    NaNLossTrainer.nan_steps = frozenset(range(2, 100))
    trainer = train(tmp_path, dataset, max_steps=8, trainer_cls=NaNLossTrainer, callbacks=(guard, recorder))

    assert trainer.state.global_step == 4  # steps 2, 3 and 4 skipped, then stop
    assert guard.skipped_steps == 3 and guard.consecutive == 3
    checkpoint = tmp_path / "checkpoint-4"
    assert guard.stop_reason == ("training stopped: 3 consecutive steps had non-finite gradients (last at step 4); "
                                 f"the last checkpoint is in {checkpoint}")
    saved = load_file(checkpoint / "model.safetensors")
    assert weights_equal(saved, {k: recorder.weights[1][k] for k in saved})  # the weights of the last good step
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]


class UnevenlyMaskedTargets(torch.utils.data.Dataset):
    """The packed examples with a different number of leading targets set to -100 in each one."""

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = dict(self.dataset[index])
        example["shift_labels"] = example["shift_labels"].clone()
        example["shift_labels"][: (index * 7) % (SEQ_LEN - 4)] = -100
        return example


def test_gradient_accumulation_matches_the_full_batch(tmp_path, dataset):
    masked = UnevenlyMaskedTargets(dataset)
    # With uneven target counts, the mean over the batch differs from the mean of the micro-batch means:
    # only counting the batch's targets up front (num_items_in_batch) makes accumulation exact.
    batch = collate_packed([masked[i] for i in range(4)])
    model = small_model()
    model(**batch, use_cache=False).loss.backward()
    full_batch = model.lm_head.weight.grad.clone()
    model.zero_grad()
    for i in (0, 2):
        (model(**{k: v[i:i + 2] for k, v in batch.items()}, use_cache=False).loss / 2).backward()
    assert (model.lm_head.weight.grad - full_batch).norm() > 0.1 * full_batch.norm()

    final = {}
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        # Adam divides by sqrt(v) + eps: with the default eps, gradient entries at rounding-noise level
        # turn summation-order differences into visible updates; a larger eps bounds that amplification.
        trainer = train(tmp_path / f"{batch_size}x{accumulation}", masked, max_steps=3, batch_size=batch_size,
                        accumulation=accumulation, adam_epsilon=1e-6)
        final[batch_size] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    start = small_model().state_dict()
    assert not torch.allclose(final[4]["lm_head.weight"], start["lm_head.weight"], atol=1e-3)
    for batch_size in (2, 1):
        for key, value in final[4].items():
            torch.testing.assert_close(final[batch_size][key], value, atol=1e-5, rtol=0, msg=key)


def logged_learning_rates(trainer: Trainer) -> list[float]:
    logs = training_logs(trainer)
    return [logs[step]["learning_rate"] for step in sorted(logs)]


def test_cosine_schedule_ends_at_min_lr(tmp_path, dataset):
    scheduler_type, scheduler_kwargs = lr_scheduler_kwargs("cosine", min_lr_ratio=0.1)
    trainer = train(tmp_path, dataset, max_steps=20, batch_size=1, warmup_steps=2,
                    lr_scheduler_type=scheduler_type, lr_scheduler_kwargs=scheduler_kwargs)
    rates = logged_learning_rates(trainer)
    assert len(rates) == 20 and rates[0] == 0.0 and max(rates) == pytest.approx(1e-3) == rates[2]
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.1)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4)


def test_wsd_schedule_is_flat_then_decays_to_min_lr(tmp_path, dataset):
    scheduler_type, scheduler_kwargs = lr_scheduler_kwargs("wsd", min_lr_ratio=0.1, decay_fraction=0.2, max_steps=20)
    assert scheduler_kwargs["num_decay_steps"] == 4
    trainer = train(tmp_path, dataset, max_steps=20, batch_size=1, warmup_steps=2,
                    lr_scheduler_type=scheduler_type, lr_scheduler_kwargs=scheduler_kwargs)
    rates = logged_learning_rates(trainer)
    assert rates[0] < 1e-3
    # Logged rate i is the schedule at step i: warm-up 0-1, stable 2-15, decay 16-19 (starting from the peak).
    assert rates[2:17] == pytest.approx([1e-3] * 15)
    assert all(a > b for a, b in zip(rates[16:], rates[17:])) and rates[-1] < 0.5e-3
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4)


def test_lr_scheduler_kwargs_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown name"):
        lr_scheduler_kwargs("linear")
    with pytest.raises(ValueError, match="max_steps"):
        lr_scheduler_kwargs("wsd")
    with pytest.raises(ValueError, match="decay_fraction"):
        lr_scheduler_kwargs("wsd", decay_fraction=0.0, max_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_scheduler_kwargs("cosine", min_lr_ratio=1.5)


def test_monitoring_metrics_reach_tensorboard_and_trackio(tmp_path, dataset, monkeypatch):
    """report_to: both local trackers receive the callbacks' metrics with each training log."""
    import sqlite3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tensorboard"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    throughput = ThroughputCallback(flops_per_token=1e6, tokens_per_step=2 * SEQ_LEN, peak_flops_per_device=1e12,
                                    num_devices=1, warmup_steps=1)
    train(tmp_path / "out", dataset, max_steps=3, callbacks=(throughput, NonFiniteGuardCallback()),
          report_to=["tensorboard", "trackio"], project="ember-test", run_name="run")

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/skipped_steps")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/mfu")] == [2, 3]
    with sqlite3.connect(tmp_path / "trackio" / "ember-test.db") as db:
        logged = [json.loads(row[0]) for row in db.execute("SELECT metrics FROM metrics ORDER BY step")]
    steps = [entry for entry in logged if "train/loss" in entry]
    assert len(steps) == 3 and all("train/skipped_steps" in entry for entry in steps)
    assert all("train/tokens_per_s" in entry and "train/mfu" in entry for entry in steps[1:])


def test_training_logs_print_as_lines_of_numbers(tmp_path, dataset, capsys):
    """Written to a file (not a terminal), each log is one line of numbers, and no progress bar is drawn."""
    trainer = train(tmp_path, dataset, max_steps=4, logging_steps=2, disable_tqdm=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 2/4 | loss ") and "grad_norm " in lines[0] and "'" not in lines[0]
    loss = float(lines[0].split("| loss ")[1].split(" |")[0])
    assert loss == pytest.approx(training_logs(trainer)[2]["loss"], rel=1e-3)
    assert any(line.startswith("step 4/4 | train_runtime ") for line in lines)
    assert "it/s]" not in capsys.readouterr().err


def test_format_log_numbers():
    assert format_log({"loss": 7.21634, "tokens_per_s": 12345.6, "epoch": 0.5, "total_flos": 1e12}, 10, 200) == (
        "step 10/200 | loss 7.216 | tokens_per_s 1.235e+04 | epoch 0.5")
    assert format_log({"tokens": 20480, "note": "x"}, 3, 0) == "step 3 | tokens 20,480 | note x"
