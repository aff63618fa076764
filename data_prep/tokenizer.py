"""Train, save, load and fingerprint the pipeline's tokenizer, and encode documents for packing.

Three models can be trained with the `tokenizers` library (`tokenizer.model` in the YAML):

- `bpe` (default): byte-level BPE. Text is split by a GPT-4/LLaMA-3 style regex (contractions,
  letter runs with one leading non-letter, single digits, punctuation runs, whitespace runs), then
  mapped to bytes; all 256 bytes are in the initial alphabet, so no input is ever unknown and
  `decode(encode(text)) == text` holds exactly for every valid Unicode string. **Lossless.**
- `unigram`: SentencePiece-style Unigram with a Metaspace pre-tokenizer (spaces become "▁", one
  "▁" is prepended to the text) and byte fallback: the Unigram trainer of `tokenizers` does not
  keep `byte_fallback`, so after training the 256 pieces `<0x00>`..`<0xFF>` are appended to the
  vocabulary with a score far below any learned piece and the model is rebuilt with
  `byte_fallback=True`. Characters outside the vocabulary become their UTF-8 bytes instead of
  `<|unk|>`. Round trip is exact except that (a) one leading space of the text is dropped and
  (b) a literal "▁" (U+2581) decodes as a space. **Lossless up to those two cases.**
- `wordpiece`: BERT-style WordPiece on whitespace/punctuation pre-tokens. Whitespace is not kept
  and unseen characters become `<|unk|>`. **Lossy**; offered for experiments only.

Special tokens occupy the first ids, always in this order (the ids depend only on the config):

    0 eos (also bos)  1 pad  2 <|im_start|>  3 <|im_end|>
    then, when `fim_tokens`: <|fim_prefix|> <|fim_middle|> <|fim_suffix|>
    then `num_reserved_tokens` slots <|reserved_0|> ...
    then, when `mask_token`: <|mask|> (masked-LM pretraining)
    then, when `num_sentinel_tokens` > 0: <|r_denoiser|> <|s_denoiser|> <|x_denoiser|> <|sentinel_0|> ...
    (UL2's mode tokens and span sentinels); unigram and wordpiece add <|unk|> last.

The objective tokens come after the reserved slots and only when asked, so a config without them
gives exactly the vocabulary (and ids) it always gave.

The saved directory loads offline with `transformers.AutoTokenizer.from_pretrained(dir)` as a
`PreTrainedTokenizerFast` (an alias of `TokenizersBackend` in transformers 5), in transformers 5 and
in transformers 4.x alike: `modeling.tokenizer_config.make_portable` writes tokenizer_config.json in
the form both read to the same ids, special tokens and chat template. `tokenizer(text)` adds no BOS and no EOS
(`add_bos_token=False`, `add_eos_token=False`): the packer appends EOS after each document itself.
Literal special-token text inside a document (a file that contains "<|endoftext|>") would still be
matched as the special token by `tokenizer(text)`; the packer therefore calls `encode_documents`,
which encodes such text as ordinary text, so the EOS id appears in packed data only where the packer
put it.

`load_tokenizer` gives that transformers tokenizer, for training. The pipeline itself reads a saved
tokenizer with `tokenizers` alone (`SavedTokenizer`: the same ids, vocabulary and EOS id) and copies a
given one (`copy_tokenizer`), so its processes need not import transformers, and torch with it, when
the tokenizer is not trained in the run.

The chat template is ChatML-like; each message renders as

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and `add_generation_prompt=True` appends `<|im_start|>assistant\\n`. No BOS is prepended.
An assistant message's content and its closing `<|im_end|>` sit in a `{% generation %}` block, so
`apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)` marks the tokens a
finetuned model should learn to produce, stop token included (the markers render as nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from cli import error_line, folder_mode
from data_prep import config
from data_prep.config import ConfigError, TokenizerConfig
from data_prep.fast_bpe import fast_encoder

if TYPE_CHECKING:  # imported where used: transformers brings torch, ~5 s a process that packing does without
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IM_START, IM_END, UNK_TOKEN = config.IM_START, config.IM_END, config.UNK_TOKEN
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = config.FIM_PREFIX, config.FIM_MIDDLE, config.FIM_SUFFIX
MASK_TOKEN, DENOISER_TOKENS, SENTINEL_TOKEN = config.MASK_TOKEN, config.DENOISER_TOKENS, config.SENTINEL_TOKEN

logger = logging.getLogger(__name__)

# GPT-4 / LLaMA-3 style split, except that digits are split one by one (numbers then tokenize the
# same way whatever their length). Letters keep one leading non-letter (" foo", "_bar"), spaces
# before a newline stay together, and a run of spaces gives its last space to the following word.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# Far below any learned Unigram score, so byte pieces are used only for characters that have no
# other segmentation, never to spell out literal text such as "<0x41>".
BYTE_PIECE_SCORE_GAP = 1000.0

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '" + IM_END + "' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '" + IM_END + "' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '" + IM_START + "assistant\\n' }}"
    "{%- endif -%}"
)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# The parts of tokenizer.json that decide which ids a text gets; truncation, padding and the
# post-processor (BOS/EOS insertion) are runtime settings and do not change packed data.
_FINGERPRINT_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def special_tokens_for(cfg: TokenizerConfig) -> list[str]:
    """The special tokens of a tokenizer trained with `cfg`, in id order (id = list index).

    The config validates itself on construction (vocabulary large enough for them, distinct names)."""
    return cfg.special_tokens()


def _without_surrogates(text: str) -> str:
    """Replace lone surrogates (which JSON escapes can produce) by U+FFFD; they have no UTF-8 form."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _limit_bytes(texts: Iterable[str], max_bytes: int, counts: dict[str, int]) -> Iterator[str]:
    """Yield texts until `max_bytes` of UTF-8 have been yielded; the text that crosses the limit is cut."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: texts must be str, got {type(text).__name__}")
        left = max_bytes - counts["bytes"]
        if left <= 0:
            return
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            text = _without_surrogates(text)
            data = text.encode("utf-8")
        if len(data) > left:
            # Cutting inside a UTF-8 sequence leaves a partial character: drop it.
            text = data[:left].decode("utf-8", "ignore")
            counts["docs"] += 1
            counts["bytes"] += len(text.encode("utf-8"))
            yield text
            return
        counts["docs"] += 1
        counts["bytes"] += len(data)
        yield text


def _build_backend(cfg: TokenizerConfig, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    # The trainers' progress bars only on a terminal: written to a log or a pipe, they leave blank lines.
    progress = sys.stdout.isatty() and sys.stderr.isatty()
    if cfg.model == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
        )
    elif cfg.model == "unigram":
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
        # Room for the 256 byte pieces appended after training.
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size - 256, special_tokens=specials, unk_token=UNK_TOKEN, show_progress=progress,
        )
    elif cfg.model == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials, show_progress=progress,
        )
    else:
        raise ConfigError(f"tokenizer.model: must be one of ['bpe', 'unigram', 'wordpiece'], got {cfg.model!r}")
    return backend, trainer


def _add_byte_fallback(backend: Tokenizer) -> None:
    """Append <0x00>..<0xFF> to a trained Unigram model and switch byte fallback on."""
    state = json.loads(backend.to_str())["model"]
    floor = min(score for _, score in state["vocab"]) - BYTE_PIECE_SCORE_GAP
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    # A learned piece spelled like a byte piece (a corpus full of "<0x41>") would decode as that
    # byte; giving it the byte score keeps such text spelled out character by character.
    pieces = [(piece, floor if piece in byte_pieces else score) for piece, score in state["vocab"]]
    learned = {piece for piece, _ in pieces}
    pieces += [(piece, floor) for piece in byte_pieces if piece not in learned]
    backend.model = models.Unigram(pieces, state["unk_id"], byte_fallback=True)


def _wrap(backend: Tokenizer, cfg: TokenizerConfig, specials: list[str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    named = {cfg.eos_token, cfg.pad_token, UNK_TOKEN, MASK_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=cfg.eos_token,
        bos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        unk_token=UNK_TOKEN if UNK_TOKEN in specials else None,
        mask_token=MASK_TOKEN if MASK_TOKEN in specials else None,
        extra_special_tokens=[t for t in specials if t not in named],
        model_max_length=cfg.model_max_length,
        add_bos_token=False,
        add_eos_token=False,
        # Cleanup removes spaces before punctuation and breaks the round trip; saved explicitly so that
        # loaders with another default keep it off.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> None:
    """`tokenizer.save_pretrained(output_dir)` with a tokenizer_config.json that transformers 4.x reads too."""
    # Lazy: the modeling package imports torch and transformers, which reading and packing a tokenizer do without.
    from modeling.tokenizer_config import make_portable

    tokenizer.save_pretrained(output_dir)
    make_portable(output_dir)


def _write_atomically(output_dir: Path, write: Callable[[Path], Any]) -> None:
    """`write` a temporary sibling directory, then rename it to `output_dir` (replacing it)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    os.chmod(tmp, folder_mode())  # mkdtemp's 0700 would stay with the renamed folder
    old = None
    try:
        write(tmp)
        if output_dir.exists():
            old = output_dir.with_name(f"{tmp.name}.old")
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output_dir.exists():
            os.replace(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, output_dir: Path,
                    used: dict[str, int] | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer on at most `cfg.train_bytes` of `texts`, save it to `output_dir`, return it.

    Training is deterministic: the same texts and config give the same `tokenizer_fingerprint`.
    `used`, when given, receives the documents and bytes actually trained on (`docs`, `bytes`).
    """
    specials = special_tokens_for(cfg)
    backend, trainer = _build_backend(cfg, specials)
    counts = used if used is not None else {}
    counts.update(docs=0, bytes=0)
    backend.train_from_iterator(_limit_bytes(texts, cfg.train_bytes, counts), trainer=trainer)
    if counts["bytes"] == 0:
        raise ValueError("train_tokenizer: no training text (every document was empty or none were given)")
    if cfg.model == "unigram":
        _add_byte_fallback(backend)
    if backend.token_to_id(cfg.eos_token) != 0:
        raise RuntimeError(f"train_tokenizer: {cfg.eos_token} did not get id 0; the special token order is broken")
    tokenizer = _wrap(backend, cfg, specials)
    output_dir = Path(output_dir)
    _write_atomically(output_dir, lambda folder: save_tokenizer(tokenizer, folder))
    logger.info("tokenizer: %s, %d tokens, trained on %d docs / %d bytes, saved to %s",
                cfg.model, len(tokenizer), counts["docs"], counts["bytes"], output_dir)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Loading, identity, special ids
# ---------------------------------------------------------------------------------------------

# The files of a saved fast tokenizer (tokenizer.json holds the model and every added token).
FAST_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "chat_template.json")
# Loading options, not tokenizer settings: a copy saved with them would refuse the Hub later.
_LOADING_OPTIONS = ("local_files_only", "is_local")


def _tokenizer_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: tokenizer directory not found")
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path}: not a tokenizer directory (no tokenizer.json)")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer directory offline; a missing or broken directory is a one-line ConfigError."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _tokenizer_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # a corrupt file can fail deep inside transformers or tokenizers
        raise ConfigError(f"{path}: cannot load tokenizer ({error_line(err)})") from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigError(f"{path}: expected a fast tokenizer, got {type(tokenizer).__name__}")
    for key in _LOADING_OPTIONS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


class SavedTokenizer:
    """A saved tokenizer directory read with `tokenizers` alone: its ids, vocabulary and EOS id, all that packing
    and the pipeline's tokenizer step use, with the same values as `load_tokenizer`'s tokenizer. Those processes
    then never import transformers, and torch through it (~5 s each on 2 cores); training uses `load_tokenizer`.

    `encode_documents` encodes with tiktoken when `data_prep.fast_bpe` finds that it reproduces this tokenizer's
    ids exactly (3-4x faster per thread), else with `tokenizers`; `encoder` names the one chosen.
    """

    def __init__(self, path: str | Path):
        self.path = _tokenizer_folder(path)
        config_file = self.path / "tokenizer_config.json"
        try:
            self.backend_tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            self.config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except Exception as err:  # a corrupt tokenizer.json fails inside tokenizers' parser
            raise ConfigError(f"{self.path}: cannot load tokenizer ({error_line(err)})") from None
        if not isinstance(self.config, dict):
            raise ConfigError(f"{config_file}: expected a JSON object, got {type(self.config).__name__}")
        eos = self.config.get("eos_token")  # saved as its text or as an AddedToken dict
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self.backend_tokenizer.token_to_id(eos) if isinstance(eos, str) else None
        self.fast_encode, why = fast_encoder(self.backend_tokenizer)
        self.encoder = "tiktoken" if self.fast_encode else "tokenizers"
        if self.fast_encode is None and isinstance(self.backend_tokenizer.model, models.BPE):
            logger.warning("%s: encoding with tokenizers, not tiktoken: %s", self.path, why)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


def copy_tokenizer(source: str | Path, output_dir: Path) -> SavedTokenizer:
    """Copy the tokenizer saved in `source` to `output_dir` (atomically, replacing it) and return it, read back.

    Its files are copied byte for byte, so the copy loads to the same tokenizer in every transformers version
    the source loads in; then loading options are dropped from tokenizer_config.json and a transformers 5 form
    is made portable (`modeling.tokenizer_config.make_portable`), as `save_tokenizer` does for a trained one.
    """
    checked = SavedTokenizer(source)
    if checked.eos_token_id is None:
        raise ConfigError(f"{checked.path}/tokenizer_config.json: eos_token: missing or not in the vocabulary; "
                          "packing needs it to separate documents")

    def write(folder: Path) -> None:
        for name in FAST_TOKENIZER_FILES:
            if (checked.path / name).is_file():
                shutil.copyfile(checked.path / name, folder / name)
        config_file = folder / "tokenizer_config.json"
        if not config_file.is_file():
            return
        if any(key in checked.config for key in _LOADING_OPTIONS):
            kept = {key: value for key, value in checked.config.items() if key not in _LOADING_OPTIONS}
            config_file.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # The fields make_portable rewrites; importing it imports transformers, so only when there is work.
        if (checked.config.get("tokenizer_class") == "TokenizersBackend"
                or isinstance(checked.config.get("extra_special_tokens"), list)):
            from modeling.tokenizer_config import make_portable  # lazy: see the comment above

            make_portable(folder)

    output_dir = Path(output_dir)
    _write_atomically(output_dir, write)
    return SavedTokenizer(output_dir)


def tokenizer_fingerprint(tokenizer_or_dir: PreTrainedTokenizerFast | SavedTokenizer | Tokenizer | str | Path
                          ) -> str:
    """sha256 of the canonical JSON of the vocabulary, merges, special tokens and pre-tokenization.

    Two tokenizers with the same fingerprint give the same ids for every text; the packer stores it
    so training can check that its shards were made with its tokenizer.
    """
    if isinstance(tokenizer_or_dir, (str, Path)):
        file = Path(tokenizer_or_dir) / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{tokenizer_or_dir}: not a tokenizer directory (no tokenizer.json)")
        state = json.loads(file.read_text(encoding="utf-8"))
    elif isinstance(tokenizer_or_dir, Tokenizer):
        state = json.loads(tokenizer_or_dir.to_str())
    else:
        state = json.loads(tokenizer_or_dir.backend_tokenizer.to_str())
    canonical = json.dumps({key: state.get(key) for key in _FINGERPRINT_KEYS},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sentinel_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of <|sentinel_0|>, <|sentinel_1|>, ... in order, as many as the vocabulary has."""
    vocab, ids = tokenizer.get_vocab(), []
    while SENTINEL_TOKEN.format(len(ids)) in vocab:
        ids.append(vocab[SENTINEL_TOKEN.format(len(ids))])
    return ids


# ---------------------------------------------------------------------------------------------
# Encoding documents
# ---------------------------------------------------------------------------------------------

def encode_documents(tokenizer: PreTrainedTokenizerFast | SavedTokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, batched in Rust, with no special tokens added.

    Special-token text inside a document ("<|endoftext|>" in a file about tokenizers) is encoded
    as ordinary text, so special ids in packed data come only from the packer. Lone surrogates
    (invalid in UTF-8) are encoded as U+FFFD. The call briefly switches a setting of the shared
    backend, so one tokenizer object should not be used from several threads at once. A `SavedTokenizer` whose
    ids tiktoken reproduces encodes with tiktoken, one text at a time on this thread.
    """
    fast = getattr(tokenizer, "fast_encode", None)
    if fast is not None:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_documents: texts[{i}] must be str, got {type(text).__name__}")
        return [fast(text if text.isascii() or not _LONE_SURROGATE.search(text) else _without_surrogates(text))
                for text in texts]
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        # A previous `tokenizer(..., truncation=True)` call leaves truncation on; never cut documents.
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        try:
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            # Besides non-str input, the Rust side refuses only strings with lone surrogates.
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"encode_documents: texts[{i}] must be str, got {type(text).__name__}") from None
            encodings = backend.encode_batch_fast([_without_surrogates(t) for t in texts], add_special_tokens=False)
    finally:
        backend.encode_special_tokens = previous
    return [encoding.ids for encoding in encodings]


def compression_stats(tokenizer: PreTrainedTokenizerFast | SavedTokenizer, texts: Iterable[str],
                      batch_size: int = 256) -> dict:
    """Docs, bytes, chars and tokens of held-out `texts`, with bytes and chars per token."""
    stats: dict[str, Any] = {"docs": 0, "bytes": 0, "chars": 0, "tokens": 0}

    def add(batch: list[str]) -> None:
        stats["docs"] += len(batch)
        stats["bytes"] += sum(len(t.encode("utf-8", "surrogatepass")) for t in batch)
        stats["chars"] += sum(len(t) for t in batch)
        stats["tokens"] += sum(len(ids) for ids in encode_documents(tokenizer, batch))

    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            add(batch)
            batch = []
    if batch:
        add(batch)
    tokens = stats["tokens"]
    stats["bytes_per_token"] = stats["bytes"] / tokens if tokens else 0.0
    stats["chars_per_token"] = stats["chars"] / tokens if tokens else 0.0
    return stats
