"""Fuzzing the server's untrusted inputs: request bodies, chat templates, and the live API.

Property-based (hypothesis): any JSON body either validates or becomes an `ApiError` with a
4xx status, never another exception; any template built from Jinja pieces renders or fails
with one-line `ChatTemplateError` within its time limit. schemathesis drives the live server
on loopback from its own OpenAPI document: no 5xx and no hang. The budget per test is
$WEIGHTSMITH_FUZZ_EXAMPLES examples (30 by default; `make fuzz` raises it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightsmith.chat_template import ChatTemplateError, TemplateLimits, render_chat_template
from weightsmith.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("WEIGHTSMITH_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# ---- request schemas ---------------------------------------------------------------------------

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "stop", "seed", "logprobs", "top_logprobs", "stream", "stream_options", "echo", "suffix", "best_of",
          "tokens", "role", "content", "type", "text", "top_k", "min_p", "include_usage"]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6)
    ),  # fmt: skip
    max_leaves=20,
)
BODY = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8)


def _use(req) -> None:
    """What the routes call on a valid request before queueing it."""
    for method in ("check_stream_options", "check_unsupported", "prompts", "stops", "limit", "logprobs_k"):
        if hasattr(req, method):
            getattr(req, method)()
    for message in getattr(req, "messages", None) or []:
        message.text()


@FUZZ
@given(schema=st.sampled_from([ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest]),
       body=BODY | st.binary(max_size=64).map(lambda b: {"raw": b.decode("latin-1")}))  # fmt: skip
def test_any_body_validates_or_is_a_4xx(schema, body) -> None:
    try:
        _use(parse(schema, json.dumps(body).encode()))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message and "\n" not in e.message


@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_bytes_validate_or_are_a_4xx(raw: bytes) -> None:
    try:
        parse(ChatRequest, raw)
    except ApiError as e:
        assert e.status == 400


# ---- the chat-template renderer ----------------------------------------------------------------

PIECES = [
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}",
    "{{ 'ab' * 3 }}", "{{ (messages|length) * 2 }}", "{% set ns = namespace(n=0) %}{{ ns.n }}",
    "{{ messages|tojson }}", "{{ range(5)|join(',') }}", "{{ 'x'|center(9) }}", "{{ '%5s' % 'a' }}",
    "{{ 'a' ~ 'b' }}", "{% if add_generation_prompt %}<|assistant|>{% endif %}", "{{ bos_token }}",
    "{% for i in range(3) %}{% for j in range(3) %}{{ i * j }}{% endfor %}{% endfor %}",
    "{{ raise_exception('no') }}", "{{ undefined_thing.x }}", "{{ 1 / 0 }}", "{% for %}", "{{ ",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(30) }}",
    "{{ 'A' * 2**40 }}", "{{ 2 ** (2 ** 30) }}", "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
    "{% endfor %}", "{{ messages[0].content.upper().split() }}", "{{ 'q'.ljust(10**9) }}", "text\n",
]  # fmt: skip
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}),
    min_size=1, max_size=4,
)  # fmt: skip


@FUZZ
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=5), messages=MESSAGES)
def test_any_template_renders_or_fails_in_one_line_within_its_limit(pieces, messages) -> None:
    limits = TemplateLimits(timeout=0.3, max_value=100_000, max_output=200_000)
    start = time.monotonic()
    try:
        out = render_chat_template("".join(pieces), messages, limits=limits)
        assert isinstance(out, str) and len(out) <= limits.max_output
    except ChatTemplateError as e:
        assert "\n" not in str(e)
    assert time.monotonic() - start < 3.0


# ---- the live API against its own OpenAPI document ---------------------------------------------

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def api_schema(tiny_hf_dir: Path):
    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict

    options = {"model": str(tiny_hf_dir), "port": 0, "served_name": "tiny", "max_batch": 4, "read_timeout": 5}
    running = start_server(config_from_dict(ServeConfig, options), timeout=120)
    try:
        yield schemathesis.openapi.from_url(running.url + "/openapi.json")
    finally:
        running.stop()


def test_the_api_never_answers_5xx_or_hangs(api_schema) -> None:
    """Every operation in the server's OpenAPI document, with bodies schemathesis generates."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:

        @settings(max_examples=max(EXAMPLES // 3, 5), deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case) -> None:
            if isinstance(case.body, dict) and case.method == "POST":
                case.body["model"] = "tiny"  # a random name is a 404 before any real work
                if isinstance(case.body.get("max_tokens"), int):
                    case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # keep each answer short
                case.body.pop("max_completion_tokens", None)
            response = case.call(timeout=30)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        call()
