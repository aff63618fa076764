"""The bidirectional encoder (is_causal=False), prefix-LM blocks in a decoder, and the task heads:
masked LM, sequence classification, token classification (save, load, remote code)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_EMBER, tiny_config
from test_modeling import random_ids
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from modeling import (
    EmberForCausalLM,
    EmberForMaskedLM,
    EmberForSequenceClassification,
    EmberForTokenClassification,
    EmberModel,
)
from modeling.loading import load_model

ENCODERS = {
    "rope": {},
    "alibi": dict(position_embedding_type="alibi"),
    "relative": dict(position_embedding_type="relative", relative_attention_num_buckets=8,
                     relative_attention_max_distance=16),
    "learned": dict(position_embedding_type="learned"),
    "sliding-window": dict(sliding_window=3),
    "bert-like": dict(norm_placement="post", norm_type="layernorm", mlp_type="gelu", attention_bias=True,
                      mlp_bias=True, position_embedding_type="learned", tie_word_embeddings=True),
    "modern": dict(qk_norm=True, mlp_type="geglu", norm_placement="sandwich"),
}
encoder_params = pytest.mark.parametrize("overrides", list(ENCODERS.values()), ids=list(ENCODERS))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def encoder(attn: str = "sdpa", seed: int = 0, head=EmberForMaskedLM, **overrides):
    torch.manual_seed(seed)
    model = head._from_config(tiny_config(is_causal=False, **overrides), attn_implementation=attn)
    return model.eval()


def hidden(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.model(**inputs).last_hidden_state


@encoder_params
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_tokens_see_later_tokens(overrides, attn):
    model = encoder(attn, **overrides)
    ids = random_ids(length=12)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 128
    a, b = hidden(model, input_ids=ids), hidden(model, input_ids=changed)
    window = overrides.get("sliding_window")
    seen = slice(9 - window, 9) if window else slice(0, 9)
    assert (a[:, seen] - b[:, seen]).abs().amax(-1).min() > 1e-5  # every earlier token in reach changes
    if window:  # each of the 2 layers reaches `window` tokens further; tokens beyond that do not change
        reach = 9 - 2 * window
        torch.testing.assert_close(a[:, :reach], b[:, :reach], rtol=0, atol=1e-6)


@encoder_params
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_keeps_packed_documents_apart(overrides, attn):
    model = encoder(attn, **overrides)
    lengths = [5, 7, 4]
    docs = [random_ids(batch=1, length=n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    changed = packed.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 128  # inside the second document
    a = hidden(model, input_ids=packed, position_ids=position_ids)
    b = hidden(model, input_ids=changed, position_ids=position_ids)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[:, 12:], b[:, 12:], rtol=0, atol=1e-6)
    alone = torch.cat([hidden(model, input_ids=d) for d in docs], dim=1)
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-5)


@encoder_params
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_does_not_change_the_other_tokens(overrides, attn):
    model = encoder(attn, **overrides)
    ids = random_ids(batch=1, length=9)
    plain = hidden(model, input_ids=ids)
    padded = torch.cat([ids, torch.full((1, 4), 3)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(hidden(model, input_ids=padded, attention_mask=mask)[:, :9], plain,
                               rtol=1e-5, atol=1e-5)
    other_pad = padded.clone()
    other_pad[:, 9:] = 77
    torch.testing.assert_close(hidden(model, input_ids=other_pad, attention_mask=mask)[:, :9], plain,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rope", "alibi", "relative", "sliding-window", "modern"])
def test_encoder_backends_agree(name):
    ids = random_ids()
    position_ids = torch.cat([torch.arange(6), torch.arange(10)]).unsqueeze(0)
    reference = hidden(encoder("eager", **ENCODERS[name]), input_ids=ids, position_ids=position_ids)
    # flex attention runs forward-only on CPU and compiles for seconds: one case, the window over packed documents
    backends = ("sdpa", "flex_attention") if name == "sliding-window" else ("sdpa",)
    for attn in backends:
        other = hidden(encoder(attn, **ENCODERS[name]), input_ids=ids, position_ids=position_ids)
        torch.testing.assert_close(other, reference, rtol=1e-4, atol=1e-4, msg=attn)


def test_encoder_refuses_a_cache_and_decoder_heads():
    model = encoder()
    with pytest.raises(ValueError, match="^use_cache"):
        model.model(input_ids=random_ids(), use_cache=True)
    with pytest.raises(ValueError, match="^block_sequence_ids"):
        model.model(input_ids=random_ids(), block_sequence_ids=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="^is_causal: EmberForMaskedLM"):
        EmberForMaskedLM(tiny_config())


def prefix_blocks(prefix: int, length: int) -> torch.Tensor:
    return torch.tensor([[0] * prefix + [-1] * (length - prefix)])


@pytest.mark.parametrize("overrides", [{}, dict(position_embedding_type="alibi"),
                                       dict(position_embedding_type="relative", relative_attention_num_buckets=8,
                                            relative_attention_max_distance=16)],
                         ids=["rope", "alibi", "relative"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_lm_blocks_are_bidirectional_inside_the_prefix_and_causal_after(overrides, attn):
    torch.manual_seed(0)
    model = EmberForCausalLM._from_config(tiny_config(**overrides), attn_implementation=attn).eval()
    ids = random_ids(batch=1, length=12)
    blocks = prefix_blocks(6, 12)
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 128  # a prefix token
    late = ids.clone()
    late[0, 8] = (late[0, 8] + 1) % 128  # a suffix token
    with torch.no_grad():
        run = lambda x: model(input_ids=x, block_sequence_ids=blocks, use_cache=False).logits  # noqa: E731
        base, prefix_changed, suffix_changed = run(ids), run(changed), run(late)
    assert (base[0, :4] - prefix_changed[0, :4]).abs().amax(-1).min() > 1e-5  # earlier prefix tokens see it
    torch.testing.assert_close(base[0, :8], suffix_changed[0, :8], rtol=0, atol=1e-6)  # nothing sees the future
    # The prefix then decodes with a cache like any prompt: one prefix forward, then token by token.
    with torch.no_grad():
        out = model(input_ids=ids[:, :6], block_sequence_ids=blocks[:, :6], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(6, 12):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), base, rtol=1e-5, atol=1e-5)


def test_prefix_blocks_of_packed_documents_stay_apart():
    torch.manual_seed(0)
    model = EmberForCausalLM._from_config(tiny_config(), attn_implementation="sdpa").eval()
    docs = [random_ids(batch=1, length=n, seed=i) for i, n in enumerate([6, 8])]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(6), torch.arange(8)]).unsqueeze(0)
    blocks = torch.tensor([[0, 0, 0, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1]])
    with torch.no_grad():
        packed_logits = model(input_ids=packed, position_ids=position_ids, block_sequence_ids=blocks,
                              use_cache=False).logits
        alone = torch.cat([model(input_ids=docs[0], block_sequence_ids=prefix_blocks(3, 6), use_cache=False).logits,
                           model(input_ids=docs[1], block_sequence_ids=prefix_blocks(4, 8), use_cache=False).logits],
                          dim=1)
    torch.testing.assert_close(packed_logits, alone, rtol=1e-5, atol=1e-5)


def test_masked_lm_loss_counts_only_labelled_positions_and_accumulates_exactly():
    model = encoder(seed=1).train()
    ids = random_ids(batch=4, length=12)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 5]] = ids[0, [1, 5]]
    labels[1, 3] = ids[1, 3]
    labels[2, [0, 2, 4, 6, 8]] = ids[2, [0, 2, 4, 6, 8]]
    out = model(input_ids=ids, labels=labels)
    picked = labels != -100
    manual = torch.nn.functional.cross_entropy(out.logits[picked], labels[picked])
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    num_items = int(picked.sum())
    for rows in (slice(0, 1), slice(1, 4)):
        model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_classification_heads_and_their_losses():
    config = dict(pad_token_id=0, num_labels=3)
    ids = random_ids(batch=3, length=10)
    ids[ids == 0] = 1
    ids[0, 7:] = 0  # right padding of the first text
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2, 1])
    for pooling in ("mean", "last"):  # an encoder pools by the mean unless told otherwise
        sequence = encoder(head=EmberForSequenceClassification, **config,
                           **({} if pooling == "mean" else {"classifier_pooling": "last"}))
        assert sequence.config.classifier_pooling == pooling
        with torch.no_grad():
            out = sequence(input_ids=ids, attention_mask=mask, labels=labels)
            trunk = sequence.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert out.logits.shape == (3, 3)
        if pooling == "mean":
            pooled = sequence.score((trunk * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
            with torch.no_grad():  # without a mask, the pooling still leaves out pad_token_id positions
                unmasked = sequence.model(input_ids=ids).last_hidden_state
                expected = sequence.score((unmasked * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
                torch.testing.assert_close(sequence(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        else:
            pooled = sequence.score(trunk[torch.arange(3), torch.tensor([6, 9, 9])])  # the last non-padding token
        torch.testing.assert_close(out.logits, pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(pooled, labels))

    tokens = encoder(head=EmberForTokenClassification, **config)
    tags = torch.randint(0, 3, ids.shape)
    tags[0, 7:] = -100
    with torch.no_grad():
        out = tokens(input_ids=ids, attention_mask=mask, labels=tags)
    assert out.logits.shape == (3, 10, 3)
    kept = tags != -100
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[kept], tags[kept]))
    # a decoder trunk serves the same heads, pooling its last token
    decoder_head = EmberForSequenceClassification(tiny_config(**config))
    assert decoder_head.config.classifier_pooling == "last"
    assert decoder_head(input_ids=ids).logits.shape == (3, 3)
    with pytest.raises(ValueError, match="^classifier_pooling: "):
        tiny_config(classifier_pooling="max")


def test_a_masked_lm_checkpoint_initialises_the_classifiers_trunk(tmp_path):
    mlm = encoder(seed=2, pad_token_id=0)
    mlm.save_pretrained(tmp_path / "mlm")
    saved = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_ember.EmberConfig",
        "AutoModel": "modeling_ember.EmberModel",
        "AutoModelForMaskedLM": "modeling_ember_heads.EmberForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_ember_heads.EmberForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_ember_heads.EmberForTokenClassification",
    }
    for name in ("configuration_ember.py", "modeling_ember.py", "modeling_ember_heads.py"):
        assert (tmp_path / "mlm" / name).is_file()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=4)
    assert type(classifier) is EmberForSequenceClassification and classifier.score.weight.shape == (4, 64)
    for name, param in mlm.model.state_dict().items():
        assert torch.equal(classifier.model.state_dict()[name], param), name
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, mlm(input_ids=ids).logits, rtol=0, atol=0)
    assert type(AutoModel.from_pretrained(tmp_path / "mlm")) is EmberModel


def test_the_loader_puts_a_masked_lm_trunk_under_a_classifier_head(tmp_path):
    """modeling.loading, as the classifier recipe uses it: every trunk weight read from the checkpoint, only the
    scoring layer new; `weights=False` builds the same architecture freshly initialised."""
    mlm = encoder(seed=3, pad_token_id=0)
    mlm.save_pretrained(tmp_path / "mlm")
    labels = {"id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    for head, model_class in (("sequence_classification", EmberForSequenceClassification),
                              ("token_classification", EmberForTokenClassification)):
        classifier = load_model(tmp_path / "mlm", head=head, num_labels=3, **labels)
        assert type(classifier) is model_class and classifier.config.id2label[2] == "c"
        assert not classifier.config.is_causal and classifier.score.out_features == 3
        for name, param in mlm.model.state_dict().items():
            assert torch.equal(classifier.model.state_dict()[name], param), name
        torch.manual_seed(5)
        fresh = load_model(tmp_path / "mlm", head=head, weights=False, num_labels=3, **labels)
        assert type(fresh) is model_class and not fresh.config.is_causal
        assert not torch.equal(fresh.model.embed_tokens.weight, mlm.model.embed_tokens.weight)
        assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in
                                                                      classifier.named_parameters()}
    with pytest.raises(ValueError, match="^head: expected one of"):
        load_model(tmp_path / "mlm", head="regression")


REMOTE_HEADS = WITHOUT_EMBER + textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification
    path = sys.argv[1]
    expected = torch.load(path + "/expected.pt")
    mlm = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
    seq = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=5)
    tok = AutoModelForTokenClassification.from_pretrained(path, trust_remote_code=True, num_labels=7)
    with torch.no_grad():
        logits = mlm(input_ids=expected["ids"]).logits
    print(json.dumps({
        "classes": [type(m).__module__.split(".")[0] + ":" + type(m).__name__ for m in (mlm, seq, tok)],
        "max_diff": (logits - expected["logits"]).abs().max().item(),
        "shapes": [list(seq(input_ids=expected["ids"][:1]).logits.shape),
                   list(tok(input_ids=expected["ids"]).logits.shape)],
        "ember_loaded": any(m.split(".")[0] == "modeling" for m in sys.modules),
    }))
    """
)


def test_heads_load_as_remote_code_in_a_fresh_process_without_ember(tmp_path):
    model = encoder(**ENCODERS["relative"], pad_token_id=0)
    ids = random_ids()
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ckpt" / "expected.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", REMOTE_HEADS, str(tmp_path / "ckpt")], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == ["transformers_modules:EmberForMaskedLM",
                                 "transformers_modules:EmberForSequenceClassification",
                                 "transformers_modules:EmberForTokenClassification"]
    assert report["max_diff"] <= 1e-6
    assert report["shapes"] == [[1, 5], [2, 16, 7]]
    assert not report["ember_loaded"]
