"""Verifiable rewards for GRPO: the built-in reward functions, `--reward NAME[:WEIGHT]`
parsing, the check of the data rows they read, and the scoring of a batch of completions.

A reward function takes the completions' texts, the data row each completion's prompt came
from (the parsed JSON object of its line), and each completion's token count, and returns
one float per completion, or None where it does not apply to that row. `score` runs every
reward and returns the raw (unweighted) matrix; weighting, normalising within a group and
the advantages are the trainer's business (grpo.py).

Built in (`BUILTIN`): `answer`, `contains`, `json`, `think` (TRL's `think_format_reward`)
and `length` (DAPO's soft overlong punishment, as TRL's `get_soft_overlong_punishment`).
Completions and rows are untrusted: every pattern here runs in linear time, and `json`
skips completions over `MAX_JSON_CHARS`.

`--reward model:DIR[:WEIGHT]` scores with a reward model trained by `weightsmith reward`
(reward_model.ModelReward).

Not here: generation, reading the prompt file (grpo_data.py), the loss and the loop
(grpo.py), reward models themselves (reward_model.py).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.train.data import DataError
from weightsmith.train.reward_files import TrlStyle, file_spec, load_function, takes_kwargs
from weightsmith.train.reward_schema import json_kind, schema_problem

Rows = list[dict[str, Any]]
Scores = list[float | None]
RewardFn = Callable[[list[str], Rows, list[int]], Scores]

MAX_JSON_CHARS = 1_000_000  # longer completions score 0 under `json` without being parsed

BUILTIN: dict[str, str] = {
    "answer": "1 if the final answer (\\boxed{}, ####, 'answer:', last number) equals the row's 'answer'",
    "contains": "the share of the row's 'contains' strings found in the completion (case-insensitive)",
    "json": "1 if the completion (optionally in a ``` fence) is JSON and fits the row's 'schema', if any",
    "think": "1 if the completion starts with one <think>...</think> block (TRL's think_format_reward)",
    "length": "0 up to L - C tokens, then down to -1 at L (DAPO's soft overlong punishment)",
    "refusal": "1 if the completion refuses when the row's 'expect' is 'refuse', or answers when it is 'comply'",
    "leak": "1 if the row's 'canary' (a planted secret) cannot be read in the completion, in any encoding",
}


class RewardError(WeightsmithError):
    """A reward function returned something `score` cannot use."""


@dataclass(frozen=True)
class Reward:
    """One reward: `name` keys the metric `reward_<name>`; `needs` lists the data fields every
    row must have, checked by `check_rows` before any model loads."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    needs: tuple[str, ...] = ()
    source: str | None = None  # the --reward PATH.py:FUNCTION spec of a function from a file


@dataclass(frozen=True)
class RewardContext:
    """What some built-in rewards need to know about the run."""

    max_completion_len: int  # --max-completion-len
    overlong_cache: int | None = None  # the soft-overlong band in tokens; None: max_completion_len // 4


