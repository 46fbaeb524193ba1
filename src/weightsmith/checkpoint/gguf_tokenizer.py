"""Rebuild a `tokenizers.Tokenizer` from a GGUF file's vocabulary, merges and special tokens.

Byte-level BPE ("gpt2" vocabularies, with the pre-tokenizer regexes named by
`tokenizer.ggml.pre`) and SentencePiece-style BPE ("llama" vocabularies, with byte
fallback). Where llama.cpp and transformers differ, llama.cpp's behaviour is matched,
since it wrote the file. Not here: model metadata and weights (gguf.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from weightsmith.checkpoint.gguf import add_bos_default, as_reader, meta, reader_path, require
from weightsmith.checkpoint.gguf_reader import GGUFFile
from weightsmith.errors import CheckpointError

# Pre-tokenizer splits for byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`. Each entry
# is applied in order, as llama.cpp's `llama-vocab.cpp` chains its regexes for that name; the
# patterns are the public ones from the models' own tokenizer.json files.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (GPT-4o, gpt-oss): an uppercase run ends a word before a lowercase one, contractions end
# words, digits in threes, a punctuation run takes trailing newlines and slashes.
_WORD_CASES = (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_O200K_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_WORD_CASES[0]}*{_WORD_CASES[1]}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_WORD_CASES[0]}+{_WORD_CASES[1]}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # A file without a recorded pre-tokenizer ("default") gets GPT-2's split, as transformers
    # does; llama.cpp's own fallback also splits punctuation runs first.
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    # SmolLM/StarCoder vocabularies: every digit alone, then GPT-2's split.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "gpt-4o": (_O200K_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
# Llama 3 looks a whole pre-token up in the vocabulary before merging (`ignore_merges` in its
# tokenizer.json; llama.cpp sets the same flag for these names).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


@dataclass
class _GGUFVocab:
    """The tokenizer part of a GGUF file's metadata."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre: which pre-tokenizer split the merges were learned with
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def _read_vocab(reader: GGUFFile) -> _GGUFVocab:
    tokens = require(reader, "tokenizer.ggml.tokens")
    types = meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{reader_path(reader)}: GGUF has {len(tokens)} tokens but {len(types)} token types; "
            "the file is corrupt"
        )
    return _GGUFVocab(
        model=require(reader, "tokenizer.ggml.model"),
        pre=meta(reader, "tokenizer.ggml.pre", "default"),
        tokens=tokens,
        token_types=types,
        scores=meta(reader, "tokenizer.ggml.scores"),
        merges=meta(reader, "tokenizer.ggml.merges"),
        bos_id=meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=meta(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=meta(reader, "tokenizer.ggml.unknown_token_id"),
        add_bos=add_bos_default(reader),
        add_eos=bool(meta(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta(reader, "tokenizer.ggml.add_space_prefix", True)),
    )


def _bpe(vocab: _GGUFVocab, merges: list, path: Path, **options: Any) -> Tokenizer:
    """A Tokenizer around a BPE model of the file's tokens (their index is their id)."""
    ids = {token: index for index, token in enumerate(vocab.tokens)}
    try:
        return Tokenizer(models.BPE(ids, merges, **options))
    except Exception as error:  # tokenizers raises a bare Exception, e.g. for a merge of an unknown token
        raise CheckpointError(f"{path}: the GGUF vocabulary and merges do not agree ({error})") from error


def _byte_level_bpe(vocab: _GGUFVocab, path: Path) -> Tokenizer:
    """GPT-2-style BPE: tokens are spelled in the byte-to-unicode alphabet, merges are given."""
    splits = PRE_TOKENIZER_SPLITS.get(vocab.pre)
    if splits is None:
        raise CheckpointError(
            f"{path}: GGUF pre-tokenizer '{vocab.pre}' is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})"
        )
    if vocab.merges is None:
        raise CheckpointError(f"{path}: GGUF metadata key 'tokenizer.ggml.merges' is missing")
    merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
    tokenizer = _bpe(vocab, merges, path, ignore_merges=vocab.pre in _IGNORE_MERGES)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        # The splits above already cut the text; ByteLevel only maps bytes to its alphabet.
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    concatenation is the highest-scoring vocabulary entry. A BPE whose merges are every
    (left, right) split of every entry, ranked by the entry's score, makes the same choices.
    """
    ids = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for piece, index in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[index], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(vocab: _GGUFVocab, path: Path) -> Tokenizer:
    """SentencePiece BPE: "▁" marks spaces, unknown bytes fall back to <0xNN> tokens."""
    if vocab.scores is None and vocab.merges is None:
        raise CheckpointError(f"{path}: GGUF metadata key 'tokenizer.ggml.scores' is missing")
    if vocab.merges is not None:
        merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
    else:
        merges = _merges_from_scores(vocab.tokens, vocab.scores)
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    tokenizer = _bpe(vocab, merges, path, unk_token=unk, fuse_unk=True, byte_fallback=True)
    # The prefix space goes in the normalizer, which runs on each stretch of text between special
    # tokens: llama.cpp (like SentencePiece called per segment) adds it after every special token.
    steps = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        undo.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(undo)
    return tokenizer


_TOKENIZER_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _add_special_tokens(tokenizer: Tokenizer, vocab: _GGUFVocab) -> None:
    """Register control/unknown tokens as special and user-defined ones as added tokens.

    Both kinds are then matched whole in the input and never split by the model. Control tokens
    (like <|im_start|>) are special, so decode(skip_special_tokens=True) drops them; user-defined
    ones (like <think>) are text and stay, as in llama.cpp and transformers.
    """
    special, added = [], []
    for token, kind in zip(vocab.tokens, vocab.token_types, strict=True):
        if kind in (_CONTROL, _UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(added)


def _add_bos_eos(tokenizer: Tokenizer, vocab: _GGUFVocab) -> None:
    """A post-processor adding BOS/EOS to every encoded sequence, as the file's flags ask."""
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos and vocab.eos_id is not None else None
    if bos is None and eos is None:
        return
    single = [t for t in (bos, "$A", eos) if t is not None]
    pair = single + [t for t in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if t]
    specials = [(t, i) for t, i in ((bos, vocab.bos_id), (eos, vocab.eos_id)) if t is not None]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


def build_gguf_tokenizer(path_or_reader: str | Path | GGUFFile) -> Tokenizer:
    """A `tokenizers.Tokenizer` rebuilt from a GGUF file's vocabulary, merges and special tokens."""
    reader = as_reader(path_or_reader)
    path = reader_path(reader)
    vocab = _read_vocab(reader)
    builder = _TOKENIZER_BUILDERS.get(vocab.model)
    if builder is None:
        raise CheckpointError(
            f"{path}: GGUF tokenizer model '{vocab.model}' is not supported "
            f"(supported: {', '.join(_TOKENIZER_BUILDERS)})"
        )
    tokenizer = builder(vocab, path)
    _add_special_tokens(tokenizer, vocab)
    _add_bos_eos(tokenizer, vocab)
    return tokenizer
