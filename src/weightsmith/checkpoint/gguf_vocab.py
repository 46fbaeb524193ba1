"""The tokenizer part of a GGUF file we write: a model's tokenizer as one of llama.cpp's vocabularies.

Two kinds are written, whichever the tokenizer is:
- byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen) as llama.cpp's "gpt2" vocabulary: tokens in the
  byte-to-unicode alphabet, token types, merges, and the pre-tokenizer's name (`tokenizer.ggml.pre`)
  where its split regexes are ones llama.cpp knows;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3: "▁" for spaces,
  `<0xNN>` tokens for bytes) as llama.cpp's "llama" vocabulary, which has scores instead of
  merges: llama.cpp (like SentencePiece) joins the adjacent pair whose concatenation scores
  highest. A tokenizer.json converted from SentencePiece lists every such pair as a merge, ranked
  by that score, so a token's score here is minus the rank of the first merge that makes it, and
  llama.cpp makes the choices the merges make. `tokenizer.ggml.add_space_prefix` says whether a
  "▁" goes before the text (a `Prepend` normalizer, or a `Metaspace` pre-tokenizer that prepends).

Both are padded to the embedding's row count with unused placeholder tokens, as llama.cpp's
converter writes them, and carry the special token ids, the BOS/EOS flags and the chat template.
`GGUFWriter` is gguf-py's writer with such long arrays packed in one pass (the same bytes).
Reading them back is gguf_tokenizer.py; the rest of the file is gguf_write.py.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf import GGUFValueType as VT

from weightsmith.checkpoint.gguf_tokenizer import PRE_TOKENIZER_SPLITS
from weightsmith.errors import CheckpointError

if TYPE_CHECKING:
    from weightsmith.models import ModelConfig
    from weightsmith.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Byte-level pre-tokenizer split sequences -> the `tokenizer.ggml.pre` name written for them. Several
# llama.cpp names share one split (smollm/starcoder, llama3 aliases); these are the canonical ones.
_PRE_NAMES = {
    PRE_TOKENIZER_SPLITS[name]: name for name in ("gpt-2", "llama-bpe", "qwen2", "smollm", "gpt-4o")
}
_GPT2_SPLIT = PRE_TOKENIZER_SPLITS["gpt-2"][0]
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_T = gguf.TokenType


#: numpy's codes for GGUF's fixed-width array item types.
_NUMPY_CODES = {VT.UINT8: "u1", VT.INT8: "i1", VT.UINT16: "u2", VT.INT16: "i2", VT.UINT32: "u4",
                VT.INT32: "i4", VT.FLOAT32: "f4", VT.UINT64: "u8", VT.INT64: "i8", VT.FLOAT64: "f8"}  # fmt: skip


class GGUFWriter(gguf.GGUFWriter):
    """gguf-py's writer, packing a metadata array of strings or numbers in one pass where gguf-py
    packs (and type-checks) one value at a time: 3.4 s of the 8.5 s export of Gemma 3 270M, whose
    vocabulary has 262,144 tokens, types and scores. The bytes are gguf-py's; anything else (other
    values, mixed or nested arrays) goes to gguf-py's own packing."""

    def _pack_val(self, val: Any, vtype: VT, add_vtype: bool, sub_type: VT | None = None) -> bytes:
        body = (
            self._pack_array(val, sub_type) if vtype == VT.ARRAY and isinstance(val, list) and val else None
        )
        if body is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (self._pack("I", vtype) if add_vtype else b"") + body

    def _pack_array(self, val: list[Any], sub_type: VT | None) -> bytes | None:
        kind = type(val[0])
        if kind not in (str, int, float) or any(type(v) is not kind for v in val):
            return None
        item = sub_type if sub_type is not None else VT.get_type(val[0])
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        if item == VT.STRING and kind is str:
            length = struct.Struct(f"{order}Q").pack
            encoded = [v.encode("utf-8") for v in val]
            body = b"".join(part for e in encoded for part in (length(len(e)), e))
        elif item in _NUMPY_CODES and kind is not str:
            body = np.asarray(val, dtype=f"{order}{_NUMPY_CODES[item]}").tobytes()
        else:
            return None
        return self._pack("I", item) + self._pack("Q", len(val)) + body


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)  # "gpt2"
    scores: list[float] = field(default_factory=list)  # "llama"
    add_space_prefix: bool = False


def _split_patterns(pre: dict[str, Any] | None) -> tuple[tuple[str, ...] | None, bool]:
    """(regex splits the pre-tokenizer applies in order, whether it is byte-level).

    Splits are None when a step is not one llama.cpp can express by a known name.
    """
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    patterns: list[str] = []
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            byte_level = True
            if step.get("use_regex", True):  # ByteLevel's own regex is GPT-2's split
                patterns.append(_GPT2_SPLIT)
        elif kind == "Digits" and step.get("individual_digits"):
            patterns.append(r"\p{N}")
        elif kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated":
            if step.get("invert"):
                return None, byte_level
            patterns.append(step["pattern"]["Regex"])
        else:
            return None, byte_level
    return tuple(patterns), byte_level


