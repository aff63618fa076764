"""The tokenizer_config.json that transformers 4.x and 5.x both load to the same tokenizer.

transformers 5 saves a fast tokenizer as `tokenizer_class: TokenizersBackend`, a class 4.x does not
have, with its unnamed special tokens as a list under `extra_special_tokens`, where 4.x expects a
dict of named tokens: tools still on transformers 4.x (llama.cpp's converter environment among them)
cannot load it. `make_portable` rewrites such a file; data_prep saves its tokenizers through it, and
`python -m modeling.convert to-hf` applies it to the exported folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


def make_portable(directory: str | Path) -> bool:
    """Rewrite a transformers 5 tokenizer_config.json in `directory` into the form transformers 4.x and 5.x
    both load to the same tokenizer; returns whether anything changed.

    transformers 5 names its `TokenizersBackend` class (4.x has none of that name) and keeps unnamed
    special tokens as a list under `extra_special_tokens` (4.x expects a dict of named tokens there).
    The portable form names `PreTrainedTokenizerFast`, which both have, lists those tokens under
    `additional_special_tokens`, and states `add_bos_token` / `add_eos_token` as what the saved
    post-processor does, for readers whose defaults differ (llama.cpp's converter, older loaders). The
    tokenizer.json, so the ids and the fingerprint, is untouched. Other classes and configs without
    transformers 5 fields are left as they are.
    """
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = config.get("extra_special_tokens")
    if config.get("tokenizer_class") != "TokenizersBackend" and not isinstance(extra, list):
        return False
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = list(dict.fromkeys(config.get("additional_special_tokens", []) + extra))
    config.pop("backend", None)  # transformers 5's choice of backend; tokenizers is its default
    backend = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    # A special token is saved as its text or as an AddedToken dict.
    bos, eos = (backend.token_to_id(token.get("content", "") if isinstance(token, dict) else token or "")
                for token in (config.get("bos_token"), config.get("eos_token")))
    config["add_bos_token"], config["add_eos_token"] = adds_bos_eos(backend, bos, eos)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return True


def adds_bos_eos(backend: Tokenizer, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether encoding with special tokens puts BOS in front and EOS at the end: what the post-processor does."""
    plain, full = (backend.encode("a", add_special_tokens=flag).ids for flag in (False, True))
    return (bos_id is not None and full[:1] == [bos_id] != plain[:1],
            eos_id is not None and full[-1:] == [eos_id] != plain[-1:])
