"""Tests of `modeling.convert`: Ember <-> stock Llama / Mistral / Mixtral checkpoints, with equal logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modeling import EmberConfig, EmberForCausalLM
from modeling.convert import ember_config_to_hf, from_hf, hf_config_to_ember, main, to_hf

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
TOLERANCE = 1e-5


def tiny_config(**overrides) -> EmberConfig:
    return EmberConfig.from_preset("nano", **{**TINY, **overrides})


def randomize(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """Give every parameter random values, so zero-initialised biases and unit norms are checked too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + 1.0 if "norm" in name else noise * 2)
    return model.eval()


def save_ember(path: Path, **overrides) -> EmberForCausalLM:
    model = randomize(EmberForCausalLM(tiny_config(**overrides)))
    model.save_pretrained(path)
    return model


def input_ids(seq_len: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def assert_same_logits(a: PreTrainedModel, b: PreTrainedModel, seq_len: int = 24) -> None:
    ids = input_ids(seq_len)
    diff = (a.eval()(ids).logits.float() - b.eval()(ids).logits.float()).abs().max().item()
    assert diff <= TOLERANCE, f"logits differ by {diff}"


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# --- Ember -> stock ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="gqa-tied"),
        pytest.param({"tie_word_embeddings": False}, id="untied"),
        pytest.param({"num_key_value_heads": 1, "head_dim": 32}, id="mqa-wide-heads"),
        pytest.param({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}, id="rope-linear"),
        pytest.param(
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                    "rope_theta": 5e5,
                }
            },
            id="rope-llama3",
        ),
        pytest.param({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, id="rope-yarn"),
        pytest.param({"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}, id="biases"),
    ],
)
def test_to_hf_llama_has_equal_logits(tmp_path: Path, overrides: dict) -> None:
    ember = save_ember(tmp_path / "ember", **overrides)
    assert to_hf(tmp_path / "ember", tmp_path / "hf") == "LlamaForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf) is LlamaForCausalLM
    assert hf.config.tie_word_embeddings == ember.config.tie_word_embeddings
    assert_same_logits(ember, hf)


def test_to_hf_config_has_legacy_keys_and_no_remote_code(tmp_path: Path) -> None:
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    save_ember(tmp_path / "ember", rope_parameters=rope)
    to_hf(tmp_path / "ember", tmp_path / "hf")
    config = read_config(tmp_path / "hf")
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 5e5
    assert config["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 2.0}
    assert config["torch_dtype"] == "float32"
    assert "auto_map" not in config
    assert not list((tmp_path / "hf").glob("*.py"))
    # transformers reads the legacy keys back to the same RoPE settings.
    reloaded = LlamaConfig.from_pretrained(tmp_path / "hf")
    assert {k: v for k, v in reloaded.rope_parameters.items() if k != "type"} == rope


def test_to_hf_default_rope_writes_rope_theta_only(tmp_path: Path) -> None:
    save_ember(tmp_path / "ember")
    to_hf(tmp_path / "ember", tmp_path / "hf")
    config = read_config(tmp_path / "hf")
    assert config["rope_theta"] == 10000.0
    assert "rope_scaling" not in config


def test_to_hf_sliding_window_is_mistral(tmp_path: Path) -> None:
    ember = save_ember(tmp_path / "ember", sliding_window=5, tie_word_embeddings=False)
    assert to_hf(tmp_path / "ember", tmp_path / "hf") == "MistralForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf) is MistralForCausalLM
    assert hf.config.sliding_window == 5
    assert_same_logits(ember, hf, seq_len=20)  # longer than the window, so the window matters


def test_to_hf_qk_norm_is_qwen3(tmp_path: Path) -> None:
    ember = save_ember(tmp_path / "ember", qk_norm=True, attention_bias=True, tie_word_embeddings=False)
    assert to_hf(tmp_path / "ember", tmp_path / "hf") == "Qwen3ForCausalLM"
    config = read_config(tmp_path / "hf")
    assert config["model_type"] == "qwen3" and "auto_map" not in config
    assert not list((tmp_path / "hf").glob("*.py"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf) is Qwen3ForCausalLM and hf.config.attention_bias
    assert_same_logits(ember, hf)


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_to_hf_moe_is_mixtral(tmp_path: Path, sliding_window: int | None) -> None:
    ember = save_ember(tmp_path / "ember", num_local_experts=4, num_experts_per_tok=2, sliding_window=sliding_window)
    assert to_hf(tmp_path / "ember", tmp_path / "hf") == "MixtralForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf) is MixtralForCausalLM
    assert (hf.config.num_local_experts, hf.config.num_experts_per_tok) == (4, 2)
    assert hf.config.sliding_window == sliding_window
    assert_same_logits(ember, hf)
    # Saved in Mixtral's original per-expert layout, the one vLLM, llama.cpp and transformers 4.x read.
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        saved_keys = set(weights.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in saved_keys


def test_to_hf_keeps_dtype_and_copies_side_files(tmp_path: Path) -> None:
    model = randomize(EmberForCausalLM(tiny_config())).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ember")
    (tmp_path / "ember" / "tokenizer.json").write_text('{"fake": true}')
    (tmp_path / "ember" / "tokenizer_config.json").write_text("{}")
    to_hf(tmp_path / "ember", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"position_embedding_type": "learned"}, "position_embedding_type"),
        ({"position_embedding_type": "sinusoidal"}, "position_embedding_type"),
        ({"norm_type": "layernorm"}, "norm_type"),
        ({"mlp_type": "gelu"}, "mlp_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_type": "geglu"}, "mlp_type"),
        ({"position_embedding_type": "relative"}, "position_embedding_type"),
        ({"norm_placement": "post"}, "norm_placement"),
        ({"norm_placement": "sandwich"}, "norm_placement"),
        ({"qk_norm": True, "num_local_experts": 4}, "num_local_experts"),
        ({"qk_norm": True, "sliding_window": 8}, "sliding_window"),
        ({"qk_norm": True, "mlp_bias": True}, "mlp_bias"),
        ({"is_causal": False}, "is_causal"),
        ({"sliding_window": 8, "attention_bias": True}, "attention_bias"),
        ({"sliding_window": 8, "mlp_bias": True}, "mlp_bias"),
        ({"num_local_experts": 4, "attention_bias": True}, "attention_bias"),
        ({"hidden_size": 66, "head_dim": 16}, "num_attention_heads"),
    ],
)
def test_unexportable_settings_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: ") as error:
        ember_config_to_hf(tiny_config(**overrides))
    assert "\n" not in str(error.value)


