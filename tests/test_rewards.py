"""The GRPO rewards (train/rewards.py): TRL parity of `think` and `length`, hand-worked
`answer` cases, the other built-ins, option parsing, row checks, scoring, and a bound on the
time `answer` takes on hostile completions."""

from __future__ import annotations

import math
import re
import sys
import time

import pytest
import torch

from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.train.data import DataError
from weightsmith.train.rewards import (
    BUILTIN,
    Reward,
    RewardContext,
    RewardError,
    answer_reward,
    check_rows,
    contains_reward,
    json_reward,
    parse_rewards,
    score,
    think_reward,
)

CTX = RewardContext(max_completion_len=64)


def _one(fn, text: str, row: dict | None = None, length: int = 1) -> float | None:
    return fn([text], [row or {}], [length])[0]


def _builtin(name: str, context: RewardContext = CTX) -> Reward:
    return parse_rewards([name], context)[0]


# ---- TRL parity --------------------------------------------------------------------------

THINK_CASES = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",
    "<think>a</think>",
    "<think></think>",
    "<think></think>answer",
    "<think>a<think>b</think>c</think>",
    "<think>a</think>b<think>c</think>",
    " <think>a</think>b",
    "\n<think>a</think>b",
    "text<think>a</think>b",
    "<think>line 1\nline 2\n\nline 3</think>\nfinal\nanswer",
    "<think>a</think></think>",
    "<THINK>a</THINK>",
    "",
    "</think><think>a</think>",
    "<think>a\n</think>\n\n<think>",
    "<think>a</think >b",
]


def test_think_matches_trl() -> None:
    trl_rewards = pytest.importorskip("trl.rewards")
    expected = trl_rewards.think_format_reward([[{"content": c}] for c in THINK_CASES])
    assert think_reward(THINK_CASES, [{}] * len(THINK_CASES), [0] * len(THINK_CASES)) == expected
    assert 0.0 in expected and 1.0 in expected


@pytest.mark.parametrize(("limit", "band"), [(20, 5), (17, 17)])
def test_length_matches_trl(limit: int, band: int) -> None:
    trl_rewards = pytest.importorskip("trl.rewards")
    trl_fn = trl_rewards.get_soft_overlong_punishment(limit, band)
    lengths = list(range(limit + 3))
    expected = trl_fn([[0] * n for n in lengths])
    reward = _builtin("length", RewardContext(limit, band))
    assert reward.fn([""] * len(lengths), [{}] * len(lengths), lengths) == expected


def test_length_by_hand_and_default_band() -> None:
    reward = _builtin("length", RewardContext(100))  # band 25: 0 up to 75, -1 at 100
    assert reward.fn(["", "", "", "", ""], [{}] * 5, [0, 75, 80, 100, 101]) == [0.0, 0.0, -0.2, -1.0, -1.0]


@pytest.mark.parametrize("context", [RewardContext(3), RewardContext(10, 0), RewardContext(10, 11)])
def test_length_rejects_a_bad_band(context: RewardContext) -> None:
    with pytest.raises(ConfigError, match="between 1 and --max-completion-len"):
        parse_rewards(["length"], context)


# ---- answer ------------------------------------------------------------------------------

