"""LLM-as-judge scoring for generation tasks, and agreement with human labels.

A task's `judge:` block (parsed by `JudgeConfig.from_dict`) names a judge model (a
weightsmith model reference, or an OpenAI-compatible endpoint URL) and a Jinja2 rubric.
`score_with_judge` renders the rubric for each item, asks the judge in one batch and
parses an integer score from each reply; `aggregate_judge` turns the per-item results into
the task's metrics and `agreement` compares judge scores with human scores (exact and
within-one agreement, Cohen's kappa unweighted and quadratic, Spearman's rho).

Not here: loading tasks, running the evaluated model, filters and reports (the eval
runner), or the HTTP server (weightsmith.serve).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from weightsmith.endpoints import EndpointPool, RetryPolicy, is_endpoint, snippet
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.grants import Grants

DEFAULT_SCORE_PATTERN = r"(?i)score\s*[:=]\s*(\d+)"

#: Names the rubric template can use.
RUBRIC_VARIABLES = ("question", "answer", "reference", "doc")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def rubric_environment() -> Any:
    """The Jinja environment every rubric is compiled in (judge tasks and safety detectors)."""
    # Sandboxed: rubrics come from task files that may be shared; StrictUndefined: a typo in a
    # field name must fail loudly rather than render as an empty string the judge then scores.
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass
class JudgeConfig:
    """A task's `judge:` block. Build it with `from_dict`; fields are checked on construction."""

    model: str
    rubric: str
    endpoint_model: str = "default"
    api_key_env: str | None = None
    scale: tuple[int, int] = (1, 5)
    score_pattern: str = DEFAULT_SCORE_PATTERN
    pass_threshold: int | None = None
    human_label: str | None = None
    max_tokens: int = 64
    system: str | None = None
    #: The task file, named in error messages.
    source: str = "<judge>"
    _template: Any = field(init=False, repr=False, compare=False, default=None)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False, default=None)  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, data: dict, *, source: str) -> JudgeConfig:
        """Parse a task YAML's `judge:` mapping; any bad field -> ConfigError naming file and field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: judge: expected a mapping of judge settings, got {_show(data)}")
        known = [f.name for f in fields(cls) if f.init and f.name != "source"]
        for key in data:
            if key not in known:
                raise ConfigError(
                    f"{source}: judge.{key}: unknown key; expected one of {', '.join(sorted(known))}"
                )
        for key in ("model", "rubric"):
            if data.get(key) is None:
                raise ConfigError(f"{source}: judge.{key}: required but missing")
        return cls(**data, source=source)

    def _fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: judge.{name}: {message}")

    def __post_init__(self) -> None:
        for name in ("model", "rubric", "endpoint_model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise self._fail(name, f"expected a non-empty string, got {_show(value)}")
        for name in ("api_key_env", "human_label", "system"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise self._fail(name, f"expected a non-empty string, got {_show(value)}")
        scale = self.scale
        if not isinstance(scale, list | tuple) or len(scale) != 2 or not all(_is_int(v) for v in scale):
            raise self._fail("scale", f"expected two integers [low, high], got {_show(scale)}")
        if scale[0] >= scale[1]:
            raise self._fail("scale", f"expected low < high in [low, high], got {_show(scale)}")
        self.scale = (scale[0], scale[1])
        low, high = self.scale
        if self.pass_threshold is None:
            self.pass_threshold = high
        elif not _is_int(self.pass_threshold) or not low <= self.pass_threshold <= high:
            raise self._fail(
                "pass_threshold",
                f"expected an integer in the scale [{low}, {high}], got {_show(self.pass_threshold)}",
            )
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise self._fail("max_tokens", f"expected a positive integer, got {_show(self.max_tokens)}")
        self._pattern = self._compile_pattern()
        self._template = self._compile_rubric()

    def _compile_pattern(self) -> re.Pattern[str]:
        if not isinstance(self.score_pattern, str):
            raise self._fail(
                "score_pattern", f"expected a regular expression string, got {_show(self.score_pattern)}"
            )
        try:
            pattern = re.compile(self.score_pattern)
        except re.error as e:
            raise self._fail("score_pattern", f"not a valid regular expression: {e}") from None
        if pattern.groups != 1:
            raise self._fail(
                "score_pattern",
                f"expected exactly one capture group around the integer score, got {pattern.groups}; "
                "use (?:...) for other groups",
            )
        return pattern

    def _compile_rubric(self) -> Any:
        from jinja2 import TemplateSyntaxError

        try:
            return rubric_environment().from_string(self.rubric)
        except TemplateSyntaxError as e:
            raise self._fail("rubric", f"template does not compile (line {e.lineno}): {e.message}") from None

    @property
    def is_endpoint(self) -> bool:
        return is_endpoint(self.model)

    def check_grants(self, grants: Grants) -> str | None:
        """Refuse an endpoint the command line did not grant, and an API-key variable the file
        chose; return the variable whose value is the endpoint's key (None: no key)."""
        if not self.is_endpoint:
            return None
        grants.endpoint(self.model, lambda m: self._fail("model", m))
        return grants.api_key_var(self.api_key_env, lambda m: self._fail("api_key_env", m))

    def render(self, item: dict, index: int = 0) -> list[dict]:
        """The chat messages asking the judge about `item` (keys: doc, question, answer, reference)."""
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        values = {k: item.get(k) for k in RUBRIC_VARIABLES}
        try:
            text = self._template.render(**values)
        except UndefinedError as e:
            raise self._fail(
                "rubric",
                f"item {index}: {_undefined_field(str(e))} is undefined; "
                f"the rubric can use {', '.join(RUBRIC_VARIABLES)} and the fields of doc",
            ) from None
        except SecurityError as e:
            raise self._fail("rubric", f"item {index}: not allowed in a rubric: {e}") from None
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return [*messages, {"role": "user", "content": text}]

    def parse(self, text: str) -> int | None:
        """The first score the pattern finds in `text`; None if none, or outside the scale."""
        found = self._pattern.search(text or "")
        if found is None or found.group(1) is None:
            return None
        try:
            score = int(found.group(1))
        except ValueError:
            return None
        low, high = self.scale
        return score if low <= score <= high else None