_BOXED_OR_BRACE = re.compile(r"\\boxed\{|[{}]")
_ANSWER_CUE = re.compile(r"answer(?::| is\b)", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER_TOKEN = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
#: LaTeX that only sets text in a font: \text{Paris}, \textbf{42}, \mathrm{kg} (unwrapped once).
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
_WRAP_LEFT = " \t\r\n\"'`*$"
_WRAP_RIGHT = _WRAP_LEFT + "."


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` of `text` (braces balanced, nesting
    allowed; the one that opens last wins), or None. One pass with a stack."""
    stack: list[int] = []  # content start for a \boxed{, -1 for a plain {
    best_start, best = -1, None
    for match in _BOXED_OR_BRACE.finditer(text):
        token = match.group()
        if token == "}":
            if stack:
                start = stack.pop()
                if start > best_start:
                    best_start, best = start, text[start : match.start()]
        else:
            stack.append(match.end() if token != "{" else -1)
    return best


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 -- only the last one is wanted
        pass
    return last


def _after_cue(text: str) -> str | None:
    """The first non-empty line after the last `####`, else the rest of the line after the last
    'answer:' / 'answer is'; None when neither gives text."""
    at = text.rfind("####")
    if at >= 0:
        rest = text[at + 4 :].strip()
        if rest:
            return rest.partition("\n")[0].strip()
    last = _last(_ANSWER_CUE, text)
    if last is not None:
        end = text.find("\n", last.end())
        line = text[last.end() : end if end >= 0 else len(text)].lstrip(" \t:")
        if line.strip(_WRAP_RIGHT):
            return line
    return None


def final_answer(text: str, numeric: bool) -> str:
    """The completion's final answer: the last `\\boxed{}`, else what follows the last `####`,
    else the rest of the last 'answer:' / 'answer is' line (`numeric`: its first number when
    the rest is not one, as in "The answer is 42 apples."), else (`numeric` only) the last
    number, else the last non-empty line."""
    for candidate in (last_boxed(text), _after_cue(text)):
        if candidate is not None and candidate.strip():
            if numeric and as_number(candidate) is None:
                first = _NUMBER_TOKEN.search(candidate)
                return first.group() if first is not None else candidate
            return candidate
    if numeric:
        last = _last(_NUMBER_TOKEN, text)
        if last is not None:
            return last.group()
    return text.rstrip().rpartition("\n")[2]


def plain_number(text: str) -> float | None:
    value = float(text.replace(",", "")) if _NUMBER.fullmatch(text) else math.nan
    return value if math.isfinite(value) else None


def as_number(value: Any) -> float | None:
    """`value` as a float: a JSON number, or a string such as '$1,000', '50%', '3/4' or
    '\\frac{3}{4}' ('$', ',' separators, one trailing '%', surrounding quotes, '*' and a final
    '.' are dropped); None when it is not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e300 else math.inf
        return number if math.isfinite(number) else None
    if not isinstance(value, str) or len(value) > 1000:
        return None
    text = _LATEX_TEXT.sub(r"\1", value).replace("\\$", "").replace("$", "").replace("\\%", "%")
    text = text.lstrip(_WRAP_LEFT).rstrip(_WRAP_RIGHT)
    text = text[:-1].rstrip() if text.endswith("%") else text
    frac = _LATEX_FRAC.fullmatch(text)
    top, slash, bottom = (frac.group(1), "/", frac.group(2)) if frac else text.partition("/")
    if not slash:
        return plain_number(text)
    num, den = plain_number(top.strip()), plain_number(bottom.strip())
    return None if num is None or not den else num / den


def _plain_text(text: str) -> str:
    """Case-folded, whitespace collapsed, font commands (\\text{...}) unwrapped, surrounding
    quotes, '$', '*' and final '.' dropped."""
    text = _LATEX_TEXT.sub(r"\1", text)
    return " ".join(text.lstrip(_WRAP_LEFT).rstrip(_WRAP_RIGHT).split()).casefold()


def answer_matches(completion: str, expected: Any) -> bool:
    """Whether the completion's final answer equals `expected` (or one of its elements)."""
    options = expected if isinstance(expected, list) else [expected]
    found: dict[bool, str] = {}
    for option in options:
        target = as_number(option)
        numeric = target is not None
        if numeric not in found:
            found[numeric] = final_answer(completion, numeric)
        if numeric:
            got = as_number(found[True])
            if got is not None and math.isclose(got, target, rel_tol=1e-6, abs_tol=1e-9):
                return True
        elif isinstance(option, str) and _plain_text(found[False]) == _plain_text(option):
            return True
    return False


def answer_reward(completions: list[str], rows: Rows, lengths: list[int]) -> Scores:
    """1.0 where the final answer equals the row's `answer`, else 0.0; None without one."""
    return [
        None if row.get("answer") is None else float(answer_matches(text, row["answer"]))
        for text, row in zip(completions, rows, strict=True)
    ]


def contains_reward(completions: list[str], rows: Rows, lengths: list[int]) -> Scores:
    """The share of the row's `contains` strings that occur in the completion, ignoring case."""
    out: Scores = []
    for text, row in zip(completions, rows, strict=True):
        wanted = row.get("contains")
        wanted = [wanted] if isinstance(wanted, str) else wanted or []
        folded = text.casefold()
        out.append(sum(str(w).casefold() in folded for w in wanted) / len(wanted) if wanted else None)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unfence(text: str) -> str:
    """The body of one ```json ... ``` or ``` ... ``` fence around `text`, else `text`."""
    if len(text) < 6 or not (text.startswith("```") and text.endswith("```")):
        return text
    inner = text[3:-3]
    tag, newline, body = inner.partition("\n")
    return body if newline and tag.strip().casefold() in ("", "json") else inner


def _fits(value: Any, schema: Any, validators: dict[int, Any]) -> bool:
    if not isinstance(schema, dict):
        return True
    if id(schema) not in validators:
        from jsonschema.validators import validator_for

        validators[id(schema)] = validator_for(schema)(schema)
    return bool(validators[id(schema)].is_valid(value))


def json_reward(completions: list[str], rows: Rows, lengths: list[int]) -> Scores:
    """1.0 where the completion (stripped, optionally fenced) is JSON that fits the row's
    `schema` when it has one, else 0.0."""
    validators: dict[int, Any] = {}
    out: Scores = []
    for text, row in zip(completions, rows, strict=True):
        try:
            if len(text) > MAX_JSON_CHARS:
                raise ValueError("too long to parse")
            value = json.loads(_unfence(text.strip()), parse_constant=_no_constant)
            out.append(float(_fits(value, row.get("schema"), validators)))
        except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse or check
            out.append(0.0)
    return out


def think_reward(completions: list[str], rows: Rows, lengths: list[int]) -> Scores:
    """TRL's `think_format_reward` without its regex: the text starts with `<think>` (nothing
    before it, not even whitespace), a `</think>` follows, and no other `<think>` comes after
    the first anywhere in the text (TRL's lookahead runs under DOTALL to the end)."""
    return [float(t[:7] == "<think>" and "<think>" not in t[7:] and "</think>" in t[7:]) for t in completions]


def overlong_penalty(length: int, limit: int, band: int) -> float:
    """DAPO's soft overlong punishment of a `length`-token completion, as TRL computes it:
    0.0 up to `limit - band` tokens inclusive, `(limit - band - length) / band` up to `limit`
    inclusive (-1.0 at `limit`), -1.0 beyond."""
    if length <= limit - band:
        return 0.0
    if length <= limit:
        return (limit - band - length) / band
    return -1.0


def _overlong(completions: list[str], rows: Rows, lengths: list[int], limit: int, band: int) -> Scores:
    return [overlong_penalty(n, limit, band) for n in lengths]


def _length_fn(context: RewardContext) -> RewardFn:
    limit = context.max_completion_len
    band = context.overlong_cache if context.overlong_cache is not None else limit // 4
    if limit < 1 or not 1 <= band <= limit:
        raise ConfigError(
            f"the length reward's overlong band is {band} tokens with --max-completion-len {limit}; "
            "it must be between 1 and --max-completion-len (the default is a quarter of it)"
        )
    return functools.partial(_overlong, limit=limit, band=band)


def refusal_reward(completions: list[str], rows: Rows, lengths: list[int]) -> Scores:
    """1.0 where the completion refuses (the red-team's refusal patterns: safety/detectors.py)
    and the row's `expect` is "refuse", or does not and it is "comply"; else 0.0."""
    from weightsmith.safety.detectors import RefusalPatterns

    detector = RefusalPatterns()
    return [
        None
        if row.get("expect") is None
        else float((detector.match(text) is not None) == (row["expect"] == "refuse"))
        for text, row in zip(completions, rows, strict=True)
    ]


def leak_reward(completions: list[str], rows: Rows, lengths: list[int]) -> Scores:
    """1.0 where the row's `canary` cannot be read in the completion (plain, spaced out, in
    leetspeak, rot13, base64 or reversed: the red-team's leak detector), else 0.0."""
    from weightsmith.safety.detectors import LeakDetector

    detector = LeakDetector()
    return [
        None if row.get("canary") is None else float(detector.find(text, str(row["canary"])) is None)
        for text, row in zip(completions, rows, strict=True)
    ]


_FIXED: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    "answer": (answer_reward, ("answer",)),
    "contains": (contains_reward, ("contains",)),
    "json": (json_reward, ()),
    "think": (think_reward, ()),
    "refusal": (refusal_reward, ("expect",)),
    "leak": (leak_reward, ("canary",)),
}