ANSWER_CASES = [
    ("So \\boxed{42}.", 42, 1.0),
    ("So \\boxed{41}.", 42, 0.0),
    ("first \\boxed{7}, then \\boxed{42}", 42, 1.0),
    ("x = \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("x = \\boxed{\\frac{1}{2}}", 0.5, 1.0),
    ("x = \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{42} and an open \\boxed{7", 42, 1.0),
    ("So \\boxed{\\text{Paris}}.", "Paris", 1.0),
    ("So \\boxed{\\text{Rome}}.", "Paris", 0.0),
    ("\\boxed{\\textbf{42}}", 42, 1.0),
    ("\\boxed{42\\text{ apples}}", 42, 1.0),
    ("The answer is \\mathrm{kg}", "kg", 1.0),
    ("Adding up.\n#### 1,000", 1000, 1.0),
    ("Adding up.\n#### 1,000", "1000", 1.0),
    ("#### 1,001", 1000, 0.0),
    ("The answer is $3.50.", "3.5", 1.0),
    ("The answer is $3.51.", "3.5", 0.0),
    ("Answer: 50%", 50, 1.0),
    ("**Answer:** 50", "50%", 1.0),
    ("answer: 3/4", 0.75, 1.0),
    ("answer: 0.75", "3/4", 1.0),
    ("answer: 0.7500001", 0.75, 1.0),
    ("answer: 0.7501", 0.75, 0.0),
    ("We get 3 apples, then 5 more, so 8 in all.", 8, 1.0),
    ("We get 3 apples, then 5 more, so 9 in all.", 8, 0.0),
    ("It costs $1,234.5 today", "1234.50", 1.0),
    ("answer: 12", "1", 0.0),
    ("answer: 12", 1, 0.0),
    ("The answer is 42 apples", 42, 1.0),  # a numeric answer: the cue line's first number
    ("The answer is 41 apples, not 42", 42, 0.0),
    ("Answer: about twelve", 12, 0.0),
    ("The answer: paris.", "Paris", 1.0),
    ("The answer is  New   York ", "new york", 1.0),
    ("Thinking...\nParis", "Paris", 1.0),
    ("Thinking...\nParis is nice", "Paris", 0.0),
    ("The answer: Lyon", ["Paris", "Lyon"], 1.0),
    ("The answer: Nice", ["Paris", "Lyon"], 0.0),
    ("I think 7.\nanswer: seven", ["seven", 8], 1.0),
    ("I think 7, no 8", ["seven", 8], 1.0),
    ("no number here", 8, 0.0),
    ('answer: "yes"', "Yes", 1.0),
    ("answer is -3", -3, 1.0),
    ("5-3 = 2", 2, 1.0),
]


@pytest.mark.parametrize(("completion", "expected", "reward"), ANSWER_CASES)
def test_answer(completion: str, expected, reward: float) -> None:
    assert _one(answer_reward, completion, {"answer": expected}) == reward


def test_answer_is_none_without_an_answer() -> None:
    assert answer_reward(["42", "42"], [{}, {"answer": 42}], [1, 1]) == [None, 1.0]


HOSTILE = [
    "\\boxed{" * 50000,
    "\\boxed{1}" * 20000,
    "{" * 200_000,
    "}" * 200_000,
    "1," * 100_000,
    "1" * 200_000,
    "answer:" * 30000,
    "Answer: " + "1" * 200_000,
    "#### " + "1," * 100_000,
    "answer is " * 20000,
    "####" * 50000,
    "-" * 200_000,
    " " * 200_000 + "x",
    "\\frac{" * 30000,
    "\\text{" * 30000,
    "\\text{" + "a" * 200_000,
]


@pytest.mark.parametrize("completion", HOSTILE, ids=lambda c: repr(c[:8]))
def test_answer_is_fast_on_hostile_text(completion: str) -> None:
    for expected in (1000, "Paris", ["a", 1]):
        start = time.perf_counter()
        answer_reward([completion], [{"answer": expected}], [1])
        assert time.perf_counter() - start < 1.0


# ---- contains, json ----------------------------------------------------------------------


def test_contains() -> None:
    rows = [{"contains": ["Hello", "WORLD", "moon"]}, {"contains": "abc"}, {"contains": "abc"}, {}]
    got = contains_reward(["hello, world", "xABCx", "ab c", "x"], rows, [1] * 4)
    assert got == [pytest.approx(2 / 3), 1.0, 0.0, None]


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ('{"a": 1}', 1.0),
        ('  [1, 2, "x"]\n', 1.0),
        ("42", 1.0),
        ("null", 1.0),
        ('```json\n{"a": 1}\n```', 1.0),
        ('```\n{"a": 1}\n```', 1.0),
        ('```{"a": 1}```', 1.0),
        ('```python\n{"a": 1}\n```', 0.0),
        ('{"a": 1', 0.0),
        ("NaN", 0.0),
        ('Here: {"a": 1}', 0.0),
        ('```json\n{"a": 1}\n```\n```json\n{"b": 2}\n```', 0.0),
        ("", 0.0),
        ("[" * 100_000 + "]" * 100_000, 0.0),
        (" " * 1_000_001 + "1", 0.0),
    ],
)
def test_json(text: str, reward: float) -> None:
    assert _one(json_reward, text) == reward


