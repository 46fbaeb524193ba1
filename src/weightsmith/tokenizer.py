"""Text <-> token ids for a checkpoint, backed by the Rust `tokenizers` library.

What it does: loads a Hugging Face tokenizer directory (tokenizer.json plus
tokenizer_config.json, special_tokens_map.json, generation_config.json and the
chat template files) or wraps a ready `tokenizers.Tokenizer` (such as the one
checkpoint/gguf.py builds from a GGUF file); encodes and decodes exactly as
transformers' `AutoTokenizer` does for the same files (BOS/EOS, special
tokens); renders the checkpoint's chat template; turns a stream of token ids
into text deltas (`StreamDecoder`); and saves a directory that `AutoTokenizer`
loads back identically.

What it does not do: parse the config files' fields (tokenizer_config.py),
read slow-tokenizer files (tokenizer.model, vocab.txt, merges.txt without a
tokenizer.json), train tokenizers, pad or truncate batches (callers batch ids
themselves), or apply `clean_up_tokenization_spaces` (transformers >= 5 skips
it for BPE models, which is what chat LLMs use).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from weightsmith.chat_template import ChatTemplateError, TemplateLimits, assistant_spans, render_chat_template
from weightsmith.errors import CheckpointError
from weightsmith.files import read_json, write_json_atomic, write_text_atomic
from weightsmith.tokenizer_config import (
    config_added_tokens,
    config_flag,
    generation_eos_ids,
    named_tokens,
    parse_templates,
    read_tokenizer_config,
    register_special_tokens,
    token_content,
)

__all__ = ["StreamDecoder", "Tokenizer"]

logger = logging.getLogger(__name__)


class Tokenizer:
    """A checkpoint's tokenizer: a `tokenizers.Tokenizer` plus the special-token settings around it.

    The backend is owned from here on: named special tokens it lacks are registered on it (as
    transformers does), and its truncation and padding are switched off so `encode` never cuts text.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        # A tokenizer.json may carry truncation/padding settings; transformers switches them off for
        # every plain call, and a silently truncated prompt is a bug we must not inherit.
        backend.no_truncation()
        backend.no_padding()
        named = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        self._special_tokens: dict[str, str] = {k: v for k, v in named.items() if v is not None}
        register_special_tokens(
            backend, [tokenizers.AddedToken(t, special=True) for t in self._special_tokens.values()]
        )
        self._templates: dict[str, str] = {"default": chat_template} if chat_template is not None else {}
        self._prefix_ids, self._suffix_ids = self._manual_special_ids(add_bos_token, add_eos_token)
        self._extra_eos_ids = frozenset(int(i) for i in extra_eos_token_ids)
        self._adds_bos, self._adds_eos = self._probe_added_special_tokens()

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load an HF tokenizer directory (tokenizer.json is required; the other files are optional)."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(
                f"{root} is not a directory; pass the checkpoint folder that holds tokenizer.json"
            )
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"{tokenizer_file} not found; weightsmith reads fast tokenizers only, so re-save the tokenizer "
                "with transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to create it"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for any malformed file
            raise CheckpointError(
                f"{tokenizer_file}: the tokenizers library cannot read it ({e}); re-download or re-save the file"
            ) from e
        config = read_tokenizer_config(root)
        return cls.from_config(backend, config, read_json(root / "generation_config.json", required=False))

    @classmethod
    def from_config(
        cls,
        backend: tokenizers.Tokenizer,
        tokenizer_config: Mapping[str, Any],
        generation_config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """Wrap `backend` with the settings of a parsed tokenizer_config.json (and generation_config.json)."""
        named = named_tokens(tokenizer_config)
        # Register everything the config calls special before __init__ looks up ids, keeping the
        # config's AddedToken flags (lstrip, normalized, ...) that a bare string would lose.
        register_special_tokens(backend, config_added_tokens(tokenizer_config, named))
        templates = parse_templates(tokenizer_config.get("chat_template"))
        tokenizer = cls(
            backend,
            bos_token=token_content(named.get("bos_token")),
            eos_token=token_content(named.get("eos_token")),
            pad_token=token_content(named.get("pad_token")),
            unk_token=token_content(named.get("unk_token")),
            add_bos_token=config_flag(tokenizer_config, "add_bos_token"),
            add_eos_token=config_flag(tokenizer_config, "add_eos_token"),
            chat_template=templates.get("default"),
            extra_eos_token_ids=generation_eos_ids(generation_config),
        )
        # Model-specific names (sep_token, image_token, ...) are template variables in transformers.
        tokenizer._special_tokens.update({key: token_content(value) for key, value in named.items()})
        tokenizer._templates.update(templates)
        return tokenizer

    def _manual_special_ids(self, add_bos: bool, add_eos: bool) -> tuple[list[int], list[int]]:
        """BOS/EOS ids that `encode` must add itself: only when the backend has no post-processor.

        A tokenizer.json post-processor (TemplateProcessing) already adds them; adding them again
        would double the BOS. A GGUF-built backend has none and relies on the add_bos flag instead.
        """
        if self._backend.post_processor is not None:
            return [], []
        prefix = self._flag_ids("bos_token", add_bos)
        suffix = self._flag_ids("eos_token", add_eos)
        return prefix, suffix

    def _flag_ids(self, name: str, wanted: bool) -> list[int]:
        if not wanted:
            return []
        token_id = self._token_id(name)
        if token_id is None:
            # transformers silently turns add_bos_token off when there is no bos_token; say so at least.
            logger.warning("add_%s is set but the tokenizer has no %s; not adding one", name, name)
            return []
        return [token_id]

    def _probe_added_special_tokens(self) -> tuple[bool, bool]:
        # Whether encode adds BOS/EOS, read off a probe so it is right for any post-processor.
        try:
            plain = self.encode("a", add_special_tokens=False)
            full = self.encode("a")
        except Exception:  # e.g. a WordLevel model without an unk token rejects "a"
            plain, full = [], self.encode("")
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        prefix, suffix = full[:start], full[start + len(plain) :]
        bos, eos = self.bos_token_id, self.eos_token_id
        return bos is not None and bos in prefix, eos is not None and eos in suffix

    # ----- vocabulary -----------------------------------------------------------------------------

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts BOS first (post-processor or flag)."""
        return self._adds_bos

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts EOS last."""
        return self._adds_eos

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the eos token plus generation_config's eos_token_id list."""
        eos = self.eos_token_id
        return self._extra_eos_ids | ({eos} if eos is not None else set())

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._backend.id_to_token(int(id))

    # ----- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and (self._prefix_ids or self._suffix_ids):
            return self._prefix_ids + ids + self._suffix_ids
        return ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (no special tokens added) with each token's [start, end) characters."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: Iterable[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for a single string")
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        if add_special_tokens and (self._prefix_ids or self._suffix_ids):
            return [self._prefix_ids + e.ids + self._suffix_ids for e in encodings]
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self._backend, skip_special_tokens=skip_special_tokens)

    # ----- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        limits: TemplateLimits | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render the chat with the checkpoint's template; with `tokenize=True` return its ids.

        The template writes BOS itself, so the ids are encoded with add_special_tokens=False
        (transformers does the same). Every named special token (bos_token, eos_token, pad_token,
        ...) is a template variable; `extra` adds or overrides variables. `limits` bound the
        render (the template is untrusted code; None: the defaults).
        """
        template = self._select_template(tools)
        variables = {**self._special_tokens, **extra}
        bos = variables.pop("bos_token", "")
        eos = variables.pop("eos_token", "")
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            tools=tools,
            limits=limits,
            **variables,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def chat_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant output
        (see `weightsmith.chat_template.assistant_spans`)."""
        return assistant_spans(self._select_template(None), messages, **self._special_tokens)

    def _select_template(self, tools: object) -> str:
        # Checkpoints with several named templates (Cohere: default, tool_use, rag) pick
        # tool_use when tools are passed, as transformers does.
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if self._templates:
            raise ChatTemplateError(
                f"the tokenizer has chat templates {sorted(self._templates)} but none named 'default'; "
                "rename one to 'default' in tokenizer_config.json"
            )
        raise ChatTemplateError(
            "the tokenizer has no chat template; add 'chat_template' to tokenizer_config.json "
            "or a chat_template.jinja file next to it"
        )

    # ----- save -----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / "tokenizer.json", self._backend_for_save().to_str(pretty=True))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            **self._special_tokens,
        }
        if set(self._templates) == {"default"}:
            config["chat_template"] = self._templates["default"]
        elif self._templates:
            config["chat_template"] = [{"name": n, "template": t} for n, t in self._templates.items()]
        write_json_atomic(root / "tokenizer_config.json", config)
        write_json_atomic(root / "special_tokens_map.json", dict(self._special_tokens))

    def _backend_for_save(self) -> tokenizers.Tokenizer:
        """The backend as transformers must see it: BOS/EOS we add by hand become a post-processor.

        transformers ignores add_bos_token when a tokenizer.json exists, so a hand-added BOS must be
        written into the file or a reload would lose it.
        """
        if not (self._prefix_ids or self._suffix_ids):
            return self._backend
        copy = tokenizers.Tokenizer.from_str(self._backend.to_str())
        specials = []
        single = "$A:0"
        if self._prefix_ids:
            specials.append((self.bos_token, self._prefix_ids[0]))
            single = f"{self.bos_token}:0 {single}"
        if self._suffix_ids:
            specials.append((self.eos_token, self._suffix_ids[0]))
            single = f"{single} {self.eos_token}:0"
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        copy.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        return copy


class StreamDecoder:
    """Turns token ids arriving one at a time into text deltas whose concatenation is the full decode.

    Decoding one token on its own is wrong for two reasons: a character may span several tokens
    (byte-level BPE, SentencePiece byte fallback), and SentencePiece decoders drop the leading space
    of whichever token comes first. So we keep a small window: ids[prefix:read] were already emitted
    and serve as context, and each push decodes ids[prefix:] and emits what it adds to the window's
    previous decode (the "prefix offset" technique of text-generation-inference and vLLM). Text that
    ends in U+FFFD is an incomplete UTF-8 sequence and is held back until the next token completes it.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # end of the ids whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often '', never a partial character)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character comes out as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""  # nothing pending; keep the current window as context for later pushes
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        return self._emit(new_text[len(prefix_text) :])

    def _emit(self, delta: str) -> str:
        # The ids just emitted become the next window's context; older ids are never decoded again.
        start = self._read_offset
        del self._ids[: self._prefix_offset]
        self._prefix_offset = start - self._prefix_offset
        self._read_offset = len(self._ids)
        return delta
