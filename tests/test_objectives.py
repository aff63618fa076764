"""Pretraining objectives (training/objectives.py) and their held-out metrics (evaluation/objectives.py):
which tokens each objective shows and scores, BERT's 80/10/10 rule, prefix splits, UL2's span corruption,
exact loss normalisation under gradient accumulation, and the objective tokens of the tokenizer step."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_data_tokenizer import stdlib_texts
from transformers import TrainingArguments

from data_prep.config import TokenizerConfig
from data_prep.packing import concat_with_eos
from data_prep.token_dataset import block_to_example
from data_prep.tokenizer import (
    DENOISER_TOKENS,
    IM_END,
    IM_START,
    MASK_TOKEN,
    encode_documents,
    sentinel_token_ids,
    special_tokens_for,
    train_tokenizer,
)
from evaluation.objectives import objective_metrics, pseudo_perplexity, token_byte_lengths
from modeling import EmberForCausalLM, EmberForMaskedLM
from training.arguments import ObjectiveArguments
from training.objectives import (
    UL2_MIXTURE,
    MaskedLMCollator,
    PrefixLMCollator,
    UL2Collator,
    build_collator,
    document_index,
    word_start_table,
)
from training.trainer import PretrainingTrainer

SEQ_LEN = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def texts():
    return stdlib_texts(150_000)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, texts):
    cfg = TokenizerConfig(vocab_size=600, mask_token=True, num_sentinel_tokens=24)
    return train_tokenizer(texts, cfg, tmp_path_factory.mktemp("tok") / "objectives")


@pytest.fixture(scope="module")
def blocks(tokenizer, texts):
    """Packed blocks of SEQ_LEN as data_prep lays them out: documents joined by EOS, position ids restarting."""
    short = [text[:400] for text in texts[:40]]  # short documents: several per block
    stream, _ = concat_with_eos(encode_documents(tokenizer, short), tokenizer.eos_token_id, np.dtype(np.uint16))
    count = (len(stream) - 1) // SEQ_LEN
    return [block_to_example(stream[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1], tokenizer.eos_token_id, True)
            for i in range(count)]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_objective_tokens_come_after_the_reserved_slots_and_only_when_asked(tokenizer):
    default = special_tokens_for(TokenizerConfig())
    assert default == ["<|endoftext|>", "<|pad|>", IM_START, IM_END, "<|fim_prefix|>", "<|fim_middle|>",
                       "<|fim_suffix|>", *(f"<|reserved_{i}|>" for i in range(8))]
    asked = special_tokens_for(TokenizerConfig(model="unigram", mask_token=True, num_sentinel_tokens=2))
    assert asked == [*default, MASK_TOKEN, *DENOISER_TOKENS.values(), "<|sentinel_0|>", "<|sentinel_1|>", "<|unk|>"]
    assert tokenizer.mask_token == MASK_TOKEN and tokenizer.mask_token_id == 15
    assert tokenizer.convert_tokens_to_ids(list(DENOISER_TOKENS.values())) == [16, 17, 18]
    assert sentinel_token_ids(tokenizer) == list(range(19, 43))
    assert MASK_TOKEN not in tokenizer.decode(encode_documents(tokenizer, ["x = 1"])[0])


# ---------------------------------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------------------------------


def test_only_masked_positions_carry_labels_and_special_tokens_are_never_masked(tokenizer, blocks):
    collator = MaskedLMCollator(tokenizer, mask_rate=0.3, generator=generator())
    batch = collator(blocks[:8])
    original = torch.stack([b["input_ids"] for b in blocks[:8]])
    labelled = batch["labels"] != -100
    assert labelled.any()
    assert torch.equal(batch["labels"][labelled], original[labelled])
    assert torch.equal(batch["input_ids"][~labelled], original[~labelled])  # unlabelled tokens are untouched
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert special.any() and not (labelled & special).any()
    assert torch.equal(batch["position_ids"], torch.stack([b["position_ids"] for b in blocks[:8]]))


def test_mask_rate_and_the_80_10_10_rule_hold_on_1e5_draws(tokenizer):
    plain = torch.tensor([i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)])
    ids = plain[torch.randint(len(plain), (10, 10_000), generator=generator(1))]
    selected = MaskedLMCollator(tokenizer, mask_rate=0.15, generator=generator(2)).select(ids)
    assert selected.float().mean().item() == pytest.approx(0.15, abs=0.01)
    inputs, labels = MaskedLMCollator(tokenizer, mask_rate=1.0, generator=generator(3)).mask_tokens(ids)
    assert (labels != -100).all()  # every one of the 1e5 tokens is a draw
    masked = (inputs == tokenizer.mask_token_id).float().mean().item()
    kept = (inputs == ids).float().mean().item()
    replaced = ((inputs != ids) & (inputs != tokenizer.mask_token_id)).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert replaced == pytest.approx(0.1, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)
    assert not torch.isin(inputs, torch.tensor(sorted(set(tokenizer.all_special_ids) - {15}))).any()


def test_whole_word_masking_selects_every_piece_of_a_word(tokenizer, blocks):
    starts = word_start_table(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" the xyzzyplugh")["input_ids"])
    assert [bool(starts[tokenizer.convert_tokens_to_ids(p)]) for p in pieces][0] is True
    assert not all(starts[tokenizer.convert_tokens_to_ids(p)] for p in pieces)  # the made-up word splits
    collator = MaskedLMCollator(tokenizer, mask_rate=0.3, whole_word_mask=True, generator=generator())
    ids = torch.stack([b["input_ids"] for b in blocks[:16]])
    selected = collator.select(ids)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    continues = ~starts[ids] & ~special
    continues[:, 0] = False
    continues[:, 1:] &= ~special[:, :-1]
    # a piece that continues a word is selected exactly when the piece before it is
    assert torch.equal(selected[:, 1:][continues[:, 1:]], selected[:, :-1][continues[:, 1:]])
    assert 0.15 < selected.float().mean().item() < 0.45


def test_a_tokenizer_without_mask_token_is_a_one_line_error(tokenizer, tmp_path):
    plain = train_tokenizer(stdlib_texts(20_000), TokenizerConfig(vocab_size=300), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"^tokenizer\.mask_token: .*mask_token: true\)$"):
        build_collator(ObjectiveArguments(objective="mlm"), plain, SEQ_LEN)


# ---------------------------------------------------------------------------------------------------------------
# Prefix LM
# ---------------------------------------------------------------------------------------------------------------


def test_prefix_lm_splits_each_document_and_scores_only_its_suffix(tokenizer, blocks):
    collator = PrefixLMCollator(tokenizer, 0.25, 0.75, generator=generator())
    batch = collator(blocks[:8])
    eos = tokenizer.eos_token_id
    for row in range(8):
        ids, blocks_row, targets = batch["input_ids"][row], batch["block_sequence_ids"][row], batch["shift_labels"][row]
        document, position = document_index(ids, eos)
        assert torch.equal(position, batch["position_ids"][row])
        for doc in document.unique().tolist():
            here = document == doc
            length = int(here.sum())
            prefix = int((blocks_row[here] == doc).sum())
            assert torch.equal(blocks_row[here][:prefix], torch.full((prefix,), doc))
            assert (blocks_row[here][prefix:] == -1).all()
            if length > 1:
                assert 1 <= prefix <= length - 1 and abs(prefix / length - 0.5) <= 0.25 + 1 / length
            start = int(here.nonzero()[0])
            # positions predicting a prefix token are not scored; those predicting a suffix token are
            assert (targets[start : start + prefix - 1] == -100).all()
            inside = targets[start + max(prefix - 1, 0) : start + length - 1]
            assert torch.equal(inside, batch["input_ids"][row][start + max(prefix, 1) : start + length])
    assert torch.equal(batch["labels"], batch["shift_labels"])


def test_fixed_prefix_tokens_and_a_prefix_longer_than_the_block(tokenizer, blocks):
    collator = build_collator(ObjectiveArguments(objective="prefix_lm", prefix_tokens=5), tokenizer, SEQ_LEN)
    batch = collator(blocks[:4])
    for ids, row in zip(batch["input_ids"], batch["block_sequence_ids"]):
        document, _ = document_index(ids, tokenizer.eos_token_id)
        lengths = torch.bincount(document)
        assert torch.equal(torch.bincount(row[row >= 0], minlength=len(lengths)), (lengths - 1).clamp(max=5))
    with pytest.raises(ValueError, match=r"^prefix_tokens: 64 is not shorter than the blocks \(64 tokens\)"):
        build_collator(ObjectiveArguments(objective="prefix_lm", prefix_tokens=64), tokenizer, SEQ_LEN)
    with pytest.raises(ValueError, match=r"^prefix_min_fraction: "):
        ObjectiveArguments(objective="prefix_lm", prefix_min_fraction=0.8, prefix_max_fraction=0.5).check(SEQ_LEN)
    with pytest.raises(ValueError, match=r"^objective: "):
        ObjectiveArguments(objective="span").check(SEQ_LEN)


# ---------------------------------------------------------------------------------------------------------------
# UL2
# ---------------------------------------------------------------------------------------------------------------


def undo_corruption(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """Put each target span back in place of its sentinel."""
    spans, current = {}, None
    for token in targets:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    return [t for token in inputs for t in (spans[token] if token in sentinels else [token])]


def test_ul2_examples_reconstruct_the_block_and_score_only_the_targets(tokenizer, blocks):
    collator = UL2Collator(tokenizer, SEQ_LEN, generator=generator())
    sentinels = sentinel_token_ids(tokenizer)
    modes = {tokenizer.convert_tokens_to_ids(token): mode for mode, token in DENOISER_TOKENS.items()}
    seen = {mode: 0 for mode in DENOISER_TOKENS}
    for block in blocks[:40]:
        example = collator.example(block["input_ids"])
        ids, prefix = example["input_ids"], int((example["block_sequence_ids"] == 0).sum())
        assert (example["block_sequence_ids"][prefix:] == -1).all() and prefix >= 2
        mode = modes[int(ids[0])]
        seen[mode] += 1
        scored = example["shift_labels"] != -100
        first, last = int(scored.nonzero()[0]), int(scored.nonzero()[-1])
        assert first == prefix - 1 and scored[first : last + 1].all()  # one run, from the last input on
        targets = example["shift_labels"][first : last + 1]
        assert torch.equal(ids[prefix : last + 2], targets)
        inputs = ids[1:prefix].tolist()
        if mode == "s":
            restored = inputs + targets.tolist()
            assert not set(restored) & set(sentinels)
        else:
            assert targets[0] == sentinels[0] and inputs.count(sentinels[0]) == 1
            restored = undo_corruption(inputs, targets.tolist(), sentinels)
        assert restored == block["input_ids"][: len(restored)].tolist()
        assert (ids[last + 2 :] == tokenizer.pad_token_id).all()
    assert all(count > 0 for count in seen.values()), seen


def test_ul2_needs_the_tokenizers_sentinels(tokenizer, tmp_path):
    few = train_tokenizer(stdlib_texts(20_000), TokenizerConfig(vocab_size=300, num_sentinel_tokens=2),
                          tmp_path / "few")
    with pytest.raises(ValueError, match=r"^tokenizer\.num_sentinel_tokens: .* needs the denoiser tokens and \d+ "):
        build_collator(ObjectiveArguments(objective="ul2"), few, SEQ_LEN)
    assert len(UL2_MIXTURE) == 7


# ---------------------------------------------------------------------------------------------------------------
# Loss normalisation under gradient accumulation, through the pretraining Trainer (with its z-loss)
# ---------------------------------------------------------------------------------------------------------------


def one_step(model, collator, examples, batch_size: int, accumulation: int, tmp_path) -> dict[str, torch.Tensor]:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0,
                             optim="sgd", lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no", seed=0, data_seed=0,
                             max_grad_norm=0.0, dataloader_num_workers=0)
    PretrainingTrainer(model=model, args=args, train_dataset=examples, data_collator=collator, z_loss=1e-2).train()
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("objective", ["prefix_lm", "mlm", "ul2"])
def test_accumulated_steps_equal_one_big_batch(objective, tokenizer, blocks, tmp_path):
    """Two micro-batches of 2 rows make the same update as one batch of 4: the loss and the z-loss are each
    normalised by the scored tokens of the whole accumulated batch, however unevenly the rows hold them."""
    config = tiny_config(vocab_size=len(tokenizer), is_causal=objective != "mlm", pad_token_id=1)
    model_class = EmberForMaskedLM if objective == "mlm" else EmberForCausalLM
    if objective in ("mlm", "ul2"):  # the same draws for both runs: corrupt once, then collate the fixed examples
        corrupt = (MaskedLMCollator(tokenizer, mask_rate=0.3, generator=generator()) if objective == "mlm"
                   else UL2Collator(tokenizer, SEQ_LEN, generator=generator()))
        fixed = corrupt(blocks[:4])
        examples = [{key: value[i] for key, value in fixed.items()} for i in range(4)]
        scored = [int((example.get("shift_labels", example["labels"]) != -100).sum()) for example in examples]
        assert len(set(scored)) > 1  # rows score different numbers of tokens
        collator = lambda rows: {key: torch.stack([r[key] for r in rows]) for key in rows[0]}  # noqa: E731
    else:  # a fixed prefix draws nothing at random
        examples, collator = blocks[:4], PrefixLMCollator(tokenizer, prefix_tokens=7)
    weights = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = model_class._from_config(config, attn_implementation="sdpa")
        weights.append(one_step(model, collator, examples, batch_size, accumulation, tmp_path / f"{batch_size}"))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_z_loss_of_a_masked_lm_counts_the_masked_positions_only(tokenizer, blocks, tmp_path):
    torch.manual_seed(0)
    model = EmberForMaskedLM(tiny_config(vocab_size=len(tokenizer), is_causal=False)).train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = PretrainingTrainer(model=model, args=args, z_loss=1e-2)
    inputs = MaskedLMCollator(tokenizer, mask_rate=0.3, generator=generator())(blocks[:2])
    loss = trainer.compute_loss(model, inputs)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
    keep = inputs["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], inputs["labels"][keep])
    z = torch.logsumexp(logits[keep], dim=-1).square().mean()
    torch.testing.assert_close(loss.detach(), ce + 1e-2 * z, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def test_token_byte_lengths_add_up_to_the_text(tokenizer, texts):
    lengths = token_byte_lengths(tokenizer)
    for text in (texts[3][:2000], "naïve café ✓ — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"):
        ids = encode_documents(tokenizer, [text])[0]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.eos_token_id] == 0 and lengths[tokenizer.mask_token_id] == 0


def test_objective_metrics_match_the_models_own_loss(tokenizer, blocks):
    torch.manual_seed(0)
    model = EmberForMaskedLM(tiny_config(vocab_size=len(tokenizer), is_causal=False)).eval()
    collator = MaskedLMCollator(tokenizer)
    metrics = objective_metrics(model, blocks, collator, batch_size=4, max_blocks=8, seed=5)
    rebatched = objective_metrics(model, blocks, collator, batch_size=3, max_blocks=8, seed=5)
    for key in ("tokens", "loss", "accuracy"):  # the masks do not depend on the batching
        assert rebatched[key] == pytest.approx(metrics[key], rel=1e-6)
    collator.generator = generator(5)
    losses = []
    for start in range(8):  # the same masks, block by block, through the model's loss
        batch = collator(blocks[start : start + 1])
        with torch.no_grad():
            out = model(**batch)
        losses.append((out.loss.item(), int((batch["labels"] != -100).sum())))
    mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert metrics["loss"] == pytest.approx(mean, rel=1e-5) and metrics["tokens"] == sum(n for _, n in losses)
    assert 0 <= metrics["accuracy"] <= 1


def test_suffix_bits_per_byte_counts_only_suffix_bytes(tokenizer, blocks):
    torch.manual_seed(0)
    model = EmberForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    lengths = token_byte_lengths(tokenizer)
    collator = PrefixLMCollator(tokenizer, prefix_tokens=10)
    metrics = objective_metrics(model, blocks, collator, byte_lengths=lengths, max_blocks=6)
    batch = collator(blocks[:6])
    scored = batch["shift_labels"] != -100
    assert metrics["tokens"] == int(scored.sum())
    assert metrics["bytes"] == int(lengths[batch["shift_labels"][scored]].sum())
    nats = metrics["loss"] * metrics["tokens"]
    assert metrics["bits_per_byte"] == pytest.approx(nats / (np.log(2) * metrics["bytes"]))


def test_pseudo_perplexity_masks_each_token_in_turn(tokenizer, blocks):
    torch.manual_seed(0)
    model = EmberForMaskedLM(tiny_config(vocab_size=len(tokenizer), is_causal=False)).eval()
    result = pseudo_perplexity(model, blocks, tokenizer.mask_token_id, tokenizer.all_special_ids, max_blocks=1,
                               max_tokens=6, batch_size=4)
    ids, positions = blocks[0]["input_ids"], blocks[0]["position_ids"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    nll = 0.0
    for index in torch.nonzero(~special).squeeze(1)[:6].tolist():
        masked = ids.clone()
        masked[index] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=masked[None], position_ids=positions[None]).logits[0, index]
        nll -= logits.log_softmax(-1)[ids[index]].item()
    assert result["tokens"] == 6
    assert result["pseudo_perplexity"] == pytest.approx(np.exp(nll / 6), rel=1e-5)
