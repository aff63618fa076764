"""The one command line (`cli.parse_args`): YAML + `--key=value` parsing into dataclasses, the same rules for
every entry point, `--help` everywhere, and every shipped pretraining recipe parses into its dataclasses."""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from cli import ConfigError, parse_args
from cli.parser import help_text
from recipes import pretrain
from training.arguments import (
    PRETRAIN_PATH_KEYS,
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    renamed_for_installed_transformers,
    training_setting,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TYPES = (ModelArguments, DataArguments, PretrainingArguments, TrainingArguments)
PATH_KEYS = PRETRAIN_PATH_KEYS


def parse_recipe_args(types, argv, path_keys=()):
    return parse_args(types, argv, path_keys=path_keys, renamed=renamed_for_installed_transformers())


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "configs" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_values_overrides_and_number_strings(tmp_path):
    # PyYAML reads 2e-3 (no dot) as a string; numeric fields must still get numbers.
    config = write(tmp_path, {"preset": "125m", "learning_rate": "2e-3", "max_tokens": "1e9",
                              "model_overrides": {"num_hidden_layers": 2}, "output_dir": "out", "use_cpu": True})
    model, data, run, args = parse_recipe_args(TYPES, ["--config", str(config), "--max_steps=7",
                                                       "--weight_decay=0.05", "--preset=nano", "--eval_strategy=no"],
                                               PATH_KEYS)
    assert model.preset == "nano" and model.model_overrides == {"num_hidden_layers": 2}
    assert args.learning_rate == 0.002 and isinstance(args.learning_rate, float)
    assert run.max_tokens == 1e9 and args.max_steps == 7 and args.weight_decay == 0.05
    assert args.eval_strategy == "no"


def test_yaml_no_stays_a_word_for_string_fields(tmp_path):
    config = write(tmp_path, {"save_strategy": False, "position_ids": False, "use_cpu": True})
    _, data, _, args = parse_recipe_args(TYPES, ["--config", str(config)], PATH_KEYS)
    assert args.save_strategy == "no" and data.position_ids is False


def test_relative_paths_resolve_against_the_yaml_or_the_current_directory(tmp_path, monkeypatch):
    config = write(tmp_path, {"data_dir": "../data", "output_dir": "runs/a", "use_cpu": True})
    _, data, _, args = parse_recipe_args(TYPES, ["--config", str(config)], PATH_KEYS)
    assert data.data_dir == str((tmp_path / "data").resolve())
    assert args.output_dir == str((tmp_path / "configs" / "runs" / "a").resolve())
    monkeypatch.chdir(tmp_path)
    _, _, _, args = parse_recipe_args(TYPES, ["--config", str(config), "--output_dir=here"], PATH_KEYS)
    assert args.output_dir == str((tmp_path / "here").resolve())


@pytest.mark.parametrize("argv,message", [
    (["--learning_rat=1"], "learning_rat: unknown key"),
    (["--max_steps=many"], "max_steps: expected an integer, got 'many'"),
    (["--max_steps", "3"], "--max_steps: overrides are written --key=value"),
    (["--config"], "--config: expects a YAML file"),
])
def test_mistakes_are_one_line_errors(tmp_path, argv, message):
    with pytest.raises(ConfigError) as err:
        parse_recipe_args(TYPES, [*argv, "--use_cpu=true"], PATH_KEYS)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_recipe_args(TYPES, ["--config", str(tmp_path / "nope.yaml")], PATH_KEYS)
    broken = tmp_path / "broken.yaml"
    broken.write_text("preset: nano\n  bad: [indent\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        parse_recipe_args(TYPES, ["--config", str(broken)], PATH_KEYS)


@pytest.mark.parametrize("recipe", sorted((REPO_ROOT / "recipes" / "configs").glob("pretrain_*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_parse_and_state_their_hardware(recipe):
    text = recipe.read_text()
    assert text.startswith("# Hardware:") and "Global batch" in text.split("\n\n")[0]
    model, data, run, objective, args = pretrain.parse(["--config", str(recipe), "--use_cpu=true", "--bf16=false",
                                                        "--tf32=false"])
    assert Path(data.data_dir).is_absolute() and Path(args.output_dir).resolve().is_relative_to(REPO_ROOT / "outputs")
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.1, 1.0)
    assert run.schedule in ("cosine", "wsd") and run.min_lr_ratio == 0.1
    objective.check(512)


def test_renamed_training_fields_take_either_transformers_spelling():
    old_fields = {"gradient_checkpointing", "learning_rate"}  # transformers <= 5.22
    new_fields = {"activation_checkpointing", "gradient_checkpointing", "learning_rate"}  # later 5.x
    assert renamed_for_installed_transformers(old_fields) == {"activation_checkpointing": "gradient_checkpointing"}
    assert renamed_for_installed_transformers(new_fields) == {}
    (args,) = parse_recipe_args((TrainingArguments,), ["--output_dir=/tmp/x", "--activation_checkpointing=true"])
    assert training_setting(args, "activation_checkpointing") is True


# ---------------------------------------------------------------------------------------------------------------
# The parser's rules, on a small schema
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Inner:
    n_grams: int = 5
    enabled: bool = True


@dataclass
class Schema:
    streaming: bool = False
    batch_size: int = 1
    rate: float = 0.5
    name: str = ""
    model_overrides: dict = field(default_factory=dict)
    shard_index: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    output: str = ""


@pytest.mark.parametrize("text,value", [("true", True), ("yes", True), ("on", True), ("1", True), ("TRUE", True),
                                        ("false", False), ("no", False), ("off", False), ("0", False)])
def test_booleans_parse_as_booleans(text, value):
    (args,) = parse_args((Schema,), [f"--streaming={text}"])
    assert args.streaming is value


@pytest.mark.parametrize("argv,message", [
    (["--streaming=maybe"], "streaming: expected a boolean, got 'maybe'"),
    (["--model_overrides=[1,2]"], "model_overrides: expected a mapping"),
    (["--batch_size=2.5"], "batch_size: expected an integer, got '2.5'"),
    (["--rate=fast"], "rate: expected a number, got 'fast'"),
    (["--inner.n_gram=3"], "inner.n_gram: unknown key (known: enabled, n_grams)"),
    (["--inner.enabled=sometimes"], "inner.enabled: expected a boolean, got 'sometimes'"),
    (["--batch_sise=2"], "batch_sise: unknown key (did you mean 'batch_size'?"),
    (["--batch_size", "2"], "--batch_size: overrides are written --key=value"),
    (["stray"], "stray: unexpected argument"),
])
def test_bad_values_are_one_line_errors_naming_the_key(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_args((Schema,), argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_values_take_their_field_type_and_nesting_uses_dotted_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (args,) = parse_args((Schema,), ["--name=no", "--rate=2e-3", "--batch_size=4", "--streaming",
                                     "--model_overrides.num_hidden_layers=4", "--model_overrides.tie=true",
                                     "--inner.n_grams=7", "--shard_index=3", "--shard_index=5", "--output=out"],
                         path_keys=("output",))
    assert args.name == "no" and args.rate == 0.002 and args.batch_size == 4 and args.streaming is True
    assert args.model_overrides == {"num_hidden_layers": 4, "tie": True}
    assert args.inner == Inner(n_grams=7, enabled=True) and args.shard_index == [3, 5]
    assert args.output == str(tmp_path / "out")


def test_code_overrides_sit_between_the_yaml_and_the_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 2, "name": "yaml", "inner": {"n_grams": 3}}))
    (args,) = parse_args((Schema,), ["--name=cli"], config=config, overrides={"name": "code", "batch_size": 8})
    assert (args.name, args.batch_size, args.inner.n_grams) == ("cli", 8, 3)


def test_old_space_separated_spelling_is_accepted_with_a_deprecation_line(capsys):
    (args,) = parse_args((Schema,), ["--batch-size", "3"], space_values=True)
    assert args.batch_size == 3
    assert capsys.readouterr().err.splitlines() == ["warning: --batch-size is deprecated, write --batch_size",
                                                    "warning: --batch_size 3 is deprecated, write --batch_size=3"]


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args((Schema,), ["--help"], prog="prog")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for line in ("--streaming=False  (bool)", "--batch_size=1  (int)", "--inner.n_grams=5  (int)",
                 "--model_overrides={}  (mapping)", "--shard_index=[]  (list)"):
        assert line in text


ENTRY_POINTS = [
    ["recipes/pretrain.py"], ["recipes/finetune_lora.py"], ["recipes/quickstart.py"], ["recipes/eval_perplexity.py"],
    ["recipes/eval_downstream.py"], ["recipes/generate.py"], ["-m", "data_prep", "run"],
    ["-m", "data_prep.instructions"], ["-m", "modeling.sizing"], ["-m", "modeling.convert", "to-hf"],
    ["-m", "training.hub"],
    ["-m", "training.average"], ["recipes/finetune_classifier.py"], ["-m", "data_prep.tasks"],
]


@pytest.mark.parametrize("command", ENTRY_POINTS, ids=lambda c: " ".join(c))
def test_every_entry_point_has_help_listing_its_keys(command):
    result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[--config FILE.yaml] [--key=value ...]" in result.stdout
    keys = [line for line in result.stdout.splitlines() if line.startswith("  --")]
    assert len(keys) >= 2 and all("=" in line for line in keys)


def test_a_config_error_under_two_ranks_is_printed_once(tmp_path):
    """Every rank parses the same settings and fails alike; only rank 0 says so."""
    code = ("import sys; from recipes import pretrain; sys.exit(pretrain.main(['--use_cpu=true', "
            f"'--output_dir={tmp_path}', '--streaming=maybe']))")
    outputs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=300, env={**os.environ, "RANK": str(rank), "HF_HUB_OFFLINE": "1"})
               for rank in (0, 1)]
    assert [o.returncode for o in outputs] == [2, 2]
    assert [line for line in outputs[0].stderr.splitlines() if line.startswith("error:")] == [
        "error: streaming: expected a boolean, got 'maybe' (true/false, yes/no, on/off, 1/0)"]
    assert "error:" not in outputs[1].stderr


def test_a_list_positional_takes_every_bare_argument(tmp_path):
    @dataclass
    class Averaging:
        checkpoints: list[str] = field(default_factory=list)
        output: str = ""

    (args,) = parse_args((Averaging,), ["a", "b/c", "--output=out", "d"], positionals=("checkpoints",),
                         path_keys=("checkpoints", "checkpoints.*", "output"))
    cwd = Path.cwd()
    assert args.checkpoints == [str(cwd / "a"), str(cwd / "b" / "c"), str(cwd / "d")]
    assert args.output == str(cwd / "out")
    assert "usage: prog CHECKPOINTS... [--config" in help_text((Averaging,), "prog", "", positionals=("checkpoints",))
