"""Personal data redaction and word-list toxicity filtering.

`PIIRedactor(cfg).redact(text)` replaces, in this order, each kind switched on in `PIIConfig`:

- e-mail addresses -> `<EMAIL>`: `local@domain.tld` with a 2+ letter TLD;
- IP addresses -> `<IP_ADDRESS>`: IPv6 candidates are checked with the standard `ipaddress` module
  and need at least three non-empty groups unless written out in full, so `::`, `::1`, `fe80::1`
  and slices such as `a[1::2]` stay; then dotted IPv4 with every octet 0-255, no leading zeros.
  By default (`public_ips_only`) only globally routable addresses are replaced: loopback, private,
  link-local and documentation ranges identify no one;
- card numbers -> `<CARD_NUMBER>`: 13-19 digits, optionally grouped by single spaces or dashes,
  starting with a card-network digit (3-6) and passing the Luhn check;
- phone numbers -> `<PHONE>`: `+`, a country code and digit groups (10-15 digits in all), or the
  North American forms `(555) 123-4567`, `555-123-4567`, `555.123.4567`, `555 123 4567`.

The Counter returned alongside counts replacements as `pii/email`, `pii/ip_address`,
`pii/card_number` and `pii/phone`.

Not replaced, on purpose: version strings (`3.11.7`), dates (`2024-01-15`), digit runs without
separators shorter than 13 digits (`x = 1234567`, `5551234567`), out-of-range IPv4 (`256.1.1.1`),
hex hashes, MAC addresses, times (`12:30:45`), `user@localhost`. Known gaps: national phone
formats other than the North American one without a `+` prefix (`020 7946 0958`) are missed;
four-part version strings such as `1.2.3.4` are valid IPv4 and are replaced, as are 13-19 digit
identifiers that happen to look like a card (right first digit, valid checksum); names, street
addresses and ID numbers are out of scope (they need a model, not a pattern).

`ToxicityFilter(cfg)` removes documents with more than `cfg.max_hits` occurrences of terms from a
user-supplied word list (whole words, case-insensitive; multi-word phrases match across any
whitespace). No list, no filtering.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from data_prep.config import ConfigError, PIIConfig, ToxicityConfig

EMAIL = "<EMAIL>"
PHONE = "<PHONE>"
IP_ADDRESS = "<IP_ADDRESS>"
CARD_NUMBER = "<CARD_NUMBER>"

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not glued to a longer dotted number on either side: 1.2.3.4.5 is not an address.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# Candidates only; ipaddress decides. The optional dotted tail covers ::ffff:192.0.2.1.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
_CARD = re.compile(r"(?<![\w.,-])[3-6]\d{3}(?:[ -]?\d){9,15}(?![\w]|[.,-]\d)")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,6}"  # +44 20 7946 0958, +1 (555) 123 4567
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}([ .-])\d{3}\1\d{4}"  # 555-123-4567, with one separator used throughout
    r")(?![\w]|[.-]\d)"
)

# Necessary parts of the rules above (see PIIRedactor): the first domain label after "@"; the middle of a dotted
# quad; two colons with at most four hex digits between; 13 digits with separators; a phone's "+", "(ddd)" or
# ddd-ddd-dddd.
_EMAIL_HINT = re.compile(r"@[A-Za-z0-9][A-Za-z0-9-]*\.")
_IPV4_HINT = re.compile(r"\.\d{1,3}\.\d{1,3}\.")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_CARD_HINT = re.compile(r"[3-6]\d{3}(?:[ -]?\d){9}")
_PHONE_HINT = re.compile(r"\+\d|\(\d{3}\)|\d{3}[ .-]\d{3}[ .-]\d{4}")


def luhn_valid(digits: str) -> bool:
    """The checksum every payment card number carries in its last digit."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


