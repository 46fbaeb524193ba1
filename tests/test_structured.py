"""Structured output in the engine, the Python API and the CLI (grammar.py, sampling.py).

On a tiny random Llama (which, left alone, writes anything): a JSON schema's grammar makes every
answer parse and validate (with the `jsonschema` package), greedy and sampled; rows of one batch
follow their own grammars and a row without one is untouched (its tokens equal a solo run's);
streamed deltas add up to the text; stop strings still end a constrained row; `logit_bias` moves
the greedy pick; bad schemas are refused with one line before any work. The hypothesis-generated
schemas are in test_fuzz_structured.py; the server's side in test_serve_structured.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny_hf_dir, run_cli

import weightsmith
from weightsmith.grammar import GrammarError
from weightsmith.sampling import SamplingParams

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory) -> Path:
    """The tiny model with room for long constrained answers."""
    return build_tiny_hf_dir(tmp_path_factory.mktemp("long") / "tiny", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def llm(long_tiny_dir: Path):
    return weightsmith.load(long_tiny_dir)


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_unconstrained_tiny_model_does_not_write_json(llm) -> None:
    """The check below is not vacuous: without the grammar this model's answers are not JSON."""
    for seed in range(2):
        text = llm.complete("Hello", temperature=1.0, seed=seed, max_tokens=30).text
        assert not valid(text, PERSON)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_answers_parse_and_validate(llm, temperature) -> None:
    c = llm.complete("Hello", json_schema=PERSON, temperature=temperature, seed=0, max_tokens=400)
    assert c.finish_reason == "stop", c.text
    assert valid(c.text, PERSON), c.text  # more schemas and seeds: test_fuzz_structured.py


def test_rows_follow_their_own_grammar_and_free_rows_are_untouched(llm) -> None:
    numbers = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}
    free = llm.sampling_params(temperature=1.0, seed=7, max_tokens=30)
    params = [
        llm.sampling_params(json_schema=PERSON, temperature=1.0, seed=1, max_tokens=400),
        free,
        llm.sampling_params(json_schema=numbers, temperature=0.0, max_tokens=100),
    ]
    batch = llm.engine.generate(["Hello", "Once upon", "Count"], params)
    assert valid(batch[0].text, PERSON) and valid(batch[2].text, numbers)
    alone = llm.engine.generate(["Once upon"], [free])[0]
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text


def test_streamed_deltas_add_up_and_stop_strings_still_apply(llm) -> None:
    sp = llm.sampling_params(json_schema=PERSON, temperature=1.0, seed=3, max_tokens=400)
    deltas = list(llm.engine.stream("Hello", sp))
    assert "".join(d.text for d in deltas) == deltas[-1].completion.text
    assert valid(deltas[-1].completion.text, PERSON)
    stopped = llm.complete("Hello", json_schema=PERSON, temperature=0.0, stop=['"age"'], max_tokens=400)
    assert stopped.finish_reason == "stop" and '"age"' not in stopped.text
    assert stopped.text.startswith('{"name": "')


