"""The data pipeline's YAML schema: one dataclass per section, validated on load.

A pipeline YAML maps onto `PipelineConfig`. Unknown keys and wrong types fail with a one-line
`ConfigError` naming the dotted key (`dedup.minhash.treshold: unknown key`). Relative paths in a
YAML resolve against the YAML's own directory; relative paths given as `--key=value` overrides
resolve against the current directory, where the user typed them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cli import ConfigError, parse_args

KINDS = ("text", "code")  # what a document is; it picks the filters and cleaning rules
# `kind: auto` decides per file from its name: these extensions are code, every other file is text (compared
# without case: `.s` is also `.S`).
CODE_EXTENSIONS = (
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".hxx", ".m", ".mm", ".s", ".asm", ".rs", ".go", ".py",
    ".pyi", ".pyx", ".java", ".kt", ".scala", ".cs", ".fs", ".swift", ".js", ".mjs", ".ts", ".jsx", ".tsx", ".rb",
    ".php", ".pl", ".pm", ".lua", ".r", ".jl", ".hs", ".ml", ".ex", ".erl", ".clj", ".dart", ".sh", ".bash", ".zsh",
    ".ps1", ".sql", ".cmake", ".mk", ".dts", ".dtsi", ".v", ".sv", ".vhd", ".cu", ".cuh", ".f90", ".zig", ".nim",
)


def _require_at_least_one(section: Any, prefix: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(section, key)}")


@dataclass
class SourceConfig:
    """One input. `type` picks where documents come from:

    - `hub`: `datasets.load_dataset(path, name, split=split, revision=revision, streaming=True)`;
      `path` may also be a local dataset folder.
    - `local`: files or globs in `paths` (jsonl, jsonl.gz, jsonl.zst, parquet, txt), directories of
      text/code files (`extensions` picks which), or tar archives (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz,
      .tar.zst), read member by member without extracting them: `extensions` and the `members` globs
      (on the path inside the archive; `*` also matches `/`) pick which members are documents.
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
    members: list[str] = field(default_factory=list)
    # `auto`: each file (or archive member) by its extension, code for CODE_EXTENSIONS, text otherwise.
    kind: Literal["text", "code", "auto"] = "text"
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
    # Thresholds from the Gopher paper (Rae et al. 2021, appendix A1), as in datatrove.
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3


@dataclass
class C4Config:
    """C4's line filters (Raffel et al. 2020): lines without enough words, "javascript" or cookie-policy lines
    go; documents with too few sentences, lorem ipsum or (optionally) curly brackets go."""

    enabled: bool = True
    min_sentences: int = 5
    min_words_per_line: int = 3
    # The C4 paper keeps only lines ending in terminal punctuation; that drops most lines of
    # hard-wrapped text, so it is off by default, as in FineWeb's C4 step.
    require_terminal_punct: bool = False
    drop_curly_bracket: bool = True


@dataclass
class FineWebConfig:
    """FineWeb's extra quality rules (Penedo et al. 2024), thresholds as published."""

    enabled: bool = True
    min_line_punct_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    max_dup_line_char_ratio: float = 0.01
    max_newline_word_ratio: float = 0.3


@dataclass
class CodeFilterConfig:
    enabled: bool = True
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanum_fraction: float = 0.25
    drop_autogenerated: bool = True
    # Share of a file made of long base64/hex runs above which it is data, not code.
    max_encoded_fraction: float = 0.5


@dataclass
class LanguageFilterConfig:
    enabled: bool = False
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.65


@dataclass
class FiltersConfig:
    """Which filters run on which kind of source. Text filters skip code sources and vice versa."""

    min_chars: int = 1
    # How the Gopher/FineWeb rules count words: "whitespace" splits as the Gopher paper does;
    # "spacy" uses datatrove's default spaCy tokens, which split punctuation off ("(see" -> "(",
    # "see"), so punctuation-rich prose can fail the alphabetic-words rule.
    word_tokenizer: Literal["whitespace", "spacy"] = "whitespace"
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    code: CodeFilterConfig = field(default_factory=CodeFilterConfig)
    language: LanguageFilterConfig = field(default_factory=LanguageFilterConfig)