def _undefined_field(message: str) -> str:
    """Jinja's "'dict object' has no attribute 'x'" / "'x' is undefined" -> "field 'x'"."""
    found = re.search(r"has no (?:attribute|element) (.+)$", message) or re.search(
        r"^(.+) is undefined$", message
    )
    return f"field {found.group(1)}" if found else message


# ---- backends ------------------------------------------------------------------------------


class JudgeBackend(Protocol):
    """Anything that answers chat conversations with text, one reply per conversation."""

    def complete(self, prompts: list[list[dict]]) -> list[str]: ...


class LocalJudge:
    """A judge running in-process on a loaded `weightsmith.LLM`, decoding greedily."""

    def __init__(self, llm: Any, *, max_tokens: int = 64, batch_size: int = 16) -> None:
        self.llm = llm
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def complete(self, prompts: list[list[dict]]) -> list[str]:
        # The same path as LLM.chat (chat template, then the engine), but batched; greedy with
        # no repetition penalty so a judge's verdict does not depend on generation_config.json.
        engine = self.llm.engine
        params = self.llm.sampling_params(temperature=0.0, repetition_penalty=1.0, max_tokens=self.max_tokens)
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            ids = [engine.chat_prompt(m) for m in prompts[start : start + self.batch_size]]
            out.extend(c.text for c in engine.generate(ids, params))
        return out