def _steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The steps of a normalizer or pre-tokenizer spec, a Sequence or a single one."""
    if not part:
        return []
    return list(part.get(key) or []) if part.get("type") == "Sequence" else [part]


def _sentencepiece_layout(spec: dict[str, Any], source: str) -> bool:
    """Whether the tokenizer prepends "▁" to the text; refuses what llama.cpp's SentencePiece
    vocabulary cannot express (a pre-tokenizer that splits the text, another normalizer)."""
    prepend = False
    for step in _steps(spec.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            prepend = True
        elif not (step.get("type") == "Replace" and step.get("content") == "▁"):
            raise CheckpointError(
                f"{source}: the tokenizer's {step.get('type')} normalizer cannot be written to a GGUF "
                "SentencePiece vocabulary (llama.cpp only maps spaces to ▁)"
            )
    for step in _steps(spec.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace" and not step.get("split", False):
            prepend = prepend or step.get("prepend_scheme", "always") != "never"
        else:
            raise CheckpointError(
                f"{source}: the tokenizer's {step.get('type')} pre-tokenizer cannot be written to a GGUF "
                "SentencePiece vocabulary (llama.cpp does not split the text before merging)"
            )
    return prepend


def _merge_list(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _by_id(spec: dict[str, Any], vocab_size: int, source: str) -> tuple[dict[int, str], dict[int, int]]:
    """Every token by id (the model's vocabulary and the added tokens) and its llama.cpp type:
    special added tokens are control tokens (matched whole, dropped when decoding with specials
    skipped), other added tokens user-defined (matched whole, kept as text)."""
    ids: dict[int, str] = {int(i): t for t, i in spec["model"]["vocab"].items()}
    types = dict.fromkeys(ids, int(_T.NORMAL))
    for added in spec.get("added_tokens") or []:
        ids[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(_T.CONTROL if added["special"] else _T.USER_DEFINED)
    if max(ids) >= vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has token id {max(ids)} but the model's vocab_size is {vocab_size}; "
            "the tokenizer and model do not match"
        )
    return ids, types


def _padded(ids: dict[int, str], types: dict[int, int], vocab_size: int) -> tuple[list[str], list[int]]:
    """One token per embedding row: rows without one get placeholders, as llama.cpp's converter
    writes them, unused (also where a file we wrote is exported again, its placeholders read back)."""
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    unused = int(_T.UNUSED)
    return tokens, [unused if t == f"[PAD{i}]" else types.get(i, unused) for i, t in enumerate(tokens)]


def _byte_level_vocab(
    spec: dict[str, Any], splits: tuple[str, ...] | None, vocab_size: int, source: str
) -> _Vocab:
    pre = _PRE_NAMES.get(splits) if splits is not None else None
    if pre is None:
        logger.warning(
            "GGUF export: the tokenizer's pre-tokenizer matches no name llama.cpp knows; writing "
            "tokenizer.ggml.pre 'default', so llama.cpp may split some text differently"
        )
        pre = "default"
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        logger.warning("GGUF export: the tokenizer's %s normalizer is not written", normalizer.get("type"))
    tokens, types = _padded(*_by_id(spec, vocab_size, source), vocab_size)
    merges = [" ".join(m) for m in _merge_list(spec["model"])]
    return _Vocab("gpt2", pre, tokens, types, merges=merges)


def _sentencepiece_vocab(spec: dict[str, Any], vocab_size: int, source: str) -> _Vocab:
    prepend = _sentencepiece_layout(spec, source)
    ids, types = _by_id(spec, vocab_size, source)
    unk = spec["model"].get("unk_token")
    for i, token in ids.items():
        if token == unk:
            types[i] = int(_T.UNKNOWN)
        elif types[i] == _T.NORMAL and _BYTE_TOKEN.fullmatch(token):
            types[i] = int(_T.BYTE)
    merges = _merge_list(spec["model"])
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    # A token no merge makes is never joined from two others: below every merged token.
    floor = -float(len(merges) + 1)
    tokens, token_types = _padded(ids, types, vocab_size)
    scores = [-float(rank[t]) if t in rank else floor for t in tokens]
    return _Vocab("llama", "default", tokens, token_types, scores=scores, add_space_prefix=prepend)


def _vocab(tokenizer: Tokenizer, vocab_size: int, source: str) -> _Vocab:
    """The tokenizer as llama.cpp's "gpt2" or "llama" vocabulary, or a CheckpointError saying why not."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    splits, byte_level = _split_patterns(spec.get("pre_tokenizer"))
    if model.get("type") == "BPE" and byte_level and not model.get("byte_fallback"):
        return _byte_level_vocab(spec, splits, vocab_size, source)
    if model.get("type") == "BPE" and model.get("byte_fallback") and not byte_level:
        return _sentencepiece_vocab(spec, vocab_size, source)
    raise CheckpointError(
        f"{source}: only byte-level BPE and SentencePiece-style BPE (byte fallback) tokenizers can be "
        f"exported to GGUF (this one is {model.get('type')}"
        f"{' with byte fallback' if model.get('byte_fallback') else ''}{'' if byte_level else ', not byte-level'})"
    )


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, cfg: ModelConfig, source: str) -> str:
    """Write the tokenizer's metadata; returns the pre-tokenizer name written."""
    vocab = _vocab(tokenizer, cfg.vocab_size, source)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    config_eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config_eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
    unk = tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id)):
        if value is not None:
            add(int(value))
    for value, add in ((pad, writer.add_pad_token_id), (unk, writer.add_unk_token_id)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    writer.add_add_eos_token(bool(tokenizer.add_eos_token))
    template = tokenizer.chat_template
    if isinstance(template, dict):
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        writer.add_chat_template(template)
    return vocab.pre
