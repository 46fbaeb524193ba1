"""Render a checkpoint's Jinja chat template into a prompt string.

What it does: checks the messages, then renders the template in the same Jinja
environment transformers uses for `apply_chat_template` (sandboxed, immutable,
`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`,
`strftime_now`, a `tojson` filter that keeps non-ASCII text, and a
`{% generation %}` tag), so a prompt rendered here is byte-for-byte the prompt
transformers renders. Compiled templates are cached by their source text.

What it does not do: choose which template a checkpoint uses or tokenize the
result (`weightsmith.tokenizer.Tokenizer.apply_chat_template` does both),
continue a final message, or turn Python functions into tool schemas (pass
JSON-schema dicts). `assistant_spans` finds which characters of a rendered
conversation are assistant output, for training masks; turning them into token
masks is the training data's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from types import TracebackType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser

from weightsmith.errors import WeightsmithError
from weightsmith.template_limits import LimitedSandbox, TemplateLimitError, TemplateLimits, limited

__all__ = [
    "ChatMessageError",
    "ChatTemplateError",
    "TemplateLimits",
    "assistant_spans",
    "render_chat_template",
]

# Names a message's reasoning may arrive under; templates read `reasoning_content` (Qwen3, DeepSeek) or
# `thinking` (gpt-oss). transformers >= 5 copies whichever is set to both, so we do too.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(WeightsmithError):
    """A chat template cannot be compiled or rendered, or rejected the conversation itself."""


class ChatMessageError(ChatTemplateError):
    """The messages handed to a chat template are not a list of {"role", "content"} dicts."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    limits: TemplateLimits | None = None,
    **extra: Any,
) -> str:
    """Render `messages` with the Jinja chat `template` and return the prompt text.

    `extra` becomes template variables (e.g. `enable_thinking=False`, `documents=[...]`,
    `pad_token`); `bos_token` and `eos_token` have their own parameters.
    The caller's messages are never mutated: the template sees a plain-data copy.
    The template is untrusted code: it runs in Jinja's sandbox within `limits` (time, value
    and output size; `TemplateLimits()`'s defaults when None, see template_limits.py).
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    chat = _prepare_messages(messages)
    if tools is not None:
        _check_tools(tools)
    compiled = _compile(template)
    # transformers always defines `tools` and `documents` (as None when absent); templates test
    # `{% if tools %}` or `{% if documents is not none %}`, so leaving them undefined would render differently.
    context: dict[str, Any] = {"tools": None, "documents": None}
    context.update(_plain(extra))
    context.update(
        messages=chat,
        tools=_plain(list(tools)) if tools is not None else None,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    try:
        with limited(limits or TemplateLimits()):
            return "".join(compiled.generate(**context))
    except ChatTemplateError:
        raise
    except Exception as e:  # any failure inside template code is the template's fault
        line = _template_line(e.__traceback__)
        where = f"chat template line {line}" if line is not None else "chat template"
        if isinstance(e, TemplateLimitError):
            raise ChatTemplateError(f"{where}: stopped: {e}") from None
        detail = str(e).replace("\n", " ") or type(e).__name__
        raise ChatTemplateError(
            f"{where}: rendering failed ({type(e).__name__}: {detail}); fix the template or the messages it reads"
        ) from e


def _raise_exception(message: str) -> None:
    # Templates call raise_exception('Conversation roles must alternate ...') to reject a chat; the
    # message is the template author's, so pass it through unchanged.
    raise ChatTemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' and forces ASCII; transformers replaces it with
    # plain json.dumps so tool schemas reach the model as written. Same signature as HF's filter.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    # Llama 3.x templates stamp "Today Date: ..." with this.
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does, so a template cannot plant
    dunder attributes on an object the sandbox then trusts."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no named `self`, like jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise ChatTemplateError(f"chat template: namespace attribute {name!r} starts with '_'; rename it")


#: Template variable that makes `{% generation %}` blocks wrap their output in the two
#: private-use markers below (only `assistant_spans` sets it).
_MARK_VARIABLE = "weightsmith_mark_generation"
_GEN_START, _GEN_END = "\ue000", "\ue001"
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some
    templates (SmolLM3, Qwen3 variants). Rendered normally it outputs its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [jinja2.nodes.Name(_MARK_VARIABLE, "load")])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, enabled: object, caller: Any) -> str:
        text = caller()
        return f"{_GEN_START}{text}{_GEN_END}" if enabled is True else text


def assistant_spans(
    template: str, messages: Sequence[Mapping[str, Any]], **variables: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Render the whole conversation and return it with the [start, end) character spans
    of the assistant output a model should learn to produce.

    Templates with `{% generation %}` blocks say so themselves (transformers'
    `return_assistant_tokens_mask` reads the same blocks). For the others, assistant
    turn i is the text that rendering messages[: i + 1] adds to rendering messages[: i]
    with the generation prompt, trailing whitespace excluded: exactly what the model
    would generate after that prompt, up to and including the end-of-turn token.
    """
    if _GENERATION_TAG.search(template):
        marked = render_chat_template(
            template, messages, add_generation_prompt=False, **{_MARK_VARIABLE: True}, **variables
        )
        return _strip_markers(marked)
    full = render_chat_template(template, messages, add_generation_prompt=False, **variables)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = render_chat_template(template, messages[:i], add_generation_prompt=True, **variables)
        through = render_chat_template(template, messages[: i + 1], add_generation_prompt=False, **variables)
        if not (through.startswith(prompt) and full.startswith(through)):
            raise ChatTemplateError(
                f"messages[{i}]: the chat template renders earlier turns differently once later turns "
                "are added, so assistant text cannot be located; use a template with "
                "{% generation %} blocks, or train on the whole text (--train-on-prompt)"
            )
        spans.append((len(prompt), len(through.rstrip())))
    return full, spans