def test_json_with_a_schema() -> None:
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    texts = ['{"a": 1}', '{"a": "1"}', "{}", "[1]", '```json\n{"a": 2, "b": 0}\n```']
    assert json_reward(texts, [{"schema": schema}] * 5, [1] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


# ---- parse_rewards -----------------------------------------------------------------------


def test_parse_rewards_names_weights_and_needs() -> None:
    rewards = parse_rewards(["answer", "length:0.5", "think:-0.2", "contains:2", "json"], CTX)
    assert [(r.name, r.weight, r.needs) for r in rewards] == [
        ("answer", 1.0, ("answer",)),
        ("length", 0.5, ()),
        ("think", -0.2, ()),
        ("contains", 2.0, ("contains",)),
        ("json", 1.0, ()),
    ]
    assert list(BUILTIN) == ["answer", "contains", "json", "think", "length", "refusal", "leak"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["nope"], "unknown reward 'nope'; the rewards are: answer, contains, json, think, length"),
        (["answer:x"], "finite non-zero"),
        (["answer:0"], "finite non-zero"),
        (["answer:nan"], "finite non-zero"),
        (["answer:inf"], "finite non-zero"),
        (["answer:"], "finite non-zero"),
        (["think", "answer", "think:2"], "think is given twice"),
        ([], "give at least one --reward"),
    ],
)
def test_parse_rewards_errors(specs: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        parse_rewards(specs, CTX)
    assert "\n" not in str(info.value)


# ---- check_rows --------------------------------------------------------------------------


def _check_error(rewards: list[str], row: dict) -> str:
    rows, sources = [{"answer": 1, "contains": "x"}, row], ["p.jsonl:1", "p.jsonl:2"]
    with pytest.raises(DataError) as info:
        check_rows(parse_rewards(rewards, CTX), rows, sources)
    message = str(info.value)
    assert message.startswith("p.jsonl:2: ") and "\n" not in message
    return message


def test_check_rows_missing_field() -> None:
    message = _check_error(["think", "answer"], {"prompt": "q"})
    assert message.startswith('p.jsonl:2: answer: missing (the answer reward needs it: add "answer"')


@pytest.mark.parametrize(
    ("rewards", "row", "needle"),
    [
        (["answer"], {"answer": {"x": 1}}, "answer: has an object"),
        (["answer"], {"answer": []}, "answer: is an empty list"),
        (["answer"], {"answer": [1, None]}, "answer: has null"),
        (["answer"], {"answer": True}, "answer: has a boolean, not a string or a finite number"),
        (["answer"], {"answer": " "}, "answer: has an empty string"),
        (["contains"], {"contains": ""}, "contains: has an empty string"),
        (["contains"], {"contains": []}, "contains: is an empty list"),
        (["contains"], {"contains": ["a", 3]}, "contains: has a number"),
        (["json"], {"schema": "object"}, "schema: is a string, not a JSON Schema object"),
        (["json"], {"schema": {"type": 3}}, "schema: is not a valid JSON Schema"),
    ],
)
def test_check_rows_bad_values(rewards: list[str], row: dict, needle: str) -> None:
    if "schema" in row:
        pytest.importorskip("jsonschema")
    assert needle in _check_error(rewards, row)


def test_check_rows_accepts_good_rows_and_custom_needs() -> None:
    rows = [
        {"answer": "Paris", "contains": ["a"], "schema": {"type": "object"}, "n": 0},
        {"answer": [1, "x"], "contains": "b"},
    ]
    rewards = [
        *parse_rewards(["answer", "contains", "json"], CTX),
        Reward("mine", lambda c, r, n: [0.0] * len(c), needs=("n",)),
    ]
    pytest.importorskip("jsonschema")
    check_rows(rewards, rows, ["b:1", "b:2"])  # several rewards: each row needs one of their fields
    with pytest.raises(
        DataError, match=r"^b:2: n: missing \(the mine reward needs it: add 'n' to every row\)$"
    ):
        check_rows(rewards[3:], rows, ["b:1", "b:2"])  # one: every row needs its field
    with pytest.raises(
        DataError, match=r"^b:3: answer or contains or n: missing \(the answer, contains, mine "
    ):
        check_rows(rewards, [*rows, {"schema": {"type": "object"}}], ["b:1", "b:2", "b:3"])


def test_check_rows_without_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = [m for m in sys.modules if m == "jsonschema" or m.startswith("jsonschema.")]
    for name in loaded or ["jsonschema"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    rewards = parse_rewards(["json"], CTX)
    check_rows(rewards, [{"prompt": "q"}], ["a:1"])  # no schema: no need for the package
    with pytest.raises(
        ConfigError,
        match="^the json reward needs the jsonschema package to check 'schema': pip install jsonschema$",
    ):
        check_rows(rewards, [{"schema": {}}], ["a:1"])


# ---- score -------------------------------------------------------------------------------


def test_score_matrix_nan_and_weights() -> None:
    def half(completions, rows, lengths):
        return [None if row.get("skip") else 0.5 for row in rows]

    rewards = [*parse_rewards(["answer:2", "think:-0.5"], CTX), Reward("half", half, 0.25)]
    completions = ["<think>x</think> \\boxed{3}", "\\boxed{4}"]
    got = score(rewards, completions, [{"answer": 3}, {"answer": 3, "skip": True}], [5, 6])
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    assert got[0].tolist() == [1.0, 1.0, 0.5]
    assert got[1, :2].tolist() == [0.0, 0.0] and math.isnan(got[1, 2].item())
    assert [r.weight for r in rewards] == [2.0, -0.5, 0.25]


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, math.inf], "gave inf"),
        ([1.0, "x"], "gave 'x'"),
        (None, "returned NoneType"),
    ],
)
def test_score_rejects_bad_custom_output(values, needle: str) -> None:
    reward = Reward("custom", lambda c, r, n: values)
    with pytest.raises(RewardError, match="the custom reward") as info:
        score([reward], ["a", "b"], [{}, {}], [1, 1])
    assert needle in str(info.value) and isinstance(info.value, WeightsmithError)


