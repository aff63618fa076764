"""Recipe YAML + `--key=value` parsing, and every shipped pretraining recipe parses into its dataclasses."""

import sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from modeling.recipe_config import RecipeConfigError, for_installed_transformers, parse_recipe_args, training_setting

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "recipes"))
from pretrain import PATH_KEYS, DataArguments, ModelArguments, ObjectiveArguments  # noqa: E402

TYPES = (ModelArguments, DataArguments, ObjectiveArguments, TrainingArguments)


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "configs" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_values_overrides_and_number_strings(tmp_path):
    # PyYAML reads 2e-3 (no dot) as a string; numeric fields must still get numbers.
    config = write(tmp_path, {"preset": "125m", "learning_rate": "2e-3", "max_tokens": "1e9",
                              "model_overrides": {"num_hidden_layers": 2}, "output_dir": "out", "use_cpu": True})
    model, data, _, args = parse_recipe_args(TYPES, ["--config", str(config), "--max_steps=7", "--weight_decay=0.05",
                                                  "--preset=nano", "--eval_strategy=no"], PATH_KEYS)
    assert model.preset == "nano" and model.model_overrides == {"num_hidden_layers": 2}
    assert args.learning_rate == 0.002 and isinstance(args.learning_rate, float)
    assert data.max_tokens == 1e9 and args.max_steps == 7 and args.weight_decay == 0.05
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
    (["--max_steps=many"], "max_steps: expected int, got 'many'"),
    (["--max_steps", "3"], "--max_steps: overrides are written --key=value"),
    (["--config"], "--config: expects a YAML file"),
])
def test_mistakes_are_one_line_errors(tmp_path, argv, message):
    with pytest.raises(RecipeConfigError) as err:
        parse_recipe_args(TYPES, [*argv, "--use_cpu=true"], PATH_KEYS)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(RecipeConfigError, match="config file not found"):
        parse_recipe_args(TYPES, ["--config", str(tmp_path / "nope.yaml")], PATH_KEYS)
    broken = tmp_path / "broken.yaml"
    broken.write_text("preset: nano\n  bad: [indent\n")
    with pytest.raises(RecipeConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        parse_recipe_args(TYPES, ["--config", str(broken)], PATH_KEYS)


@pytest.mark.parametrize("recipe", sorted((REPO_ROOT / "recipes" / "configs").glob("pretrain_*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_parse_and_state_their_hardware(recipe):
    text = recipe.read_text()
    assert text.startswith("# Hardware:") and "Global batch" in text.split("\n\n")[0]
    model, data, objective, args = parse_recipe_args(TYPES, ["--config", str(recipe), "--use_cpu=true",
                                                             "--bf16=false", "--tf32=false"], PATH_KEYS)
    assert Path(data.data_dir).is_absolute() and Path(args.output_dir).resolve().is_relative_to(REPO_ROOT / "outputs")
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.1, 1.0)
    assert data.schedule in ("cosine", "wsd") and data.min_lr_ratio == 0.1
    objective.check(512)


def test_renamed_training_fields_take_either_transformers_spelling():
    old_fields = {"gradient_checkpointing", "learning_rate"}  # transformers <= 5.22
    new_fields = {"activation_checkpointing", "gradient_checkpointing", "learning_rate"}  # later 5.x
    values = {"activation_checkpointing": True, "learning_rate": 1e-3}
    assert for_installed_transformers(values, known=old_fields) == {"gradient_checkpointing": True,
                                                                    "learning_rate": 1e-3}
    assert for_installed_transformers(values, known=new_fields) == values
    (args,) = parse_recipe_args((TrainingArguments,), ["--output_dir=/tmp/x", "--activation_checkpointing=true"])
    assert training_setting(args, "activation_checkpointing") is True
