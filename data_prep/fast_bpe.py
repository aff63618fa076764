"""A faster encoder for Ember's byte-level BPE tokenizers: the same ids from tiktoken's BPE, or nothing.

`tokenizers` encodes about 3 MB/s per thread; tiktoken, with the same vocabulary and split regex, 3-4x that.
`fast_encoder(tokenizer.json state)` builds a `tiktoken.Encoding` only when it gives the ids `tokenizers` gives
for every text, which it checks in two ways:

1. Structure. The tokenizer must be byte-level BPE with no normalizer, the pre-tokenizer Ember trains
   (a regex split whose matches are the pieces, then the byte-to-unicode map) or plain GPT-2 `ByteLevel`, no
   dropout, byte fallback or word affixes, and only special added tokens (encoded as plain text, as packing
   asks). Then its merges must be the ones tiktoken's rule implies. `tokenizers` applies the merge of lowest
   index; tiktoken merges the adjacent pair whose concatenation has the lowest rank (rank = id here). The two
   agree on every input when each merge's result has a higher id than the merge before it and, for every
   merged token, tiktoken's rule run on its bytes with the lower ranks alone ends in exactly the two parts
   of its merge. Then no other pair of parts can make it, and a whole piece found in the vocabulary (tiktoken's
   shortcut, `ignore_merges` in `tokenizers`) is what the merges reach anyway.
2. Behaviour. The split regex runs in two regex engines (Oniguruma in `tokenizers`, fancy-regex in tiktoken),
   so a fixed check set of edge cases (whitespace runs, CRLF, emoji ZWJ sequences, CJK, RTL, combining marks,
   digits of several scripts, special-token text) is encoded by both and must give the same ids.

Anything else returns None with the reason, and the caller keeps `tokenizers` (one log line).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers

# tokenizers' ByteLevel regex (GPT-2's split), used when ByteLevel itself splits (`use_regex: true`).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Texts both engines must encode to the same ids. Each targets a place where regex engines or byte
# handling can disagree; the last ones mix several.
CHECK_SET = (
    "", " ", "  ", "\t", "\n", "\n\n\n", "  \n  \n", "a  b   c    d", "x\t\ty", "trailing   ", "   leading",
    "line one\r\nline two\r\n\r\n", "\r", "mixed \r\n\t \u000b\u000c\x1c\x1d\x1e\x1f\x85 whitespace",
    "nbsp\u00a0here\u2007and\u202fthere\u3000ideographic\u2028line\u2029para\u200bzero\ufeffbom",
    "emoji 👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 skin tone, 1️⃣ keycap",
    "中文字符和标点，日本語のテキスト、한국어 텍스트。",
    "עברית וערבית: العربية مع ‏علامات‎ اتجاه",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0352\u0353algo",
    "digits 0123456789 ٠١٢٣ ०१२ ①② Ⅻ ² ³ ½ 1,234.56e-7 0x1F 3.14159",
    "contractions: don't I'M we'LL they'd it's O'Neil 's 'S",
    "special text <|endoftext|> <|pad|> <|im_start|>user\nhi<|im_end|> <|fim_prefix|>",
    "code: int main(void) {\n\treturn a->b[i] >> 2 != ~0; /* ok */\n}\n",
    "def f(x):\n    return {'k': [1, 2]}  # comment\n\n\n",
    "punctuation!!! ??? ... --- *** ((( ))) \"quoted\" `tick` ~tilde~ @at #hash $ % ^ & _under_score_",
    "Ünïcödé Çase ß ẞ ΣΊΣΥΦΟΣ ς İstanbul ǅ ǈ",
    "\U0001d400\U0001d401 math bold, \U00010348 gothic, \U0001f600\U0001f601",
    "\x00\x01\x07 controls \x7f\x80\x9f",
    "x" * 300 + " " + "ab" * 150 + " " + "9" * 50,
    "a\u0300\u0301\u0302\u0303\u0304\u0305 stacked marks, ゙゚ kana voicing, 각 jamo",
)


def bytes_to_unicode() -> dict[int, str]:
    """The byte-to-character map of byte-level BPE (GPT-2's), as `tokenizers` builds its alphabet."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = [b for b in range(256) if chr(b) in alphabet]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _split_pattern(state: dict[str, Any]) -> tuple[str | None, str]:
    """The regex whose matches are the pieces BPE runs on, or None and why the pre-tokenizer is not supported."""
    pre = state.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None, "ByteLevel pre-tokenizer with add_prefix_space or without its regex"
        return GPT2_SPLIT, ""
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") != "Sequence" or len(parts) != 2 or parts[0].get("type") != "Split"
            or parts[1].get("type") != "ByteLevel"):
        return None, f"pre-tokenizer {pre.get('type')!r} is not a regex split followed by ByteLevel"
    split, level = parts
    if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in (split.get("pattern") or {}):
        return None, "the split is not an isolated regex split"
    if level.get("add_prefix_space") or level.get("use_regex"):
        return None, "ByteLevel after the split adds a prefix space or splits again"
    return split["pattern"]["Regex"], ""