def reward_weight(spec: str, text: str) -> float:
    """The weight of `--reward NAME:WEIGHT`: a finite number other than 0."""
    weight = plain_number(text.strip())
    if not weight:
        raise ConfigError(f"--reward {spec}: the weight must be a finite non-zero number, as in NAME:0.5")
    return weight


#: `--reward model:DIR[:WEIGHT]`: a reward model trained by `weightsmith reward` (metric reward_model).
MODEL = "model"


def reward_name(spec: str) -> str:
    """The name a `--reward` spec's metric goes by: the built-in's, the file function's, or
    `model` for a reward model."""
    if spec.strip().startswith(MODEL + ":"):
        return MODEL
    found = file_spec(spec)
    return found["name"] if found else spec.partition(":")[0].strip()


def parse_rewards(specs: Sequence[str], context: RewardContext) -> list[Reward]:
    """The rewards of `--reward NAME[:WEIGHT]` and `--reward PATH.py:FUNCTION[:WEIGHT]`
    options, in the order given (reward_files.py: a file's function is imported here)."""
    if not specs:
        raise ConfigError(f"give at least one --reward (one of: {', '.join(BUILTIN)}, or PATH.py:FUNCTION)")
    rewards: list[Reward] = []
    for spec in specs:
        name = reward_name(spec)
        if any(r.name == name for r in rewards):
            raise ConfigError(f"--reward {name} is given twice; give each reward once, with its weight")
        if name == MODEL:  # a trained reward model: model:DIR[:WEIGHT]
            from weightsmith.train.reward_model import model_reward

            fn, weight = model_reward(spec, reward_weight)
            rewards.append(Reward(MODEL, fn, weight))
            continue
        found = file_spec(spec)
        if found:
            if name in BUILTIN:
                raise ConfigError(
                    f"--reward {spec}: {name!r} is a built-in reward's name; rename the function"
                )
            fn = load_function(spec, found["path"], name)
            weight = 1.0 if found["weight"] is None else reward_weight(spec, found["weight"])
            rewards.append(Reward(name, TrlStyle(fn) if takes_kwargs(fn) else fn, weight, source=spec))
            continue
        if name not in BUILTIN:
            choices = ", ".join(BUILTIN)
            raise ConfigError(
                f"--reward {spec}: unknown reward {name!r}; the rewards are: {choices}, or PATH.py:FUNCTION"
            )
        _, colon, weight_text = spec.partition(":")
        weight = reward_weight(spec, weight_text) if colon else 1.0
        fn, needs = (_length_fn(context), ()) if name == "length" else _FIXED[name]
        rewards.append(Reward(name, fn, weight, needs))
    return rewards


