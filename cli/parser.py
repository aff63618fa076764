"""The one command line of every Ember entry point: `--config FILE.yaml` plus `--key=value` overrides.

    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml --learning_rate=1e-3
    python -m data_prep run --config recipes/configs/data/stdlib.yaml --pack.seq_len=2048 --workers=2
    python -m modeling.sizing --preset=1b --seq_len=2048 --model_overrides.num_local_experts=8

The same rules everywhere:
- Settings are the fields of the entry point's dataclasses. A YAML file (`--config`) holds them; flags
  override them. Keys use underscores; nested settings use dotted keys (`--dedup.minhash.n_grams=7`,
  `--sources.0.max_docs=100`, `--model_overrides.num_hidden_layers=4`). A bare `--flag` sets a boolean true.
- A value is read as its field's type: a boolean from true/false/yes/no/on/off/1/0, an integer refuses 2.5,
  a string field takes the text as typed (`--eval_strategy=no` is the word "no"), lists and mappings are
  YAML (`--tasks='[a, b]'`, `--model_overrides='{num_hidden_layers: 4}'`). A list field given twice collects
  both values.
- Relative paths (the entry point's path keys) resolve against the YAML's folder when they come from the
  YAML, and against the working directory when they are typed on the command line.
- `--help` lists every key with its type and default; `--print_config` prints the settings as they were resolved
  (YAML, then overrides) and exits, without running anything.
- A mistake is a `ConfigError` whose message is one line naming the key, e.g.
  `streaming: expected a boolean, got 'maybe'`; `report_error` prints it once, on the main process.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A settings problem, in one line that names the file or key."""


def error_line(err: BaseException | str) -> str:
    """The first line of an error message, with runs of whitespace collapsed (for `error: ...` lines)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    return " ".join(text.splitlines()[0].split())


def is_main_process() -> bool:
    """Whether this is rank 0 of a launch (torchrun and accelerate set RANK for every process), or no launch."""
    return os.environ.get("RANK", "0") == "0"


INTERRUPTED = 130  # a shell's exit status for a process ended by SIGINT (128 + 2)


def report_error(err: BaseException | str, status: int = 2) -> int:
    """Print `error: <first line>` to stderr on the main process only (every rank fails alike) and return `status`."""
    if is_main_process():
        print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
    return status


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


class _Typed(str):
    """Text typed on the command line: read by its field's type, not by YAML first (`--run_name=no` stays "no")."""


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NONE_TEXT = {"null", "~"}


def _yaml(text: str, key: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read {str(text)!r} as YAML ({getattr(err, 'problem', err)})") from None


def _plain(value: Any, key: str) -> Any:
    """`value` with command-line text read as YAML, at any depth (for fields of no particular type)."""
    if isinstance(value, _Typed):
        return _yaml(str(value), key)
    if isinstance(value, dict):
        return {k: _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{key}.{i}") for i, v in enumerate(value)]
    return value


def _show(value: Any) -> str:
    return repr(str(value)) if isinstance(value, str) else repr(value)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple) or (
        _is_union(annotation) and any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(annotation)))


def _describe(annotation: Any) -> str:
    """A short human name for a field type, for `--help`."""
    if _is_union(annotation):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(dict.fromkeys(_describe(a) for a in arms))
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (list, tuple) or annotation in (list, tuple):
        return "list"
    if origin is dict or annotation is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(str(member.value) for member in annotation)
    if isinstance(annotation, type):
        return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation, annotation.__name__)
    return "value"


