"""Text cleaning before filtering: Unicode, control characters, HTML, URLs and whitespace.

`clean_text(text, kind, cfg)` runs these steps in order:

1. line breaks: `\\r\\n`, `\\r`, NEL (U+0085) and the Unicode line/paragraph separators become `\\n`;
2. Unicode normalisation (`cfg.unicode_form`: NFC, NFKC or none);
3. control characters other than `\\n` and `\\t` are dropped, as are the byte-order mark and lone
   surrogates (left behind by `surrogateescape` decoding; tokenizers cannot encode them);
4. `cfg.html_to_text` (text sources only): documents that look like HTML become readable text;
   script/style/head contents are dropped, block tags become line breaks, entities are unescaped;
5. `cfg.remove_urls` (text sources only): http(s):// and www. URLs are removed; code keeps its URLs
   because they are part of the program (imports, API endpoints, licence headers);
6. `cfg.normalize_whitespace`: trailing whitespace is stripped on every line, runs of three or more
   blank lines become one blank line and leading/trailing blank lines are removed. Text sources also
   get runs of spaces/tabs inside a line collapsed to one space (leading indentation is kept: it marks
   quotes and code samples). Code never has its indentation or inner spacing touched.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from html.parser import HTMLParser

from data_prep.config import KINDS, CleanConfig

_LINE_BREAKS = re.compile(r"\r\n?|[\x85\u2028\u2029]")
# Every C0/C1 control character except \t and \n (\r is gone by then), plus the byte-order mark.
_DROPPED_CHARS = dict.fromkeys(
    [c for c in range(0x20) if c not in (0x09, 0x0A)] + list(range(0x7F, 0xA0)) + [0xFEFF]
)
_SURROGATES = re.compile(r"[\ud800-\udfff]")

# A document counts as HTML when it has a few structural tags, not when prose mentions "<p>" once.
_HTML_TAG = re.compile(
    r"<(?:!doctype\s+html|html|head|body|div|p|br|span|table|tr|td|ul|ol|li|h[1-6]|a|script|style|meta)[\s>/]",
    re.IGNORECASE,
)
_MIN_HTML_TAGS = 2

_URL = re.compile(r"(?:\bhttps?://|\bwww\.)[^\s<>\"']+?(?=[.,;:!?)\]}>'\"]*(?:\s|$))")

_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # three or more blank lines
_INNER_SPACE_RUN = re.compile(r"(?<=\S)(?:[^\S\n]{2,}|\t)")


def clean_text(text: str, kind: str, cfg: CleanConfig) -> str:
    """Normalise one document; `kind` is "text" or "code" (code keeps its layout and URLs)."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {list(KINDS)}, got {kind!r}")
    ascii = text.isascii()  # most code: then only \r can be a line break and nothing is a surrogate
    if "\r" in text or not ascii:
        text = _LINE_BREAKS.sub("\n", text)
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.translate(_DROPPED_CHARS)
    if not ascii:
        text = _SURROGATES.sub("", text)
    if kind == "text" and cfg.html_to_text and looks_like_html(text):
        text = html_to_text(text)
    if kind == "text" and cfg.remove_urls:
        text = _URL.sub("", text)
    if cfg.normalize_whitespace:
        text = normalize_whitespace(text, kind)
    return text


def normalize_whitespace(text: str, kind: str) -> str:
    # Trailing whitespace off every line; `str.rstrip` strips exactly `[^\S\n]` here (the text has no other
    # line breaks), 10x faster than the regex on code.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    if kind == "text":
        text = _INNER_SPACE_RUN.sub(" ", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    # Only newlines are stripped at the start: the first line's indentation is part of code.
    return text.lstrip("\n").rstrip()


def looks_like_html(text: str) -> bool:
    found = itertools.islice(_HTML_TAG.finditer(text), _MIN_HTML_TAGS)
    return sum(1 for _ in found) == _MIN_HTML_TAGS


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML page, one line per block element."""

    # <head> is handled apart: HTML lets a page leave it unclosed, and <body> ends it anyway.
    SKIPPED = {"script", "style", "noscript", "template", "svg"}
    # Tags after which a reader expects a new line; paragraph-like ones get a blank line.
    LINE_BREAK = {"br", "div", "li", "tr", "dt", "dd", "section", "article", "header", "footer", "nav", "aside",
                  "main", "figure", "figcaption", "form", "ul", "ol", "dl", "table", "caption", "hr"}
    PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.in_head = False
        self.pre_depth = 0
        self.at_line_start = True

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("head", "body"):
            self.in_head = tag == "head"
        elif tag in self.SKIPPED:
            self.skip_depth += 1
        elif tag == "pre":
            self.pre_depth += 1
        self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._break(tag)  # <br/>, <hr/>: no content, no depth change

    def handle_endtag(self, tag: str) -> None:
        if tag == "head":
            self.in_head = False
        elif tag in self.SKIPPED:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        self._break(tag)

    def handle_data(self, data: str) -> None:
        if self.skip_depth or self.in_head:
            return
        if self.pre_depth:
            self.parts.append(data)
        else:
            # Outside <pre>, HTML shows any whitespace run (newlines included) as one space.
            data = re.sub(r"\s+", " ", data)
            self.parts.append(data.lstrip() if self.at_line_start else data)
        self.at_line_start = self.at_line_start and not self.parts[-1]

    def _break(self, tag: str) -> None:
        if tag not in self.PARAGRAPH and tag not in self.LINE_BREAK:
            return
        if self.parts and not self.pre_depth:
            self.parts[-1] = self.parts[-1].rstrip(" ")
        # </li><li> must give one line break, not two: count the ones already there.
        wanted = 2 if tag in self.PARAGRAPH else 1
        tail = "".join(self.parts[-2:])
        present = len(tail) - len(tail.rstrip("\n"))
        if wanted > present:
            self.parts.append("\n" * (wanted - present))
        self.at_line_start = True

    def text(self) -> str:
        return re.sub(r"\n{3,}", "\n\n", "".join(self.parts)).strip("\n")


def html_to_text(html: str) -> str:
    """Readable text from an HTML document (stdlib parser: tolerant of broken markup)."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text()