@dataclass
class PIIConfig:
    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ip_addresses: bool = True
    # Loopback, private, link-local, multicast and documentation addresses (127.0.0.1, 10.0.0.1,
    # 192.0.2.1, 2001:db8::1) identify no one and fill code and docs; only public ones are replaced.
    public_ips_only: bool = True
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

    def __post_init__(self) -> None:
        _require_at_least_one(self, "dedup.minhash", ("n_grams", "num_buckets", "hashes_per_bucket"))


@dataclass
class DedupConfig:
    exact: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)


@dataclass
class DecontamConfig:
    eval_files: list[str] = field(default_factory=list)
    ngram: int = 13
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ConfigError(f"decontam.ngram: must be >= 1, got {self.ngram}")


# Special tokens after eos and pad, in id order (data_prep/tokenizer.py describes the layout).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
UNK_TOKEN = "<|unk|>"
MASK_TOKEN = "<|mask|>"
# UL2's paradigm tokens (Tay et al. 2022): regular, sequential (prefix LM) and extreme denoising.
DENOISER_TOKENS = {"r": "<|r_denoiser|>", "s": "<|s_denoiser|>", "x": "<|x_denoiser|>"}
SENTINEL_TOKEN = "<|sentinel_{}|>"


@dataclass
class TokenizerConfig:
    # An existing tokenizer directory to reuse instead of training one.
    path: str | None = None
    model: Literal["bpe", "unigram", "wordpiece"] = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    train_bytes: int = 200_000_000
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    fim_tokens: bool = True
    num_reserved_tokens: int = 8
    # Objective tokens, added after the reserved slots only when asked (so existing vocabularies keep their
    # ids): <|mask|> for masked-LM pretraining; UL2's three denoiser tokens and `num_sentinel_tokens`
    # span sentinels <|sentinel_0|> ... for the mixture of denoisers.
    mask_token: bool = False
    num_sentinel_tokens: int = 0
    model_max_length: int = 2048

    def special_tokens(self) -> list[str]:
        """The special tokens a tokenizer trained with this config has, in id order (id = list index)."""
        tokens = [self.eos_token, self.pad_token, IM_START, IM_END]
        if self.fim_tokens:
            tokens += [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]
        tokens += [f"<|reserved_{i}|>" for i in range(max(self.num_reserved_tokens, 0))]
        if self.mask_token:
            tokens.append(MASK_TOKEN)
        if self.num_sentinel_tokens > 0:
            tokens += [*DENOISER_TOKENS.values(), *(SENTINEL_TOKEN.format(i) for i in range(self.num_sentinel_tokens))]
        if self.model in ("unigram", "wordpiece"):
            tokens.append(UNK_TOKEN)
        return tokens

    def __post_init__(self) -> None:
        # Checked on load, so a run does not filter and dedup a corpus before finding out.
        _require_at_least_one(self, "tokenizer", ("min_frequency", "train_bytes", "model_max_length"))
        if self.num_reserved_tokens < 0:
            raise ConfigError(f"tokenizer.num_reserved_tokens: must be >= 0, got {self.num_reserved_tokens}")
        if self.num_sentinel_tokens < 0:
            raise ConfigError(f"tokenizer.num_sentinel_tokens: must be >= 0, got {self.num_sentinel_tokens}")
        specials = self.special_tokens()
        if len(set(specials)) != len(specials):
            raise ConfigError(f"tokenizer.eos_token/pad_token: special tokens must be distinct, got {specials[:2]}")
        # Byte-level BPE and byte-fallback Unigram need all 256 bytes plus the special tokens.
        minimum = len(specials) + (256 if self.model in ("bpe", "unigram") else 1) + 1
        if self.vocab_size < minimum:
            raise ConfigError(f"tokenizer.vocab_size: must be >= {minimum} for model {self.model}, "
                              f"got {self.vocab_size}")