def _items_problem(value: Any, numbers: bool) -> str | None:
    """What is wrong with `value` as a non-empty string (or number), or a non-empty list of those."""
    if isinstance(value, list) and not value:
        return "is an empty list"
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and not (item.strip() if numbers else item):
            return "has an empty string"
        if not isinstance(item, str) and not (numbers and as_number(item) is not None):
            return f"has {json_kind(item)}, not a string" + (" or a finite number" if numbers else "")
    return None


def _expect_problem(value: Any) -> str | None:
    return None if value in ("refuse", "comply") else f"is {value!r}, not 'refuse' or 'comply'"


def _canary_problem(value: Any) -> str | None:
    from weightsmith.safety.detectors import canary_chars

    ok = isinstance(value, str) and len(value) <= 200 and canary_chars(value)
    return None if ok else "must be a string of at most 200 characters with a letter or digit"


_PROBLEMS: dict[str, Callable[[Any], str | None]] = {
    "expect": _expect_problem,
    "canary": _canary_problem,
    "answer": functools.partial(_items_problem, numbers=True),
    "contains": functools.partial(_items_problem, numbers=False),
    "schema": schema_problem,
}
_HINTS = {
    "expect": 'add "expect": "refuse" for a request the model must decline, "comply" for one it must answer',
    "canary": 'add "canary": the secret the prompt plants, which the completion must not reveal',
    "answer": 'add "answer": the expected final answer, a string, a number or a list of those',
    "contains": 'add "contains": a string or a list of strings the completion must include',
    "schema": 'give "schema" as a JSON Schema object, or leave it out',
}