def test_hidden_dropout_is_dropped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="hidden_dropout"):
        config = ember_config_to_hf(tiny_config(hidden_dropout=0.1, attention_dropout=0.1))
    assert config.attention_dropout == 0.1


def test_to_hf_rejects_non_ember_checkpoint(tmp_path: Path) -> None:
    randomize(LlamaForCausalLM(LlamaConfig(**TINY))).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type"):
        to_hf(tmp_path / "llama", tmp_path / "out")


# --- stock -> Ember ------------------------------------------------------------------------------------------------


def stock_models() -> list:
    common = {**TINY, "rms_norm_eps": 1e-5}
    return [
        pytest.param(LlamaForCausalLM, LlamaConfig(**common, tie_word_embeddings=True), id="llama-tied"),
        pytest.param(
            LlamaForCausalLM,
            LlamaConfig(
                **common,
                attention_bias=True,
                mlp_bias=True,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
            ),
            id="llama-biases-dynamic-rope",
        ),
        pytest.param(MistralForCausalLM, MistralConfig(**common, sliding_window=6), id="mistral"),
        pytest.param(
            MixtralForCausalLM, MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2), id="mixtral"
        ),
        pytest.param(Qwen3ForCausalLM, Qwen3Config(**common, attention_bias=True), id="qwen3"),
    ]


@pytest.mark.parametrize(("model_class", "config"), stock_models())
def test_from_hf_has_equal_logits(tmp_path: Path, model_class: type[PreTrainedModel], config) -> None:
    stock = randomize(model_class(config))
    stock.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    from_hf(tmp_path / "hf", tmp_path / "ember")
    assert (tmp_path / "ember" / "tokenizer.json").is_file()
    assert "auto_map" in read_config(tmp_path / "ember")
    ember = EmberForCausalLM.from_pretrained(tmp_path / "ember")
    assert ember.config.tie_word_embeddings == config.tie_word_embeddings
    assert_same_logits(stock, ember, seq_len=20)


def test_round_trip_ember_hf_ember(tmp_path: Path) -> None:
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    ember = save_ember(tmp_path / "a", rope_parameters=rope, tie_word_embeddings=False, num_local_experts=4)
    to_hf(tmp_path / "a", tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "b")
    back = EmberForCausalLM.from_pretrained(tmp_path / "b")
    assert back.config.rope_parameters == rope
    assert back.config.num_local_experts == 4
    before, after = ember.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert_same_logits(ember, back)


def test_round_trip_keeps_bfloat16(tmp_path: Path) -> None:
    model = randomize(EmberForCausalLM(tiny_config(tie_word_embeddings=False))).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    to_hf(tmp_path / "a", tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "b")
    back = EmberForCausalLM.from_pretrained(tmp_path / "b", dtype="auto")
    assert back.dtype == torch.bfloat16
    before, after = model.state_dict(), back.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_hf_config_to_ember_rejects_other_model_types() -> None:
    with pytest.raises(ValueError, match="^model_type: "):
        hf_config_to_ember(EmberConfig(**TINY))


def test_from_hf_rejects_other_model_types(tmp_path: Path) -> None:
    save_ember(tmp_path / "ember")
    with pytest.raises(ValueError, match="model_type"):
        from_hf(tmp_path / "ember", tmp_path / "out")


# --- command line --------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modeling.convert", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_to_hf(tmp_path: Path) -> None:
    ember = save_ember(tmp_path / "ember")
    result = run_cli("to-hf", str(tmp_path / "ember"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout
    assert_same_logits(ember, AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))


def test_cli_missing_src_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    result = run_cli("to-hf", str(missing), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error:" in last_line and str(missing) in last_line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["to-hf", "from-hf"])
def test_main_rejects_folder_without_config(tmp_path: Path, command: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main([command, str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err


def test_main_reports_unexportable_setting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_ember(tmp_path / "ember", norm_type="layernorm")
    assert main(["to-hf", str(tmp_path / "ember"), str(tmp_path / "out")]) == 2
    assert "error: norm_type: 'layernorm'" in capsys.readouterr().err


def test_main_takes_the_folders_as_settings_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ember = save_ember(tmp_path / "ember")
    assert main(["to-hf", f"--src={tmp_path / 'ember'}", f"--dst={tmp_path / 'hf'}"]) == 0
    assert_same_logits(ember, AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    assert main(["to-gguf-typo", "a", "b"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: to-gguf-typo: unknown command (one of to-hf, from-hf, to-gguf)")
    assert main(["to-hf", str(tmp_path / "ember")]) == 2
    assert capsys.readouterr().err.strip() == "error: dst: required key is missing"
