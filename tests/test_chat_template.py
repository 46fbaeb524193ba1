"""Chat template rendering: parity with transformers' apply_chat_template, and clear errors.

Each template below is written for this test and exercises one family of Jinja features real
checkpoints use (Llama 2's role checks and bos_token, ChatML system defaults, tool schemas through
tojson, namespace counters, content-part lists, reasoning fields, loop controls).
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from weightsmith.chat_template import ChatMessageError, ChatTemplateError, _compile, render_chat_template
from weightsmith.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

CHATML = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
<|im_start|>system
{{ system }}<|im_end|>
{% for message in loop_messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
    {% if not loop.last %}
{{ '' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

TOOLS = """\
{%- set ns = namespace(system='', count=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.system = ns.system + m.content -%}{%- endif -%}
{%- endfor -%}
{%- if tools -%}
<tools>
{{ tools | tojson(indent=2) }}
</tools>
{% endif %}
{% if ns.system %}SYSTEM: {{ ns.system }}
{% endif %}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- if loop.first %}[first]{% endif -%}
  {{ m.role | upper }}:
  {%- if m.content is string %} {{ m.content }}
  {%- elif m.content is defined %}{% for part in m.content %}{% if part.type == 'text' %} {{ part.text }}
  {%- elif part.type == 'image' %} <image>{% endif %}{% endfor %}
  {%- endif %}
  {%- if m.tool_calls is defined %} CALLS {{ m.tool_calls | tojson(sort_keys=true, separators=(',', ':')) }}{% endif %}
  {%- set ns.count = ns.count + 1 %}
  {%- if loop.last %} [last of {{ ns.count }}]{% endif %}
{{ eos_token }}
{% endfor -%}
{%- if add_generation_prompt %}ASSISTANT:{% endif -%}
"""

THINKING = """\
{% if documents is not none %}DOCS {{ documents | tojson }}
{% endif %}
{% for m in messages %}
{% if m.role == 'end' %}{% break %}{% endif %}
{{ m.role }}:{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
{% generation %}{{ m.content }}{% endgeneration %}{{ pad_token }}
{% endfor %}
{% if add_generation_prompt %}assistant:{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{% endif %}
"""

TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo à <ville> & région — 天気",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}

CHATS = {
    "llama2": [
        [{"role": "user", "content": "  Hi there  "}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": " 4 "},
            {"role": "user", "content": "And 3+3? 日本"},
        ],
    ],
    "chatml": [
        [{"role": "user", "content": "Hello\n"}],
        [
            {"role": "system", "content": "You speak French."},
            {"role": "user", "content": "  Bonjour ! 😀 "},
            {"role": "assistant", "content": "Salut."},
        ],
    ],
    "tools": [
        [
            {"role": "system", "content": "Sys A. "},
            {"role": "system", "content": "Sys B."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "content": '{"temp": 3}'},
        ],
        [{"role": "user", "content": "plain"}],
    ],
    "thinking": [
        [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because.", "reasoning": "think hard"},
            {"role": "end", "content": "ignored"},
            {"role": "user", "content": "never shown"},
        ],
    ],
}
TEMPLATES = {"llama2": LLAMA2, "chatml": CHATML, "tools": TOOLS, "thinking": THINKING}


def _build_backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t for chats in CHATS.values() for chat in chats for m in chat for t in [str(m.get("content"))]]
    tok.train_from_iterator((corpus + [LLAMA2, CHATML, TOOLS]) * 3, trainer)
    # Llama 3 style: the post-processor adds BOS, so tokenize=True must encode without special
    # tokens or templates that write bos_token themselves would get two.
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]),
        ]
    )
    return tok


@pytest.fixture(scope="module")
def backend_json() -> str:
    return _build_backend().to_str()


def make_dir(root: Path, backend_json: str, template: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(backend_json, encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<|endoftext|>",
        "chat_template": template,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pairs(backend_json: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, object]]:
    out = {}
    for name, template in TEMPLATES.items():
        path = make_dir(tmp_path_factory.mktemp(name), backend_json, template)
        out[name] = (Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path))
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(pairs: dict, name: str, add_generation_prompt: bool) -> None:
    ours, hf = pairs[name]
    tools = [TOOL_SCHEMA] if name == "tools" else None
    for chat in CHATS[name]:
        expected = hf.apply_chat_template(
            chat, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        got = ours.apply_chat_template(chat, tools=tools, add_generation_prompt=add_generation_prompt)
        assert got == expected
        expected_ids = hf.apply_chat_template(
            chat, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        assert ours.apply_chat_template(
            chat, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
        ) == list(expected_ids)


def test_extra_variables_and_documents_match_transformers(pairs: dict) -> None:
    ours, hf = pairs["thinking"]
    chat = CHATS["thinking"][0]
    docs = [{"title": "Doc", "text": "Texte é"}]
    for extra in ({"enable_thinking": False}, {"enable_thinking": True, "documents": docs}):
        expected = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **extra)
        assert ours.apply_chat_template(chat, **extra) == expected
    assert "<think>think hard</think>" in ours.apply_chat_template(chat)  # `reasoning` aliased


def test_raise_exception_in_both(pairs: dict) -> None:
    ours, hf = pairs["llama2"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"^Conversation roles must alternate user/assistant"):
        ours.apply_chat_template(bad)


def test_named_templates_pick_tool_use(backend_json: str, tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": TOOLS},
    ]
    path = make_dir(tmp_path, backend_json, named)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert ours.chat_template == "D{{ messages[0].content }}"
    with_tools = ours.apply_chat_template(chat, tools=[TOOL_SCHEMA])
    assert with_tools == hf.apply_chat_template(
        chat, tools=[TOOL_SCHEMA], tokenize=False, add_generation_prompt=True
    )
    assert "<tools>" in with_tools


def test_no_template_is_a_clear_error(backend_json: str, tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(make_dir(tmp_path, backend_json, None))
    with pytest.raises(ChatTemplateError, match="no chat template; add 'chat_template'"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_render_does_not_mutate_messages() -> None:
    chat = copy.deepcopy(CHATS["tools"][0]) + [
        {"role": "assistant", "content": "ok", "reasoning_content": "r"}
    ]
    before = copy.deepcopy(chat)
    render_chat_template(
        TOOLS + "{% for m in messages %}{{ m.thinking }}{% endfor %}", chat, tools=[TOOL_SCHEMA]
    )
    assert chat == before


def test_tojson_has_hf_semantics() -> None:
    value = {"b": "é <tag> & 'q'", "a": [1, 2.5, None, True]}
    cases = {
        "{{ v | tojson }}": json.dumps(value, ensure_ascii=False),
        "{{ v | tojson(indent=2) }}": json.dumps(value, ensure_ascii=False, indent=2),
        "{{ v | tojson(sort_keys=true) }}": json.dumps(value, ensure_ascii=False, sort_keys=True),
        "{{ v | tojson(separators=(',', ':')) }}": json.dumps(
            value, ensure_ascii=False, separators=(",", ":")
        ),
        "{{ v | tojson(ensure_ascii=true) }}": json.dumps(value),
    }
    chat = [{"role": "user", "content": "x"}]
    for template, expected in cases.items():
        assert render_chat_template(template, chat, v=value) == expected


def test_globals_and_cache() -> None:
    chat = [{"role": "user", "content": "x"}]
    assert render_chat_template("{{ strftime_now('%Y') }}", chat) == datetime.now().strftime("%Y")
    loop_template = "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_chat_template(loop_template, chat) == "02"
    assert _compile(LLAMA2) is _compile(LLAMA2)
    with pytest.raises(ChatTemplateError, match="namespace attribute '_x'"):
        render_chat_template("{% set ns = namespace(_x=1) %}", chat)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ("hello", r"messages must be a list of dicts"),
        ([], r"messages is empty"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"content": "a"}], r"messages\[0\]\['role'\] must be a string .* got missing"),
        ([{"role": 3, "content": "a"}], r"messages\[0\]\['role'\] must be a string .* got int"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] \(user\) has no 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 5}],
            r"messages\[1\]\['content'\] must be a string or a list of content parts, got int",
        ),
        (
            [{"role": "user", "content": ["hi"]}],
            r"messages\[0\]\['content'\]\[0\] must be a dict with a 'type'",
        ),
    ],
)
def test_bad_messages_name_the_index(messages: object, pattern: str) -> None:
    with pytest.raises(ChatMessageError, match=pattern) as info:
        render_chat_template(CHATML, messages)
    assert "\n" not in str(info.value)


def test_tool_call_message_without_content_is_accepted() -> None:
    chat = [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]
    assert "CALLS" in render_chat_template(TOOLS, chat)
    with pytest.raises(ChatMessageError, match=r"tools\[0\] must be a JSON-schema dict"):
        render_chat_template(TOOLS, chat, tools=["get_weather"])


def test_syntax_error_names_the_line() -> None:
    template = "line one\n{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"^chat template line 3: syntax error") as info:
        render_chat_template(template, [{"role": "user", "content": "x"}])
    assert "\n" not in str(info.value)


def test_runtime_error_names_the_line() -> None:
    template = "first\n{% for m in messages %}\n{{ m.content + 1 }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"^chat template line 3: rendering failed \(TypeError"):
        render_chat_template(template, [{"role": "user", "content": "x"}])


# ---- hostile templates: a checkpoint's template is untrusted code ------------------------------

USER = [{"role": "user", "content": "hi"}]
NS = "{% set ns = namespace(s='ab') %}"
HOSTILE = {
    "repeat": "{{ 'A' * 2**28 }}",
    "repeat a list": "{{ ([messages] * 2**26)|length }}",
    "power": "{{ (2 ** (2 ** 40)) > 1 }}",
    "width": "{{ 'x'|center(10**9) }}",
    "method width": "{{ 'x'.ljust(10**9) }}",
    "format width": "{{ '{:>999999999}'.format('x') }}",
    "percent width": "{{ '%999999999s' % 'x' }}",
    "doubling": NS + "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling with +": NS + "{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "join": NS + "{% set ns.s = 'x' * 4000000 %}{{ (ns.s|list)|join(ns.s)|length }}",
    "str join": NS + "{% set ns.s = 'x' * 4000000 %}{{ ns.s.join(ns.s)|length }}",
    "replace": NS + "{% set ns.s = 'x' * 4000000 %}{{ ns.s|replace('x', ns.s)|length }}",
    "print a list of references": NS + "{% set ns.s = 'x' * 4000000 %}{{ [ns.s] * 1000 }}",
    "tojson of references": NS + "{% set ns.s = 'x' * 4000000 %}{{ ([ns.s] * 1000)|tojson|length }}",
    "block buffer": "{% set x %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ f(60) }}",
    "loop over a long string": NS + "{% set ns.s = 'x' * 4000000 %}"
    "{% for a in ns.s %}{% for b in ns.s %}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("template", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_template_stops_within_its_limits(template: str) -> None:
    import time

    from weightsmith.chat_template import TemplateLimits

    limits = TemplateLimits(timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"^chat template( line \d+)?: stopped: .*limit") as err:
        render_chat_template(template, USER, limits=limits)
    assert time.monotonic() - start < 3.0
    assert "\n" not in str(err.value)


def test_the_limits_leave_ordinary_large_renders_alone() -> None:
    from weightsmith.chat_template import TemplateLimits

    big = [{"role": "user", "content": "word " * 200_000}] * 3  # 3 MB, a long context's worth
    text = render_chat_template(CHATML, big, limits=TemplateLimits(timeout=5))
    assert text.count("word") == 600_000
    with pytest.raises(ChatTemplateError, match="output limit"):
        render_chat_template(CHATML, big, limits=TemplateLimits(max_output=1_000_000))