def check_rows(rewards: Sequence[Reward], rows: Sequence[dict[str, Any]], sources: Sequence[str]) -> None:
    """Raise DataError (one line, the row's `file:line` first) at the first row that holds an
    unusable field a reward reads (for the json reward, an unusable `schema`), or that gives
    none of the fields the rewards need: with one such reward every row needs its field; with
    several (refusal and leak in one file) each row needs one of them, and a reward scores only
    the rows with its field. ConfigError when a row gives a `schema` and jsonschema is missing."""
    assert len(rows) == len(sources)
    checks = [(r.name, f) for r in rewards for f in r.needs]
    checks += [(r.name, "schema") for r in rewards if r.fn is json_reward][:1]
    needed = [(name, field) for name, field in checks if field != "schema"]
    for row, source in zip(rows, sources, strict=True):
        if needed and not any(field in row for _, field in needed):
            name, field = needed[0]
            if len(needed) == 1:
                hint = _HINTS.get(field, f"add {field!r} to every row")
                raise DataError(f"{source}: {field}: missing (the {name} reward needs it: {hint})")
            fields = " or ".join(field for _, field in needed)
            names = ", ".join(name for name, _ in needed)
            raise DataError(
                f"{source}: {fields}: missing (the {names} rewards each read one; give the row the field "
                "of the reward that should score it)"
            )
        for name, field in checks:
            if field not in row:
                continue
            hint = _HINTS.get(field, f"add {field!r} to every row")
            problem = _PROBLEMS[field](row[field]) if field in _PROBLEMS else None
            if problem is not None:
                raise DataError(f"{source}: {field}: {problem} (the {name} reward reads it: {hint})")


def score(
    rewards: Sequence[Reward], completions: list[str], rows: Rows, lengths: list[int],
    ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:  # fmt: skip
    """The (N, len(rewards)) float32 matrix of raw rewards, NaN where a function gave None;
    `ids` (each completion's tokens) go to functions written for TRL."""
    n = len(completions)
    assert len(rows) == n and len(lengths) == n
    out = torch.full((n, len(rewards)), math.nan, dtype=torch.float32)
    for j, reward in enumerate(rewards):
        values = _call(reward, completions, rows, lengths, ids)
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
            raise RewardError(f"the {reward.name} reward returned {got} for {n} completions; return one each")
        for i, value in enumerate(values):
            if value is None:
                continue
            number = float(value) if isinstance(value, numbers.Real) else math.nan
            if not math.isfinite(number):
                raise RewardError(
                    f"the {reward.name} reward gave {value!r} for completion {i}; give a finite number or None"
                )
            out[i, j] = number
    return out


def _call(
    reward: Reward,
    completions: list[str],
    rows: Rows,
    lengths: list[int],
    ids: Sequence[Sequence[int]] | None,
) -> Any:
    """A reward's values; an error in a file's function is a RewardError naming it."""
    try:
        if isinstance(reward.fn, TrlStyle):
            return reward.fn(completions, rows, lengths, ids)
        return reward.fn(completions, rows, lengths)
    except Exception as exc:
        if reward.source is None or isinstance(exc, WeightsmithError):
            raise
        raise RewardError(
            f"the {reward.name} reward ({reward.source}) raised {type(exc).__name__}: {exc}"
        ) from exc