def _strip_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length, start = 0, None
    for piece in re.split(f"([{_GEN_START}{_GEN_END}])", marked):
        if piece == _GEN_START:
            start = length
        elif piece == _GEN_END and start is not None:
            spans.append((start, length))
            start = None
        elif piece:
            out.append(piece)
            length += len(piece)
    return "".join(out), [s for s in spans if s[1] > s[0]]


def _make_environment() -> LimitedSandbox:
    env = LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.guard_filters()  # tojson too
    return env


_ENV = _make_environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # Templates are several KB and a server renders one per request; compiling costs ~ms, so cache by text.
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template line {e.lineno}: syntax error: {e.message}; fix the Jinja syntax on that line"
        ) from e


def _template_line(tb: TracebackType | None) -> int | None:
    # Jinja rewrites tracebacks so template code appears as frames of file "<template>" with the
    # template's own line numbers; the innermost such frame is where it failed.
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the messages and return plain-data copies with reasoning fields aliased."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatMessageError(
            f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}"
        )
    if not messages:
        raise ChatMessageError("messages is empty; pass at least one {'role': ..., 'content': ...} message")
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatMessageError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        # OpenAI-style clients send `content: None` next to `tool_calls`; transformers drops None-valued
        # keys because templates handle a missing key but would print a literal "None".
        message = {key: value for key, value in message.items() if value is not None}
        _check_message(index, message)
        chat.append(_alias_reasoning(_plain(message)))
    return chat


def _check_message(index: int, message: Mapping[str, Any]) -> None:
    role = message.get("role")
    if not isinstance(role, str):
        got = "missing" if role is None else type(role).__name__
        raise ChatMessageError(f"messages[{index}]['role'] must be a string such as 'user', got {got}")
    if "content" not in message:
        if "tool_calls" in message:
            return  # an assistant turn that only calls tools has no text
        raise ChatMessageError(f"messages[{index}] ({role}) has no 'content'; add the message text")
    content = message["content"]
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ChatMessageError(
            f"messages[{index}]['content'] must be a string or a list of content parts, "
            f"got {type(content).__name__}"
        )
    for part_index, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise ChatMessageError(
                f"messages[{index}]['content'][{part_index}] must be a dict with a 'type' "
                f"such as {{'type': 'text', 'text': ...}}, got {part!r:.60}"
            )


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _check_tools(tools: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatMessageError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatMessageError(
                f"tools[{index}] must be a JSON-schema dict like {{'type': 'function', 'function': {{...}}}}, "
                f"got {type(tool).__name__}"
            )


def _plain(value: Any) -> Any:
    """A copy of `value` built only from JSON types.

    Templates come from the Hub and are untrusted code; an arbitrary object's public methods are
    callable inside the sandbox, so the template only ever sees dicts, lists and scalars (what
    transformers does too). Anything else becomes a placeholder such as "<ndarray>".
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"