def convert(value: Any, annotation: Any, key: str) -> Any:
    """`value` (from YAML or typed on the command line) as `annotation`; a one-line ConfigError when it is not."""
    if annotation is Any or annotation is None or isinstance(annotation, (str, typing.TypeVar)):
        return _plain(value, key)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        if value is None or (isinstance(value, _Typed) and value.lower() in _NONE_TEXT):
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_describe(annotation)}, got null")
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return convert(value, arm, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if value is None:
        raise ConfigError(f"{key}: expected {_describe(annotation)}, got null")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected a boolean, got {_show(value)} (true/false, yes/no, on/off, 1/0)")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if annotation is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        return float(number)
    if annotation is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted `no` as false: `eval_strategy: no` means "no"
            return "yes" if value else "no"
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    if origin is Literal:
        text = str(value) if isinstance(value, _Typed) else value
        if text in args:
            return text
        raise ConfigError(f"{key}: must be one of {list(args)}, got {_show(value)}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        names = [member.value for member in annotation]
        text = value.value if isinstance(value, enum.Enum) else str(value)
        if text in names:
            return text
        raise ConfigError(f"{key}: must be one of {names}, got {_show(value)}")
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, _Typed):
            value = _yaml(str(value), key)
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = args[0] if args else Any
        return [convert(item, item_type, f"{key}.{i}") for i, item in enumerate(items)]
    if origin is dict or annotation is dict:
        if isinstance(value, _Typed):
            value = _yaml(str(value), key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({{key: value, ...}}), got {_describe_value(value)}")
        value_type = args[1] if len(args) == 2 else Any
        return {k: convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, _Typed):
            value = _yaml(str(value), key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe_value(value)}")
        return build(annotation, value, key)
    return _plain(value, key)


def _describe_value(value: Any) -> str:
    kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return f"{kind.get(type(value), type(value).__name__)} {_show(value)}"


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)  # PyYAML reads `2e-3` (no dot) as a string
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Dataclasses
# ---------------------------------------------------------------------------------------------------------------


class FieldInfo(typing.NamedTuple):
    type: Any  # the resolved annotation
    field: dataclasses.Field


@functools.cache
def fields_of(cls: type) -> dict[str, FieldInfo]:
    """The settable fields of a dataclass by name, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: FieldInfo(hints.get(f.name, Any), f) for f in dataclasses.fields(cls) if f.init}


def _unknown(dotted: str, name: str, known: Iterable[str], list_all: bool) -> ConfigError:
    known = sorted(known)
    if list_all:
        return ConfigError(f"{dotted}: unknown key (known: {', '.join(known)})")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{dotted}: unknown key ({hint}--help lists every key)")


def build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a mapping (nested dataclasses from nested mappings), checked."""
    fields = fields_of(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise _unknown(dotted, key, fields, list_all=bool(prefix))
        kwargs[key] = convert(value, fields[key].type, dotted)
    missing = [name for name, info in fields.items() if name not in kwargs
               and info.field.default is dataclasses.MISSING and info.field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a dataclass's own checks (TrainingArguments' __post_init__, ...)
        raise ConfigError(error_line(err) if not prefix else f"{prefix}: {error_line(err)}") from None


def _field_type(schemas: Sequence[type], dotted: str) -> Any:
    """The type of the setting at `dotted` (a top-level field of any schema, or a path into one); None if none."""
    parts = dotted.split(".")
    annotation = next((fields_of(cls)[parts[0]].type for cls in schemas if parts[0] in fields_of(cls)), None)
    for part in parts[1:]:
        if annotation is None:
            return None
        if _is_union(annotation):
            annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if dataclasses.is_dataclass(annotation):
            annotation = fields_of(annotation)[part].type if part in fields_of(annotation) else None
        elif origin in (list, tuple) and part.isdigit():
            annotation = args[0] if args else Any
        elif origin is dict or annotation is dict:
            annotation = args[1] if len(args) == 2 else Any
        else:
            return Any
    return annotation


# ---------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------


def _matches(dotted: str, pattern: str) -> bool:
    parts, wanted = dotted.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(w == "*" and p.isdigit() or w == p for p, w in zip(parts, wanted))


def _under_path_key(dotted: str, path_keys: Iterable[str]) -> bool:
    return any(_matches(dotted, ".".join(p.split(".")[: len(dotted.split("."))])) for p in path_keys)


def _resolve(path: str, base: Path) -> str:
    return str((base / Path(path).expanduser()).resolve()) if path else path


def _rebase(value: Any, base: Path, dotted: str, path_keys: Iterable[str]) -> Any:
    """`value` with every string at a path key made absolute against `base`."""
    path_keys = tuple(path_keys)
    if isinstance(value, dict):
        return {k: _rebase(v, base, f"{dotted}.{k}" if dotted else str(k), path_keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, base, f"{dotted}.{i}", path_keys) for i, v in enumerate(value)]
    if isinstance(value, str) and any(_matches(dotted, p) for p in path_keys):
        resolved = _resolve(value, base)
        return _Typed(resolved) if isinstance(value, _Typed) else resolved
    return value


# ---------------------------------------------------------------------------------------------------------------
# Reading settings
# ---------------------------------------------------------------------------------------------------------------


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, append: bool = False) -> None:
    """Set `a.b.0.c` in a nested mapping/list structure, creating mappings on the way; `append` adds to a list."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: no such list item")
            node = node[int(part)]
        elif isinstance(node, dict):
            child = node.get(part)
            if not isinstance(child, (dict, list)):
                child = node[part] = {}
            node = child
        else:
            raise ConfigError(f"{'.'.join(parts[:i])}: is not a mapping, so {dotted} cannot be set")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{dotted}: no such list item")
        node[int(last)] = value
    elif append:
        earlier = node.get(last)
        if isinstance(earlier, _Typed):
            earlier = _yaml(str(earlier), dotted)
        node[last] = [*(earlier if isinstance(earlier, list) else [earlier]), value]
    else:
        node[last] = value


def dotted_items(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf}: `{"pack": {"seq_len": 64}}` -> `{"pack.seq_len": 64}`, so that
    applied as overrides it sets those leaves only (lists are leaves; a digit key indexes a list)."""
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(dotted_items(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _split_argv(argv: Sequence[str], schemas: Sequence[type], positionals: Sequence[str], space_values: bool,
                renamed: Mapping[str, str]) -> tuple[str | None, list[tuple[str, Any]], str | None]:
    """(the --config path, [(dotted key, value)], "help" or "print_config" when asked) of the command-line tokens."""
    config, pairs, action = None, [], None
    rest, waiting = list(argv), list(positionals)
    while rest:
        token = rest.pop(0)
        if token in ("-h", "--help"):
            action = "help"
            continue
        if token == "--print_config":
            action = action or "print_config"
            continue
        if not token.startswith("--"):
            if not waiting:
                raise ConfigError(f"{token}: unexpected argument (settings are written --key=value)")
            key = waiting[0]
            if not _is_list(_field_type(schemas, key)):  # a list positional takes every bare token that follows
                waiting.pop(0)
            pairs.append((key, _Typed(token)))
            continue
        key, sep, text = token[2:].partition("=")
        if key == "config":
            if not sep:
                if not rest or rest[0].startswith("--"):
                    raise ConfigError("--config: expects a YAML file")
                text = rest.pop(0)
            config = text
            continue
        if "-" in key:
            fixed = key.replace("-", "_")
            warn(f"--{key} is deprecated, write --{fixed}")
            key = fixed
        if key.split(".")[0] in renamed:
            head, _, tail = key.partition(".")
            key = renamed[head] + (f".{tail}" if tail else "")
        annotation = _field_type(schemas, key)
        if not sep:
            if annotation is bool or (_is_union(annotation) and bool in typing.get_args(annotation)):
                text = "true"
            elif space_values and rest and not rest[0].startswith("--"):
                text = rest.pop(0)
                warn(f"--{key} {text} is deprecated, write --{key}={text}")
            else:
                raise ConfigError(f"--{key}: overrides are written --key=value")
        pairs.append((key, _Typed(text)))
    return config, pairs, action


def help_text(schemas: Sequence[type], prog: str, description: str, positionals: Sequence[str] = ()) -> str:
    """Usage, the description, and every key of every schema with its type, default and help."""
    names = "".join(f"{p.upper()}{'...' if _is_list(_field_type(schemas, p)) else ''} " for p in positionals)
    usage = f"usage: {prog} {names}[--config FILE.yaml] [--key=value ...] [--print_config]"
    lines = [usage, ""]
    if description:
        lines += [description.strip(), ""]
    lines += ["Settings (YAML keys; override any of them as --key=value, nested ones as --a.b=value):"]
    for cls in schemas:
        lines += ["", f"{cls.__name__}:"]
        lines += _help_rows(cls, "")
    return "\n".join(lines) + "\n"


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _help_rows(cls: type, prefix: str) -> list[str]:
    rows = []
    for name, (annotation, f) in fields_of(cls).items():
        dotted = f"{prefix}{name}"
        inner = next((a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)), None) \
            if typing.get_origin(annotation) in (list, tuple) else None
        if dataclasses.is_dataclass(annotation):
            rows += _help_rows(annotation, f"{dotted}.")
            continue
        if inner is not None:
            rows.append(f"  --{dotted}={_default_of(f)}  (list of mappings; the keys of each item follow)")
            rows += _help_rows(inner, f"{dotted}.<i>.")
            continue
        default = _default_of(f)
        shown = default.value if isinstance(default, enum.Enum) else default
        text = " ".join(str(f.metadata.get("help", "")).split())
        if len(text) > 110:
            text = text[:107].rsplit(" ", 1)[0] + " ..."
        rows.append(f"  --{dotted}={shown!s}  ({_describe(annotation)})" + (f"  {text}" if text else ""))
    return rows


def parse_args(schemas: Sequence[type], argv: Sequence[str] | None = None, *, prog: str = "", description: str = "",
               config: str | Path | Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
               path_keys: Iterable[str] = (), positionals: Sequence[str] = (), space_values: bool = False,
               renamed: Mapping[str, str] | None = None) -> tuple[Any, ...]:
    """Instances of `schemas` from a YAML (`config`, or `--config` in `argv`), then `overrides`, then `argv`.

    schemas: dataclasses whose top-level fields share one flat namespace (a key goes to every schema that has
        it, as transformers' HfArgumentParser does); nested dataclass fields take dotted keys.
    argv: command-line tokens (`--key=value`, `--flag`, `--config FILE`, `--help`, and `positionals` in order).
    config: a YAML path or a ready mapping (paths in a mapping are taken as they are).
    overrides: typed values set by code (e.g. a chained recipe), applied after the YAML, before `argv`; their
        relative paths resolve against the working directory.
    path_keys: dotted keys holding paths (`*` matches a list index), rebased as the module docstring says.
    space_values: also accept the old `--key value` spelling, with a deprecation line.
    renamed: old key -> new key, applied silently (e.g. a TrainingArguments field transformers renamed).
    `--help` prints `help_text` and exits with status 0.
    """
    path_keys = tuple(path_keys)
    renamed = dict(renamed or {})
    config_path, pairs, action = _split_argv(list(argv or []), schemas, positionals, space_values, renamed)
    if action == "help":
        print(help_text(schemas, prog or Path(sys.argv[0]).name, description, positionals), end="")
        raise SystemExit(0)
    if config_path is not None:
        config = config_path
    raw: dict[str, Any] = {}
    if isinstance(config, Mapping):
        raw = dict(config)
    elif config is not None:
        path = Path(config).expanduser()
        raw = _rebase(read_yaml_mapping(path), path.resolve().parent, "", path_keys)
    raw = {renamed.get(key, key): value for key, value in raw.items()}
    for key, value in (overrides or {}).items():
        set_dotted(raw, renamed.get(key, key), _rebase(value, Path.cwd(), key, path_keys))
    typed_on_command_line: set[str] = set()
    for key, text in pairs:
        value: Any = text
        if _under_path_key(key, path_keys) and not any(_matches(key, p) for p in path_keys):
            value = _yaml(str(text), key)  # a list or mapping of paths
        value = _rebase(value, Path.cwd(), key, path_keys)
        set_dotted(raw, key, value, append=_is_list(_field_type(schemas, key)) and key in typed_on_command_line)
        typed_on_command_line.add(key)

    known = {name for cls in schemas for name in fields_of(cls)}
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise _unknown(unknown[0], unknown[0], known, list_all=False)
    built = tuple(build(cls, {k: v for k, v in raw.items() if k in fields_of(cls)}) for cls in schemas)
    if action == "print_config":
        if is_main_process():
            print(settings_yaml(built), end="")
        raise SystemExit(0)
    return built


def settings_yaml(instances: Sequence[Any]) -> str:
    """Resolved settings as YAML, one mapping per dataclass instance (`--print_config`)."""
    documents = []
    for instance in instances:
        values = instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        plain = json.loads(json.dumps(values, default=lambda v: v.value if isinstance(v, enum.Enum) else str(v)))
        documents.append(f"# {type(instance).__name__}\n" + yaml.safe_dump(plain, sort_keys=False))
    return "\n".join(documents)