class EndpointJudge:
    """A judge behind OpenAI-compatible servers: POST {base_url}/chat/completions, greedy.

    `base_url` is what OpenAI's client calls base_url, e.g. http://localhost:8000/v1; several
    (comma-separated, or a list) share the conversations (`weightsmith.endpoints`: bounded
    concurrency per endpoint, retries, answers in order). `transport` (an httpx transport) and
    `retry` are for tests.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str = "default",
        api_key: str | None = None,
        *,
        max_tokens: int = 64,
        timeout: float = 120.0,
        concurrency: int = 4,
        transport: Any = None,
        retry: RetryPolicy | None = None,
        what: str = "judge endpoint",
    ) -> None:
        self.pool = EndpointPool(
            base_url, api_key=api_key, concurrency=max(1, concurrency), timeout=timeout,
            transport=transport, retry=retry, what=what,
        )  # fmt: skip
        self.base_url = self.pool.urls[0]
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout = timeout

    def client(self) -> Any:
        """An httpx.Client with this endpoint's key and timeouts (use it as a context manager)."""
        return self.pool.client()

    def map(self, fn: Callable[[list[dict]], Any], prompts: list[list[dict]]) -> list[Any]:
        """`fn(messages)` for each conversation, spread over the endpoints, in order."""
        # Concurrent requests let a batching server (ours, vLLM) decode them together.
        return self.pool.map(fn, prompts)

    def complete(self, prompts: list[list[dict]]) -> list[str]:
        return self.map(lambda m: self.reply(m)[0], prompts)

    def reply(self, messages: list[dict]) -> tuple[str, str | None]:
        """One greedy chat completion: (content, finish_reason)."""
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        answer = self.pool.post("/chat/completions", body)
        try:
            choice = answer["choices"][0]
            content, finish = choice["message"]["content"], choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            content, finish = ..., None
        if content is not ... and (content is None or isinstance(content, str)):
            return content or "", finish  # null content (e.g. a refusal) is an empty reply
        raise WeightsmithError(
            f"{self.pool.what} {self.url} returned a malformed reply (HTTP 200): "
            f"expected JSON with choices[0].message.content, got {snippet(json.dumps(answer))}"
        )


def endpoint_judge(
    url: str, model: str, api_key_env: str | None, *, max_tokens: int, where: str
) -> EndpointJudge:
    """An EndpointJudge whose API key comes from `api_key_env`; `where` names the setting
    ("FILE: judge.api_key_env") when that variable is unset."""
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(
                f"{where}: environment variable {api_key_env} is not set; export it or drop the setting"
            )
    return EndpointJudge(url, model, key, max_tokens=max_tokens)


def make_judge(
    cfg: JudgeConfig, *, load_model: Callable[[str], Any], grants: Grants | None = None
) -> JudgeBackend:
    """An EndpointJudge when `cfg.model` is a URL the command line granted (`grants`), with the
    key from the variable the command line named; else a LocalJudge on `load_model(cfg.model)`."""
    grants = grants or Grants()
    if cfg.is_endpoint:
        key_env = cfg.check_grants(grants)
        where = grants.api_key_flag
        return endpoint_judge(cfg.model, cfg.endpoint_model, key_env, max_tokens=cfg.max_tokens, where=where)
    return LocalJudge(load_model(cfg.model), max_tokens=cfg.max_tokens)


# ---- scoring -------------------------------------------------------------------------------


def score_with_judge(cfg: JudgeConfig, backend: JudgeBackend, items: list[dict]) -> list[dict]:
    """Judge each item ({doc, question, answer, reference}) -> {judge_score, judge_pass, judge_raw}."""
    # Render everything first: a rubric error must stop the run before any judge call.
    prompts = [cfg.render(item, i) for i, item in enumerate(items)]
    if not prompts:
        return []
    replies = backend.complete(prompts)
    if len(replies) != len(prompts):
        raise WeightsmithError(f"the judge returned {len(replies)} replies for {len(prompts)} prompts")
    results = []
    for text in replies:
        score = cfg.parse(text)
        passed = int(score is not None and score >= cfg.pass_threshold)  # type: ignore[operator]
        results.append({"judge_score": score, "judge_pass": passed, "judge_raw": text})
    return results


def aggregate_judge(results: list[dict]) -> dict:
    """Task metrics: mean parsed score, pass rate (unparsable counts as a fail), unparsable count."""
    scores = [r["judge_score"] for r in results if r["judge_score"] is not None]
    return {
        "judge_score": sum(scores) / len(scores) if scores else None,
        "judge_pass": sum(r["judge_pass"] for r in results) / len(results) if results else None,
        "judge_unparsable": len(results) - len(scores),
    }