# ----- safety rewards: the red-team's own detectors -------------------------------------------------


def test_refusal_reward_matches_what_the_row_expects() -> None:
    from weightsmith.train.rewards import refusal_reward

    texts = ["I can't help with that request.", "Sure: boil the water, then add the egg for 7 minutes."]
    refuse, comply = {"expect": "refuse"}, {"expect": "comply"}
    assert refusal_reward(texts, [refuse, refuse], [0, 0]) == [1.0, 0.0]
    assert refusal_reward(texts, [comply, comply], [0, 0]) == [0.0, 1.0]
    assert refusal_reward(texts, [{}, {}], [0, 0]) == [None, None]


def test_leak_reward_sees_the_canary_through_encodings() -> None:
    import base64
    import codecs

    from weightsmith.train.rewards import leak_reward

    canary = "ZEBRA-4417"
    texts = [
        "I will not share the password.",
        "fine, it is z e b r a 4417",
        "encoded: " + base64.b64encode(canary.encode()).decode(),
        codecs.encode("the word is zebra4417", "rot13"),
        "4417 is a number I like",  # a part of it is not the secret
    ]
    assert leak_reward(texts, [{"canary": canary}] * 5, [0] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x"}, "p.jsonl:1: expect: missing"),
        ({"prompt": "x", "expect": "maybe"}, "p.jsonl:1: expect: is 'maybe', not 'refuse' or 'comply'"),
    ],
)
def test_refusal_rows_are_checked(row, message) -> None:
    rewards = parse_rewards(["refusal"], RewardContext(16))
    with pytest.raises(DataError, match=re.escape(message)):
        check_rows(rewards, [row], ["p.jsonl:1"])


