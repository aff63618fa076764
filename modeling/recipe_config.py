"""Recipe arguments: one YAML per recipe, parsed into dataclasses, any key overridable as `--key=value`.

    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml --learning_rate=1e-3 --max_steps=50

The YAML is flat (keys of all the recipe's dataclasses side by side, as `HfArgumentParser` expects);
comments group them. Values are parsed as YAML, so `--warmup_ratio=0.05` is a float and
`--lr_scheduler_kwargs='{min_lr_rate: 0.1}'` a mapping. An unknown key is a one-line error that names
it. Relative paths in the YAML (the keys in `path_keys`) resolve against the YAML's own folder; on the
command line they resolve against the current directory, where they were typed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from data_prep.config import ConfigError, read_yaml_mapping


class RecipeConfigError(ValueError):
    """A recipe config problem, in one line that names the file or key."""


# TrainingArguments fields that transformers renamed in 5.23, under their new name -> the old name (5.22 and older,
# down to the oldest Ember supports). Recipes and code use the new names; they work on either.
RENAMED_TRAINING_FIELDS = {"activation_checkpointing": "gradient_checkpointing"}


def for_installed_transformers(names: dict[str, Any] | list[str] | set[str], known: set[str] | None = None) -> Any:
    """`names` (TrainingArguments keys, or a mapping keyed by them) as the installed transformers spells them."""
    known = known if known is not None else {f.name for f in dataclasses.fields(TrainingArguments)}
    spell = {new: old for new, old in RENAMED_TRAINING_FIELDS.items() if new not in known and old in known}
    if isinstance(names, dict):
        return {spell.get(key, key): value for key, value in names.items()}
    return type(names)(spell.get(key, key) for key in names)


def training_setting(args: TrainingArguments, name: str) -> Any:
    """`args.<name>` under the installed transformers' spelling of `name`."""
    return getattr(args, name) if hasattr(args, name) else getattr(args, RENAMED_TRAINING_FIELDS[name])


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value:
        return str((base / Path(value).expanduser()).resolve())
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Undo two YAML 1.1 surprises: `2e-3` is a string (floats need a dot) and `no` is False."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if isinstance(value, bool) and bool not in (args or (annotation,)):
        return "yes" if value else "no"  # eval_strategy: no
    targets = [a for a in (args or (annotation,)) if a in (int, float)]
    if not isinstance(value, str) or not targets or str in args:
        return value
    for target in targets:
        try:
            return target(value)
        except ValueError:
            continue
    raise RecipeConfigError(f"{key}: expected {targets[0].__name__}, got {value!r}")


def parse_recipe_args(dataclass_types: tuple[type, ...], argv: list[str],
                      path_keys: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """Parse `--config FILE` plus `--key=value` overrides into instances of `dataclass_types`."""
    values: dict[str, Any] = {}
    rest = list(argv)
    if "--config" in rest:
        index = rest.index("--config")
        if index + 1 >= len(rest) or rest[index + 1].startswith("--"):
            raise RecipeConfigError("--config: expects a YAML file")
        config_path = Path(rest[index + 1])
        del rest[index : index + 2]
        try:
            loaded = read_yaml_mapping(config_path)
        except ConfigError as err:
            raise RecipeConfigError(str(err)) from None
        base = config_path.resolve().parent
        values.update({k: _resolve(v, base) if k in path_keys else v for k, v in loaded.items()})
    for item in rest:
        key, sep, text = item.removeprefix("--").partition("=")
        if not item.startswith("--") or not sep:
            raise RecipeConfigError(f"{item}: overrides are written --key=value")
        value = yaml.safe_load(text) if text else ""
        if isinstance(value, bool) and text.lower() not in ("true", "false"):
            value = text  # --eval_strategy=no means "no", not False
        values[key.replace("-", "_")] = _resolve(value, Path.cwd()) if key in path_keys else value
    annotations = {name: hint for cls in dataclass_types for name, hint in _field_types(cls).items()}
    values = for_installed_transformers(values, known=set(annotations))
    unknown = sorted(set(values) - set(annotations))
    if unknown:
        raise RecipeConfigError(f"{unknown[0]}: unknown key (see the recipe's dataclasses and "
                                "transformers.TrainingArguments)")
    values = {key: _coerce(key, value, annotations[key]) for key, value in values.items()}
    # HfArgumentParser validates types and runs each dataclass's __post_init__ (TrainingArguments' checks).
    try:
        return HfArgumentParser(dataclass_types).parse_dict(values)
    except (ValueError, TypeError) as err:
        raise RecipeConfigError(str(err).splitlines()[0]) from None