def human_scores(cfg: JudgeConfig, docs: Sequence[dict]) -> list[int | None]:
    """Each doc's `cfg.human_label` value (None where absent); checked against the scale."""
    if cfg.human_label is None:
        raise cfg._fail("human_label", "not set; name the document field holding human scores")
    out: list[int | None] = []
    for i, doc in enumerate(docs):
        value = doc.get(cfg.human_label)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is not None and (not _is_int(value) or not cfg.scale[0] <= value <= cfg.scale[1]):
            raise cfg._fail(
                "human_label",
                f"document {i} field {cfg.human_label!r} is {value!r}; expected an integer in "
                f"the scale [{cfg.scale[0]}, {cfg.scale[1]}]",
            )
        out.append(value)
    if docs and all(v is None for v in out):
        raise cfg._fail("human_label", f"no document has a field {cfg.human_label!r}")
    return out


# ---- agreement with human labels -----------------------------------------------------------


def agreement(
    judge_scores: Sequence[int | None], human: Sequence[int | None], scale: Sequence[int]
) -> dict[str, Any]:
    """Judge-vs-human agreement on the items where both scores exist.

    Returns n, exact_agreement, within_one, cohen_kappa (unweighted), quadratic_kappa (weights
    (i-j)^2 over the scale's categories, as sklearn's cohen_kappa_score with weights="quadratic"
    and labels=range(low, high+1)), spearman (average ranks for ties; None if either side is
    constant) and unparsable (items with a human score but no judge score). Statistics that
    are undefined (no items, kappa with chance agreement 1) are None.
    """
    if len(judge_scores) != len(human):
        raise ValueError(f"got {len(judge_scores)} judge scores and {len(human)} human scores")
    low, high = int(scale[0]), int(scale[1])
    pairs = []
    for i, (j, h) in enumerate(zip(judge_scores, human, strict=True)):
        for who, v in (("judge", j), ("human", h)):
            if v is not None and not low <= v <= high:
                raise WeightsmithError(f"item {i}: {who} score {v!r} is outside the scale [{low}, {high}]")
        if j is not None and h is not None:
            pairs.append((int(j), int(h)))
    out: dict[str, Any] = {
        "n": len(pairs),
        "exact_agreement": None,
        "within_one": None,
        "cohen_kappa": None,
        "quadratic_kappa": None,
        "spearman": None,
        "unparsable": sum(1 for j, h in zip(judge_scores, human, strict=True) if j is None and h is not None),
    }
    if not pairs:
        return out
    n = len(pairs)
    out["exact_agreement"] = sum(a == b for a, b in pairs) / n
    out["within_one"] = sum(abs(a - b) <= 1 for a, b in pairs) / n
    out["cohen_kappa"] = _kappa(pairs, low, high, quadratic=False)
    out["quadratic_kappa"] = _kappa(pairs, low, high, quadratic=True)
    out["spearman"] = _spearman([a for a, _ in pairs], [b for _, b in pairs])
    return out


def _kappa(pairs: list[tuple[int, int]], low: int, high: int, *, quadratic: bool) -> float | None:
    """Cohen's kappa = 1 - sum(w * observed) / sum(w * expected), w = disagreement weights
    (Cohen 1960; quadratic weights per Cohen 1968 / Fleiss & Cohen 1973)."""
    import numpy as np

    k = high - low + 1
    observed = np.zeros((k, k))  # (K, K): rows judge, columns human
    for a, b in pairs:
        observed[a - low, b - low] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(pairs)  # chance, from the marginals
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 if quadratic else (idx[:, None] != idx[None, :])
    denominator = float((weights * expected).sum())
    if denominator == 0:  # both raters put everything in one category: kappa is undefined
        return None
    return float(1 - (weights * observed).sum() / denominator)


def _average_ranks(values: list[int]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):  # ties share the mean of the ranks they span (1-based)
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(x: list[int], y: list[int]) -> float | None:
    """Spearman's rho: Pearson's r on average ranks (as scipy.stats.spearmanr)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy)