def _structure_problem(state: dict[str, Any]) -> str:
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')!r} is not BPE"
    if state.get("normalizer"):
        return "it has a normalizer"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return "BPE with dropout, byte fallback or word affixes"
    if any(not token.get("special") for token in state.get("added_tokens") or []):
        return "it has added tokens that are not special"
    return ""


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _tiktoken_parts(piece: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merge rule on `piece` with only the ranks below `below`: merge the adjacent pair whose
    concatenation has the lowest rank (leftmost on ties) until none is left."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, where = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts


def _ranks(state: dict[str, Any]) -> tuple[dict[bytes, int] | None, str]:
    """tiktoken's mergeable ranks (vocabulary bytes -> id, special tokens left out), or None and why the merges
    are not the ones tiktoken's rule implies."""
    model = state["model"]
    decode = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = {token["content"] for token in state.get("added_tokens") or []}
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(decode[char] for char in token)] = rank
        except KeyError:
            return None, f"vocabulary entry {token!r} is not byte-level"
    if len(ranks) != len(set(ranks.values())):
        return None, "two vocabulary entries share an id"
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        return None, f"byte {missing[0]:#04x} has no token"
    previous, merged = -1, set()
    for left, right in _merge_pairs(model):
        try:
            a, b = (bytes(decode[c] for c in part) for part in (left, right))
        except KeyError:
            return None, f"merge {left!r} {right!r} is not byte-level"
        rank = ranks.get(a + b)
        if rank is None or rank <= previous or a + b in merged:
            return None, f"merge {left!r} {right!r}: its result's id does not follow the merge order"
        if _tiktoken_parts(a + b, ranks, rank) != [a, b]:
            return None, f"merge {left!r} {right!r}: tiktoken's rule would build {left + right!r} another way"
        previous = rank
        merged.add(a + b)
    unreachable = [piece for piece in ranks if len(piece) > 1 and piece not in merged]
    if unreachable:
        return None, f"vocabulary entry {unreachable[0]!r} is made by no merge"
    return ranks, ""


def fast_encoder(tokenizer: Tokenizer) -> tuple[Callable[[str], list[int]] | None, str]:
    """(encode, "") where `encode(text)` gives `tokenizer`'s ids for `text` as plain text (special-token text
    included, no special tokens added), or (None, reason) when tiktoken is missing or cannot reproduce it."""
    try:
        import tiktoken  # optional, in the `data` extra: without it packing uses `tokenizers` alone
    except ImportError:
        return None, "tiktoken is not installed"
    state = json.loads(tokenizer.to_str())
    problem = _structure_problem(state)
    pattern, why = _split_pattern(state) if not problem else (None, problem)
    if pattern is None:
        return None, why
    ranks, why = _ranks(state)
    if ranks is None:
        return None, why
    try:
        encoding = tiktoken.Encoding("ember", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as err:  # the regex may not compile in fancy-regex
        return None, f"tiktoken refuses the split regex ({type(err).__name__})"
    reference = Tokenizer.from_str(tokenizer.to_str())
    reference.no_truncation()
    reference.no_padding()
    reference.encode_special_tokens = True
    for text in CHECK_SET:
        if encoding.encode_ordinary(text) != reference.encode(text, add_special_tokens=False).ids:
            return None, f"tiktoken's ids differ on the check text {text[:40]!r}"
    return encoding.encode_ordinary, ""