class PIIRedactor:
    """Replaces e-mails, phone numbers, IP addresses and card numbers with placeholders."""

    def __init__(self, cfg: PIIConfig) -> None:
        self.cfg = cfg
        # (counter key, placeholder, pattern, validator) in the order they run: e-mails first so their
        # digits are gone before the number patterns look; cards before phones, which are shorter.
        # Each rule carries a hint: a pattern every match contains, led by a literal or a character class so that
        # the engine skips ahead to candidates; a text without it skips the rule, whose leading lookbehind makes the
        # engine try every position (~30 ns a character per rule).
        self._rules: list[tuple[str, str, re.Pattern, Callable[[str], bool] | None, re.Pattern]] = []
        if not cfg.enabled:
            return
        if cfg.emails:
            self._rules.append(("pii/email", EMAIL, _EMAIL, None, _EMAIL_HINT))
        if cfg.ip_addresses:
            # IPv6 first: its IPv4-mapped form (::ffff:192.0.2.1) ends in a dotted address.
            public = _is_public_ip if cfg.public_ips_only else None
            self._rules.append(("pii/ip_address", IP_ADDRESS, _IPV6, _both(_is_ipv6, public), _IPV6_HINT))
            self._rules.append(("pii/ip_address", IP_ADDRESS, _IPV4, public, _IPV4_HINT))
        if cfg.card_numbers:
            self._rules.append(("pii/card_number", CARD_NUMBER, _CARD, _is_card_number, _CARD_HINT))
        if cfg.phones:
            self._rules.append(("pii/phone", PHONE, _PHONE, _is_phone_number, _PHONE_HINT))

    @property
    def enabled(self) -> bool:
        return bool(self._rules)

    def redact(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for key, placeholder, pattern, is_valid, hint in self._rules:
            if not hint.search(text):
                continue

            def replace(match: re.Match, key: str = key, placeholder: str = placeholder, is_valid=is_valid) -> str:
                if is_valid is not None and not is_valid(match.group(0)):
                    return match.group(0)
                counts[key] += 1
                return placeholder

            text = pattern.sub(replace, text)
        return text, counts


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = [g for g in re.split(r"[:.]", candidate) if g]
    return "::" not in candidate or len(groups) >= 3


def _is_public_ip(candidate: str) -> bool:
    address = ipaddress.ip_address(candidate)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_global


def _both(first: Callable[[str], bool], second: Callable[[str], bool] | None) -> Callable[[str], bool]:
    return first if second is None else lambda candidate: first(candidate) and second(candidate)


def _is_card_number(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_phone_number(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    return 10 <= digits <= 15 if candidate.startswith("+") else digits == 10


class ToxicityFilter:
    """Removes documents that use more than `max_hits` terms of a user-supplied word list."""

    def __init__(self, cfg: ToxicityConfig) -> None:
        self.max_hits = cfg.max_hits
        self._pattern: re.Pattern | None = None
        if cfg.max_hits < 0:
            raise ConfigError(f"toxicity.max_hits: must be >= 0, got {cfg.max_hits}")
        if not cfg.wordlist:
            return
        path = Path(cfg.wordlist)
        if not path.is_file():
            raise ConfigError(f"toxicity.wordlist: file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"toxicity.wordlist: cannot read {path} ({type(err).__name__})") from None
        terms = {" ".join(line.split()).lower() for line in lines if line.strip() and not line.lstrip().startswith("#")}
        if not terms:
            raise ConfigError(f"toxicity.wordlist: {path} lists no terms")
        # Longest first so a phrase wins over its first word; whitespace inside a phrase matches any run.
        alternatives = [r"\s+".join(map(re.escape, term.split())) for term in sorted(terms, key=len, reverse=True)]
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)

    @property
    def enabled(self) -> bool:
        return self._pattern is not None

    def check(self, text: str) -> str | None:
        """"toxicity" when the document has more than `max_hits` listed terms, else None."""
        if self._pattern is None:
            return None
        for hits, _ in enumerate(self._pattern.finditer(text), start=1):
            if hits > self.max_hits:
                return "toxicity"
        return None