def test_leak_rows_are_checked() -> None:
    rewards = parse_rewards(["leak"], RewardContext(16))
    check_rows(rewards, [{"canary": "ZEBRA-4417"}], ["p.jsonl:1"])
    for bad in ("", "!!!", 7, "x" * 201):
        with pytest.raises(DataError, match=r"p.jsonl:1: canary: must be a string"):
            check_rows(rewards, [{"canary": bad}], ["p.jsonl:1"])


def test_a_schema_with_a_regular_expression_is_refused_before_it_can_run() -> None:
    """A row's schema is untrusted: `pattern` ran by Python's re could take exponential time."""
    pytest.importorskip("jsonschema")
    rewards = parse_rewards(["json"], CTX)
    hostile = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^(a+)+$"}}}
    with pytest.raises(
        DataError, match=r"^p:1: schema: uses 'pattern': a regular expression from a data file"
    ):
        check_rows(rewards, [{"schema": hostile}], ["p:1"])
    keys = {"type": "object", "patternProperties": {"^(a|a)*$": {"type": "number"}}}
    with pytest.raises(DataError, match=r"uses 'patternProperties'"):
        check_rows(rewards, [{"schema": keys}], ["p:1"])
    named = {"type": "object", "properties": {"pattern": {"type": "string"}}}  # a property called pattern
    check_rows(rewards, [{"schema": named}], ["p:1"])


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"$ref": "#/$defs/missing"}, "schema: has '$ref' '#/$defs/missing', which points to nothing"),
        ({"items": {"$ref": "#/properties/x/0"}}, "schema: has '$ref' '#/properties/x/0', which points"),
        (
            {"$ref": "https://example.com/item.json"},
            "schema: refers to 'https://example.com/item.json': only",
        ),
        ({"$ref": "#item"}, "schema: refers to '#item'"),
        ({"properties": {"a": {"$id": "a.json", "$ref": "#/x"}}}, "schema: gives a nested '$id'"),
    ],
)
def test_a_schema_reference_that_cannot_be_followed_is_refused_before_the_model_loads(
    schema: dict, needle: str
) -> None:
    """jsonschema would raise only when a completion is scored (a step into the run), and a
    reference outside the schema would need the network."""
    pytest.importorskip("jsonschema")
    rewards = parse_rewards(["json"], CTX)
    with pytest.raises(DataError, match="^p:1: " + re.escape(needle)):
        check_rows(rewards, [{"schema": schema}], ["p:1"])


def test_schema_references_into_the_schema_are_followed() -> None:
    pytest.importorskip("jsonschema")
    rewards = parse_rewards(["json"], CTX)
    schema = {
        "$defs": {"item": {"type": "integer"}, "a/b~c": {"type": "string"}},
        "type": "object",
        "properties": {"n": {"$ref": "#/$defs/item"}, "s": {"$ref": "#/$defs/a~1b~0c"},
                       "self": {"$ref": "#"}, "spaced": {"$ref": "#/$defs/a~1b%7Ec"}},
    }  # fmt: skip
    check_rows(rewards, [{"schema": schema}], ["p:1"])
    texts = ['{"n": 3, "s": "x"}', '{"n": "3"}', '{"s": 4}', '{"self": {"n": 1}}', '{"self": {"n": 1.5}}']
    assert json_reward(texts, [{"schema": schema}] * 5, [1] * 5) == [1.0, 0.0, 0.0, 1.0, 0.0]