@dataclass
class PackConfig:
    seq_len: int = 1024
    # Documents are tokenized in batches of at most `batch_docs` documents and (when packing
    # shards) `batch_chars` characters: the batch's token lists are the step's peak memory.
    batch_docs: int = 1000
    batch_chars: int = 4_000_000
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _require_at_least_one(self, "pack", ("seq_len", "batch_docs", "batch_chars"))


@dataclass
class RayConfig:
    """`executor: ray`. Every node needs Ember installed and `output_dir` on a shared filesystem."""

    # An existing cluster ("ray://head:10001", "auto"); empty: RAY_ADDRESS, else a local instance.
    address: str | None = None
    num_cpus: int | None = None  # CPUs of a local instance (default: all)
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    workers: int = -1  # tasks running at once (-1: as many as the cluster fits)
    log_to_driver: bool = False  # task logs are in <output_dir>/executor/<step>/logs either way

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus: must be >= 1, got {self.num_cpus}")
        _require_at_least_one(self, "ray", ("cpus_per_task",))
        if self.mem_per_cpu_gb <= 0:
            raise ConfigError(f"ray.mem_per_cpu_gb: must be > 0, got {self.mem_per_cpu_gb}")
        if self.workers == 0 or self.workers < -1:
            raise ConfigError(f"ray.workers: must be >= 1 or -1, got {self.workers}")


@dataclass
class SlurmConfig:
    """`executor: slurm`: sbatch settings of every job (`output_dir` must be on a shared filesystem)."""

    partition: str | None = None
    time: str = "24:00:00"
    qos: str | None = None
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    workers: int = -1  # array tasks running at once (-1: no limit)
    job_name: str = "ember_data"
    # Shell line that puts the right `python` on PATH in a job; default: this interpreter's directory.
    env_command: str | None = None
    sbatch_args: dict[str, str] = field(default_factory=dict)  # e.g. {account: myproject}
    mail_user: str | None = None

    def __post_init__(self) -> None:
        _require_at_least_one(self, "slurm", ("cpus_per_task", "mem_per_cpu_gb"))
        if self.workers == 0 or self.workers < -1:
            raise ConfigError(f"slurm.workers: must be >= 1 or -1, got {self.workers}")
        if not isinstance(self.sbatch_args, dict):
            raise ConfigError(f"slurm.sbatch_args: expected a mapping, got {type(self.sbatch_args).__name__}")


@dataclass
class PipelineConfig:
    output_dir: str
    sources: list[SourceConfig]
    num_shards: int = 1
    # Share of documents routed to the validation split (by a hash of the document id): held out
    # from tokenizer training and from training data, used for compression and perplexity.
    validation_fraction: float = 0.02
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
    # Where tasks run: this machine, a Ray cluster, or Slurm array jobs (data_prep/executors.py).
    executor: Literal["local", "ray", "slurm"] = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

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
            if source.kind == "auto" and source.type != "local":
                raise ConfigError(f"sources.{i}.kind: auto picks the kind from file names, which only a local "
                                  f"source has; set text or code")
            if source.max_docs is not None and source.max_docs < 1:
                raise ConfigError(f"sources.{i}.max_docs: must be >= 1 (leave it out for no limit), "
                                  f"got {source.max_docs}")
        if self.max_doc_bytes < 1:
            raise ConfigError(f"max_doc_bytes: must be >= 1, got {self.max_doc_bytes}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
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
PATH_KEYS = ("output_dir", "sources.*.paths.*", "sources.*.path", "toxicity.wordlist", "decontam.eval_files.*",
             "tokenizer.path")


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping[str, Any] | None = None,
                raw: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a pipeline YAML (or a ready dict) and validate it, after `overrides`: command-line `--key=value`
    strings, or a mapping of (dotted) keys to typed values."""
    typed = overrides if isinstance(overrides, Mapping) else None
    argv = [] if typed is not None else list(overrides or [])
    (cfg,) = parse_args((PipelineConfig,), argv, config=path if path is not None else raw or {}, overrides=typed,
                        path_keys=PATH_KEYS)
    return cfg
