"""What a Hugging Face tokenizer directory's JSON files say, read the way transformers reads them.

tokenizer_config.json: named special tokens (`bos_token`, ... and any other `*_token`
string), `added_tokens_decoder` and extra special tokens with their AddedToken flags,
`add_bos_token` / `add_eos_token`, chat templates; the legacy special_tokens_map.json;
chat_template.jinja, chat_templates/*.jinja and a processor's chat_template.json; and
generation_config.json's `eos_token_id`. Every malformed field is a CheckpointError that
names it.

Not here: the Tokenizer built from these settings (tokenizer.py), tokenizer.json itself
(the `tokenizers` library reads it), or GGUF vocabularies (checkpoint/gguf_tokenizer.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tokenizers

from weightsmith.errors import CheckpointError
from weightsmith.files import read_json

# transformers' named special tokens, in its order: tokens missing from the backend get new ids in this order.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def read_tokenizer_config(root: Path) -> dict[str, Any]:
    """tokenizer_config.json of the directory `root` (empty if absent), with the legacy
    special_tokens_map.json merged in and `chat_template` taken from the template files."""
    config = read_json(root / "tokenizer_config.json", required=False) or {}
    special_map = read_json(root / "special_tokens_map.json", required=False)
    if special_map and "added_tokens_decoder" not in config:
        # transformers only reads the legacy special_tokens_map.json when the config predates
        # `added_tokens_decoder`, and then lets the map's values win over the config's.
        config = _merge_special_tokens_map(config, special_map)
    return {**config, "chat_template": _chat_template_from_files(root, config)}


def _merge_special_tokens_map(config: dict[str, Any], special_map: Mapping[str, Any]) -> dict[str, Any]:
    # transformers: the map's values replace the config's, except an extra_special_tokens list,
    # which is merged.
    merged = dict(config)
    for key, value in special_map.items():
        if key == "extra_special_tokens" and isinstance(value, list):
            existing = list(merged.get(key) or [])
            merged[key] = existing + [t for t in value if t not in existing]
        else:
            merged[key] = value
    return merged


def _chat_template_from_files(root: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The chat template the directory's files give, with transformers' priority.

    chat_template.jinja (and named extras in chat_templates/*.jinja) win over the config's
    'chat_template'; a processor's chat_template.json is used only when neither exists.
    """
    named = {p.stem: p.read_text(encoding="utf-8") for p in sorted((root / "chat_templates").glob("*.jinja"))}
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        named["default"] = jinja_file.read_text(encoding="utf-8")
    if named:
        return named["default"] if set(named) == {"default"} else named
    if config.get("chat_template") is not None:
        return config["chat_template"]
    return (read_json(root / "chat_template.json", required=False) or {}).get("chat_template")


def parse_templates(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Mapping) and all(isinstance(t, str) for t in value.values()):
        return dict(value)
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise CheckpointError(
        "tokenizer_config.json 'chat_template' must be a string or a list of {'name', 'template'} dicts, "
        f"got {type(value).__name__}; fix the field or delete it"
    )


def token_content(value: Any) -> str | None:
    """The text of a token field given as "<s>" or as an AddedToken dict {"content": "<s>", ...}."""
    if value is None or isinstance(value, str):
        return value
    return value["content"]


def _is_token_value(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, Mapping) and isinstance(value.get("content"), str))


def named_tokens(config: Mapping[str, Any]) -> dict[str, Any]:
    """Named special tokens: the standard ones, then any other `*_token` string field.

    transformers >= 5 treats fields such as `image_token` as named special tokens too.
    """
    named: dict[str, Any] = {}
    for key in _NAMED_TOKENS:
        value = config.get(key)
        if value is None:
            continue
        if not _is_token_value(value):
            raise CheckpointError(
                f"tokenizer_config.json '{key}' must be a string or a {{'content': ...}} dict, "
                f"got {value!r:.80}; fix the field"
            )
        named[key] = value
    for key, value in config.items():
        if key.endswith("_token") and key not in named and isinstance(value, str):
            named[key] = value
    return named


def _extra_special_tokens(config: Mapping[str, Any]) -> list[Any]:
    tokens: list[Any] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        values = value.values() if isinstance(value, Mapping) else value or []
        if not isinstance(values, Iterable) or isinstance(values, str):
            raise CheckpointError(
                f"tokenizer_config.json '{key}' must be a list of tokens, got {value!r:.80}"
            )
        for token in values:
            if not _is_token_value(token):
                raise CheckpointError(
                    f"tokenizer_config.json '{key}' holds {token!r:.80}, which is not a token"
                )
            tokens.append(token)
    return tokens


def config_added_tokens(config: Mapping[str, Any], named: Mapping[str, Any]) -> list[tokenizers.AddedToken]:
    """Tokens transformers adds to the backend when missing: added_tokens_decoder, named, extra."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping) or not all(str(k).isdigit() for k in decoder):
        raise CheckpointError(
            "tokenizer_config.json 'added_tokens_decoder' must map token ids to tokens; fix or delete the field"
        )
    tokens = [_added_token(decoder[k], special=None) for k in sorted(decoder, key=int)]
    tokens += [_added_token(v, special=True) for v in named.values()]
    tokens += [_added_token(v, special=True) for v in _extra_special_tokens(config)]
    return tokens


def _added_token(value: Any, *, special: bool | None) -> tokenizers.AddedToken:
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=bool(special))
    if not _is_token_value(value):
        raise CheckpointError(
            f"tokenizer_config.json: {value!r:.80} is not a token string or AddedToken dict"
        )
    flags = {k: bool(value[k]) for k in _ADDED_TOKEN_FLAGS if k in value}
    is_special = bool(value.get("special", False)) if special is None else special
    return tokenizers.AddedToken(value["content"], special=is_special, **flags)


def register_special_tokens(backend: tokenizers.Tokenizer, tokens: Iterable[tokenizers.AddedToken]) -> None:
    """Add the tokens the backend does not yet treat as added tokens, as transformers does.

    A special token that is only a plain vocabulary entry would otherwise be split by the
    pre-tokenizer when it appears in text, and kept by decode(skip_special_tokens=True).
    """
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing: list[tokenizers.AddedToken] = []
    for token in tokens:
        if token.content not in present:
            present.add(token.content)
            missing.append(token)
    if missing:
        backend.add_tokens(missing)


def config_flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"tokenizer_config.json '{key}' must be true or false, got {value!r:.40}")
    return value


def generation_eos_ids(generation_config: Mapping[str, Any] | None) -> list[int]:
    value = (generation_config or {}).get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(
            f"generation_config.json 'eos_token_id' must be an int or a list of ints, got {value!r:.80}"
        )
    return values
