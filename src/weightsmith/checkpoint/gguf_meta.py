"""The value type each GGUF metadata key weightsmith reads must have, checked before use.

A GGUF file declares each value's type; a hostile or broken file can declare any type for any
key (a string `llama.block_count`, an integer chat template), which would otherwise surface as
a TypeError deep in config building. `check_value_type(field, path)` compares the declared type
with the kind the key needs (by exact key or key suffix) and raises one CheckpointError naming
the file, the key, its type and what was expected. Keys not listed here are not checked (they
are not read).

Not here: parsing the file (gguf_reader.py), what the values mean (gguf.py).
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType as VT

from weightsmith.checkpoint.gguf_reader import GGUFField
from weightsmith.errors import CheckpointError

_INTS = frozenset({VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64})
_NUMBERS = _INTS | {VT.FLOAT32, VT.FLOAT64}
#: kind -> (what the message says, the allowed [value type] or [ARRAY, item type] lists)
_KINDS: dict[str, tuple[str, frozenset[tuple[VT, ...]]]] = {
    "int": ("an integer", frozenset((t,) for t in _INTS)),
    "number": ("a number", frozenset((t,) for t in _NUMBERS)),
    "str": ("a string", frozenset({(VT.STRING,)})),
    "bool": ("a boolean", frozenset({(VT.BOOL,)} | {(t,) for t in _INTS})),
    "strs": ("an array of strings", frozenset({(VT.ARRAY, VT.STRING)})),
    "ints": ("an array of integers", frozenset((VT.ARRAY, t) for t in _INTS)),
    "numbers": ("an array of numbers", frozenset((VT.ARRAY, t) for t in _NUMBERS)),
}
_EXACT = {
    "general.architecture": "str",
    "general.name": "str",
    "general.basename": "str",
    "general.alignment": "int",
    "tokenizer.ggml.model": "str",
    "tokenizer.ggml.pre": "str",
    "tokenizer.chat_template": "str",
    "tokenizer.ggml.tokens": "strs",
    "tokenizer.ggml.merges": "strs",
    "tokenizer.ggml.token_type": "ints",
    "tokenizer.ggml.scores": "numbers",
}
#: Key endings (after the architecture prefix) and their kinds, checked in order.
_SUFFIXES = (
    ("_token_id", "int"),
    ("add_bos_token", "bool"),
    ("add_eos_token", "bool"),
    ("add_space_prefix", "bool"),
    ("_count", "int"),
    ("_length", "int"),
    (".vocab_size", "int"),
    (".sliding_window", "int"),
    (".rope.scaling.type", "str"),
    ("_epsilon", "number"),
    (".freq_base", "number"),
    (".scale_linear", "number"),
    (".rope.scaling.factor", "number"),
    (".rope.scaling.attn_factor", "number"),
    ("_beta_fast", "number"),
    ("_beta_slow", "number"),
)


def expected_kind(key: str) -> str | None:
    """The kind ("int", "str", "strs", ...) `key` must have, or None when it is not checked."""
    if key in _EXACT:
        return _EXACT[key]
    return next((kind for suffix, kind in _SUFFIXES if key.endswith(suffix)), None)


def check_value_type(field: GGUFField, path: Path) -> None:
    """Raise a CheckpointError when `field`'s declared type is not the kind its key needs."""
    kind = expected_kind(field.name)
    if kind is None:
        return
    what, allowed = _KINDS[kind]
    if tuple(field.types[:2]) not in allowed:
        got = (
            "[" + ", ".join(t.name for t in field.types) + "]"
            if len(field.types) > 1
            else field.types[0].name
        )
        raise CheckpointError(
            f"{path}: GGUF metadata '{field.name}' has type {got}, expected {what}; the file is corrupt "
            "or was written by a converter weightsmith does not know: re-convert it"
        )