def test_python_api_generate_and_chat_take_json_schema(llm) -> None:
    text = llm.generate("Hello", json_schema=json.dumps(PERSON), temperature=0, max_tokens=400)
    assert valid(text, PERSON)
    answer = llm.chat(
        [{"role": "user", "content": "Who?"}], json_schema=PERSON, temperature=0, max_tokens=400
    )
    assert valid(answer, PERSON)
    streamed = "".join(llm.chat([{"role": "user", "content": "Who?"}], stream=True, json_schema=PERSON,
                                temperature=0, max_tokens=400))  # fmt: skip
    assert streamed == answer


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "objec"}, "Invalid type"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "Unimplemented"),
        ({"properties": {"a": {"$ref": "#/missing"}}}, "missing"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_schemas_are_refused_with_the_reason(llm, schema, words) -> None:
    with pytest.raises(GrammarError, match=words):
        llm.complete("Hello", json_schema=schema)


def test_logit_bias_moves_and_bans_the_greedy_pick(llm) -> None:
    base = llm.complete("Once upon", temperature=0, max_tokens=6, ignore_eos=True).token_ids
    forced = llm.complete("Once upon", temperature=0, max_tokens=6, ignore_eos=True, logit_bias={65: 100.0})
    assert forced.token_ids == [65] * 6 and base != forced.token_ids
    banned = llm.complete(
        "Once upon", temperature=0, max_tokens=6, ignore_eos=True, logit_bias={base[0]: -100}
    )
    assert banned.token_ids[0] != base[0]


@pytest.mark.parametrize(
    "params, words",
    [
        (dict(logit_bias={3: 101.0}), r"\[-100, 100\]"),
        (dict(logit_bias={-1: 1.0}), "token ids"),
    ],
)
def test_bad_logit_bias_is_refused(params, words) -> None:
    with pytest.raises(weightsmith.errors.GenerationError, match=words):
        SamplingParams(**params)


def test_logit_bias_outside_the_vocabulary_is_refused(llm) -> None:
    with pytest.raises(weightsmith.errors.GenerationError, match="outside the vocabulary"):
        llm.complete("Hello", logit_bias={100_000: 1.0})


def test_cli_json_schema(long_tiny_dir, tmp_path, capsys) -> None:
    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps(PERSON))
    code, out, err = run_cli(["generate", str(long_tiny_dir), "-p", "Hello", "--json-schema", str(schema),
                              "--temperature", "0", "-n", "400", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    assert valid(json.loads(out)["text"], PERSON)


def test_cli_chat_answers_follow_the_schema(long_tiny_dir, tmp_path, capsys, monkeypatch) -> None:
    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps(PERSON))
    argv = ["chat", str(long_tiny_dir), "--json-schema", str(schema), "--temperature", "0", "-n", "400"]
    code, out, err = run_cli(argv, capsys, stdin="Hi\nAgain\n", monkeypatch=monkeypatch)
    assert code == 0, err
    answers = [line for line in out.splitlines() if line.startswith("{")]
    assert len(answers) == 2 and all(valid(a, PERSON) for a in answers), out


def test_cli_bad_json_schema_file_is_one_line_before_loading(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object",\n  "properties": }')
    code, out, err = run_cli(["generate", "no-such-model", "-p", "x", "--json-schema", str(bad)], capsys)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "bad.json: line 2 column" in err
    code, out, err = run_cli(
        ["generate", "no-such-model", "-p", "x", "--json-schema", str(tmp_path / "nope")], capsys
    )
    assert code == 2 and "cannot read it" in err


class _Bits:
    """A grammar state whose allowed tokens are given (what mask_logits reads of a GrammarState)."""

    def __init__(self, allowed: list[int], tokens: int) -> None:
        import numpy as np

        bits = np.zeros((tokens + 31) // 32 * 32, dtype=np.uint8)
        bits[allowed] = 1
        self.bits = np.packbits(bits, bitorder="little")
        self.grammar = type("G", (), {"description": "the test's"})()

    def packed(self):
        return self.bits


def test_masking_in_place_on_the_cpu_equals_the_masked_fill() -> None:
    """The CPU's in-place numpy path and the tensor path (any other device) mask the same logits:
    the rows named, each by its own grammar, tokens past the tokenizer's (a wider vocabulary)
    disallowed, other rows untouched."""
    import torch

    from weightsmith.grammar import mask_logits

    logits = torch.randn(3, 70)
    states = [_Bits([1, 5, 63], tokens=64), _Bits([0, 31, 32], tokens=64)]
    fast = logits.clone()
    mask_logits(fast, [2, 0], states)
    slow = logits.clone()
    slow_view = slow.t().contiguous().t()  # not unit-stride rows: the tensor path
    mask_logits(slow_view, [2, 0], states)
    assert torch.equal(fast, slow_view)
    assert torch.equal(fast[1], logits[1])
    kept = {2: [1, 5, 63], 0: [0, 31, 32]}
    for row, ids in kept.items():
        assert torch.equal(fast[row, ids], logits[row, ids])
        assert torch.isinf(fast[row]).sum() == 70 - len(ids)


def test_a_grammar_that_allows_nothing_is_an_error_on_either_path() -> None:
    import torch

    from weightsmith.grammar import mask_logits

    for logits in (torch.zeros(1, 64), torch.zeros(64, 1).t()):
        with pytest.raises(GrammarError, match="the grammar allows no next token \\(the test's\\)"):
            mask_logits(logits, [0], [_Bits([], tokens=64)])
