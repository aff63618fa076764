"""The data pipeline's YAML schema: one dataclass per section, validated on load.

A pipeline YAML maps onto `PipelineConfig`. Unknown keys and wrong types fail with a one-line
`ConfigError` naming the dotted key (`dedup.minhash.treshold: unknown key`). Relative paths in a
YAML resolve against the YAML's own directory; relative paths given as `--key=value` overrides
resolve against the current directory, where the user typed them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A pipeline config problem; the message is one line that names the key."""


@dataclass
class SourceConfig:
    """One input. `type` picks where documents come from:

    - `hub`: `datasets.load_dataset(path, name, split=split, revision=revision, streaming=True)`;
      `path` may also be a local dataset folder.
    - `local`: files or globs in `paths` (jsonl, jsonl.gz, jsonl.zst, parquet, txt) or directories of
      text/code files (`extensions` picks which).
    - `stdlib`: the running interpreter's standard library (`.py` sources and pydoc topics).
    """

    name: str
    type: Literal["hub", "local", "stdlib"] = "local"
    paths: list[str] = field(default_factory=list)
    path: str | None = None
    config_name: str | None = None
    split: str = "train"
    revision: str | None = None
    text_field: str = "text"
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py", ".rst"])
    kind: Literal["text", "code"] = "text"
    weight: float = 1.0
    stage: int = 0
    max_docs: int | None = None


@dataclass
class MixtureConfig:
    seed: int = 0
    # first_exhausted stops a stage when its first source runs dry (the report says which sources
    # were not read to the end); all_exhausted repeats sources until each has been read once.
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"


@dataclass
class CleanConfig:
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    html_to_text: bool = False
    normalize_whitespace: bool = True
    remove_urls: bool = False


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000


@dataclass
class CodeFilterConfig:
    enabled: bool = True
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanum_fraction: float = 0.25


@dataclass
class LanguageFilterConfig:
    enabled: bool = False
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.65


@dataclass
class FiltersConfig:
    """Which filters run on which kind of source. Text filters skip code sources and vice versa."""

    min_chars: int = 1
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: bool = True
    c4_lines: bool = True
    fineweb: bool = True
    code: CodeFilterConfig = field(default_factory=CodeFilterConfig)
    language: LanguageFilterConfig = field(default_factory=LanguageFilterConfig)


@dataclass
class PIIConfig:
    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ip_addresses: bool = True
    card_numbers: bool = True


@dataclass
class ToxicityConfig:
    # A user-supplied word list, one term per line; documents containing more than `max_hits`
    # listed terms are removed. Empty means the filter is off.
    wordlist: str | None = None
    max_hits: int = 0


@dataclass
class MinHashConfig:
    enabled: bool = True
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1
    # Mapping every digit run to "0" merges number-heavy documents (tables, logs, code) that
    # differ only in their numbers; keep numbers by default.
    normalize_numbers: bool = False


@dataclass
class DedupConfig:
    exact: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)


@dataclass
class DecontamConfig:
    eval_files: list[str] = field(default_factory=list)
    ngram: int = 13
    text_field: str = "text"


@dataclass
class TokenizerConfig:
    # An existing tokenizer directory to reuse instead of training one.
    path: str | None = None
    model: Literal["bpe", "unigram", "wordpiece"] = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    train_bytes: int = 200_000_000
    heldout_fraction: float = 0.02
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    fim_tokens: bool = True
    num_reserved_tokens: int = 8
    model_max_length: int = 2048


@dataclass
class PackConfig:
    seq_len: int = 1024
    batch_docs: int = 1000
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    seed: int = 0


@dataclass
class PipelineConfig:
    output_dir: str
    sources: list[SourceConfig]
    num_shards: int = 1
    strict: bool = False
    max_doc_bytes: int = 10_000_000
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ConfigError(f"num_shards: must be >= 1, got {self.num_shards}")
        if not self.sources:
            raise ConfigError("sources: at least one source is required")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique, got {names}")
        for i, source in enumerate(self.sources):
            if source.weight <= 0:
                raise ConfigError(f"sources.{i}.weight: must be > 0, got {source.weight}")
            if source.type == "hub" and not source.path:
                raise ConfigError(f"sources.{i}.path: a hub source needs a dataset name or folder")
            if source.type == "local" and not source.paths:
                raise ConfigError(f"sources.{i}.paths: a local source needs at least one path")
        if self.pack.seq_len < 1:
            raise ConfigError(f"pack.seq_len: must be >= 1, got {self.pack.seq_len}")
        for key in ("fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self.pack, key) <= 1.0:
                raise ConfigError(f"pack.{key}: must be in [0, 1], got {getattr(self.pack, key)}")

    # Directory layout under output_dir, one place so every step agrees.
    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def step_dir(self, step: str) -> Path:
        return self.root / step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys holding paths, rebased against the YAML's directory when relative.
_PATH_KEYS = {"output_dir", "sources.*.paths.*", "sources.*.path", "toxicity.wordlist", "decontam.eval_files.*",
              "tokenizer.path"}


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(value, hints[key], dotted)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a nested dict/list structure, creating mappings as needed."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: no such list item")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{dotted}: no such list item")
        node[int(last)] = value
    else:
        node[last] = value


def _rebase_paths(raw: Any, base: Path, prefix: str = "") -> Any:
    if isinstance(raw, dict):
        return {k: _rebase_paths(v, base, f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_rebase_paths(v, base, f"{prefix}.{i}") for i, v in enumerate(raw)]
    if isinstance(raw, str) and _is_path_key(prefix) and not Path(raw).expanduser().is_absolute():
        return str(base / raw)
    return raw


def _is_path_key(dotted: str) -> bool:
    parts = dotted.split(".")
    for pattern in _PATH_KEYS:
        pat = pattern.split(".")
        if len(pat) == len(parts) and all(p == "*" and q.isdigit() or p == q for p, q in zip(pat, parts)):
            return True
    return False


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a pipeline YAML (or a ready dict), apply `key=value` overrides, validate."""
    if path is not None:
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
        raw = _rebase_paths(loaded, path.resolve().parent)
    raw = dict(raw or {})
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"{item}: overrides are written --key=value")
        parsed = _parse_scalar(value)
        if _is_path_key(key) and isinstance(parsed, str):
            parsed = str(Path(parsed).expanduser().resolve())
        apply_override(raw, key, parsed)
    return _build(PipelineConfig, raw)
