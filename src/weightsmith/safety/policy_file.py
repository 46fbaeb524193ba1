"""Policy files as records: the declared format and `read_policy` (format: policies/README.md).

A policy file is a `PolicyFile`: name, version, categories, refusal templates, an optional
`classifier:` judge, `input:` and `output:` lists of rules and `examples:`. A rule is one of
four records chosen by its `type:` key (a tagged union: `KeywordsRule`, `RegexRule`, `PiiRule`,
`ClassifierRule`); each checks its own fields (actions its type allows, templates, regular
expressions, PII kinds) when loaded. `read_policy` loads a file through
`weightsmith.config.load_record`, so every mistake is one ConfigError line
``FILE:LINE: key: problem``, then `PolicyFile.check` checks what needs the whole file:
unique rule ids, the categories and refusal templates rules name, the rules examples name.

A policy's `classifier:` may name an OpenAI-compatible endpoint, but a shared file cannot
reach the network or choose which secret is sent: `ClassifierSettings.check_grants` refuses
an endpoint unless the command line names that URL (`--classifier-endpoint`), and takes the
API key only from the variable the command line names (`--classifier-api-key-env`). Those
flags are `ClassifierAccess`, a record every command that loads a policy embeds.

Not here: resolving `builtin:NAME` and running a policy (`Guard` in policy.py, whose
`Guard.load` calls `read_policy`); `Rule` matching and the PII detectors (rails.py).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from weightsmith.config import BadValue, did_you_mean, opt, read_yaml
from weightsmith.config.records import BadField, Where, load_record, nonempty, where_field
from weightsmith.errors import ConfigError
from weightsmith.grants import Grants
from weightsmith.safety.rails import PII_KINDS, Rule

__all__ = [
    "ACTIONS",
    "DIRECTIONS",
    "RULE_TYPES",
    "ClassifierAccess",
    "ClassifierRule",
    "ClassifierSettings",
    "Example",
    "KeywordsRule",
    "PiiRule",
    "PolicyFile",
    "RegexRule",
    "read_policy",
]

ACTIONS = ("allow", "redact", "block")
DIRECTIONS = ("input", "output")
RULE_TYPES = ("keywords", "regex", "pii", "classifier")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_policy(path: Path, *, has_judge: bool = False) -> PolicyFile:
    """The checked policy file at `path`; ConfigError naming FILE:LINE and key if it is bad.

    `has_judge`: the caller supplies the classifier's judge, so classifier rules need no
    `classifier:` settings."""
    data = read_yaml(path, what="policy file", hint="give a .yaml policy file or builtin:NAME")
    policy = load_record(PolicyFile, data, source=str(path))
    policy.check(has_judge=has_judge)
    return policy


# ---------------------------------------------------------------------------
# value checks


def _rule_id(value: str) -> None:
    if not _ID.fullmatch(value):
        raise BadValue(f"{value!r}: use letters, digits, '_', '-' or '.'")


def _template(allowed: tuple[str, ...]) -> Callable[[str], None]:
    """A check: a str.format template using only the `allowed` placeholders."""

    def check(text: str) -> None:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as e:
            raise BadValue(f"bad template ({e}); write a literal brace as {{{{ or }}}}") from None
        for name in names:
            if name not in allowed:
                slots = ", ".join("{" + a + "}" for a in allowed)
                raise BadValue(
                    f"unknown placeholder {{{name}}}; use {slots} (write a literal brace as {{{{ or }}}})"
                )

    return check


def _pii_kind(kind: str) -> None:
    if kind not in PII_KINDS:
        hint = did_you_mean(kind, PII_KINDS, cutoff=0.5) or f" (one of {', '.join(PII_KINDS)})"
        raise BadValue(f"unknown PII kind {kind!r}{hint}")


def _positive(value: int) -> None:
    if value < 1:
        raise BadValue(f"expected a positive integer, got {value!r}")


Text = Annotated[str, nonempty]
Texts = Annotated[list[Text], nonempty]
RuleId = Annotated[str, nonempty, _rule_id]
Refusal = Annotated[str, nonempty, _template(("category", "category_description"))]
RedactWith = Annotated[str, nonempty, _template(("kind", "KIND"))]
_NULL_IS_EMPTY = {"null": "default"}  # `input:` with every rule commented out
_NULL_REFUSED = {"null": "refuse"}  # given means set: `classifier:` alone is a mistake


# ---------------------------------------------------------------------------
# rules: a tagged union on `type:`


@dataclass(frozen=True, kw_only=True)
class _RuleRecord:
    """Keys every rule has; `actions` lists the actions its type allows, and each subclass
    declares its `type:` tag (the tagged union `RuleRecord`)."""

    actions: ClassVar[tuple[str, ...]] = ("block",)

    id: RuleId
    action: str
    refusal: Text | None = None
    description: Text | None = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        if self.action not in self.actions:
            why = " (only pii and regex rules can redact)" if self.action == "redact" else ""
            raise BadField(
                "action",
                f"{self.action!r} is not valid for a {self.type} rule{why}; use {' or '.join(self.actions)}",
            )
        if self.refusal is not None and self.action != "block":
            raise BadField("refusal", "only block rules refuse; remove refusal")
        if getattr(self, "decode", False) and self.action == "redact":
            raise BadField(
                "decode",
                "decode works with action: block only (redaction edits the text as written); remove it",
            )
        if getattr(self, "redact_with", None) is not None and self.action != "redact":
            raise BadField("redact_with", "only redact rules use redact_with")

    def to_rule(self, direction: str) -> Rule:
        """The runtime `Rule` (rails.py) for this record."""
        keys = {k: v for k, v in vars(self).items() if k != "where" and v is not None}  # None: Rule's default
        for name in ("keywords", "patterns", "detect", "block_categories"):
            if name in keys:
                keys[name] = tuple(keys[name])
        return Rule(direction=direction, line=self.where.line, **keys)


@dataclass(frozen=True, kw_only=True)
class KeywordsRule(_RuleRecord):
    """Whole words or phrases, case-insensitive (`*` matches the rest of a word)."""

    type: Literal["keywords"]
    category: Text
    decode: bool = False
    keywords: Texts

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "keywords", [w.strip() for w in self.keywords])


@dataclass(frozen=True, kw_only=True)
class RegexRule(_RuleRecord):
    """Regular expressions, case-insensitive unless `case_sensitive`."""

    actions: ClassVar[tuple[str, ...]] = ("block", "redact")

    type: Literal["regex"]
    category: Text
    decode: bool = False
    patterns: Texts
    case_sensitive: bool = False
    redact_with: RedactWith | None = field(default=None, metadata=_NULL_REFUSED)

    def __post_init__(self) -> None:
        super().__post_init__()
        flags = 0 if self.case_sensitive else re.IGNORECASE
        for i, pattern in enumerate(self.patterns):
            try:
                compiled = re.compile(pattern, flags)
            except re.error as e:
                raise BadField(
                    "patterns",
                    f"rule {self.id}: invalid regular expression {pattern!r}: {e}; fix the pattern "
                    "(in YAML, single-quote patterns so backslashes stay as written)",
                    sub=i,
                ) from None
            if compiled.search(""):
                raise BadField(
                    "patterns",
                    f"rule {self.id}: {pattern!r} matches empty text; it would match everything",
                    sub=i,
                )


@dataclass(frozen=True, kw_only=True)
class PiiRule(_RuleRecord):
    """The built-in PII detectors named in `detect` (run in `PII_KINDS` order)."""

    actions: ClassVar[tuple[str, ...]] = ("block", "redact")

    type: Literal["pii"]
    category: Text
    decode: bool = False
    detect: Annotated[list[Annotated[str, nonempty, _pii_kind]], nonempty]
    redact_with: RedactWith | None = field(default=None, metadata=_NULL_REFUSED)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "detect", [k for k in PII_KINDS if k in set(self.detect)])


@dataclass(frozen=True, kw_only=True)
class ClassifierRule(_RuleRecord):
    """Asks the judge which category a text falls into; blocks those in `block_categories`."""

    key_notes: ClassVar[dict[str, str]] = {
        key: "not a key of a classifier rule: the judge names the category (list the ones to block "
        "in block_categories) and reads the text as written"
        for key in ("category", "decode")
    }

    type: Literal["classifier"]
    block_categories: Texts


RuleRecord = KeywordsRule | RegexRule | PiiRule | ClassifierRule


# ---------------------------------------------------------------------------
# the other parts of a policy


@dataclass(frozen=True, kw_only=True)
class ClassifierSettings:
    """The judge a policy's classifier rules ask (`classifier:`)."""

    model: Text
    endpoint_model: Text = "default"
    api_key_env: Text | None = None
    max_tokens: Annotated[int, _positive] = 16
    where: Where = where_field()

    @property
    def line(self) -> int:
        return self.where.line

    def check_grants(self, grants: Grants) -> str | None:
        """Refuse an endpoint the command line did not grant, and an API-key variable the file
        chose; return the variable whose value is the endpoint's key (None: no key)."""
        grants.endpoint(self.model, lambda m: self.where.error("model", m))
        return grants.api_key_var(self.api_key_env, lambda m: self.where.error("api_key_env", m))


@dataclass(kw_only=True)
class ClassifierAccess:
    """The command line's grants to a guard policy's classifier (flags of every command that
    loads a policy, embedded flattened: `--classifier-endpoint`, `--classifier-api-key-env`)."""

    classifier_endpoint: list[str] = opt(
        default_factory=list, help="let a guard policy's classifier call this OpenAI-compatible "
        "endpoint URL (a policy cannot reach the network otherwise)"
    )  # fmt: skip
    classifier_api_key_env: str | None = opt(
        None, "environment variable whose value is sent as the classifier endpoint's API key"
    )

    def grants(self) -> Grants:
        """What these flags let a policy's classifier reach (weightsmith.grants)."""
        return Grants(
            endpoints=tuple(self.classifier_endpoint),
            api_key_env=self.classifier_api_key_env,
            endpoint_flag="--classifier-endpoint",
            api_key_flag="--classifier-api-key-env",
        )


@dataclass(frozen=True, kw_only=True)
class Example:
    """A policy's own test case: `guard test` checks the guard does what it says."""

    text: str
    expect: Literal["allow", "redact", "block"]
    direction: Literal["input", "output"] = "input"
    rule: str | None = None
    redacted: str | None = None
    note: str | None = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        if self.rule is not None and self.expect == "allow":
            raise BadField("rule", "only with expect: block or redact; remove it")
        if self.redacted is not None and self.expect != "redact":
            raise BadField("redacted", "only with expect: redact; remove it")

    @property
    def line(self) -> int:
        return self.where.line


@dataclass(kw_only=True)
class PolicyFile:
    """A whole policy file, loaded; `check()` before use."""

    policy: Text
    version: Text
    refusals: dict[str, Refusal] = field(metadata={"any_keys": True})  # names as text, as always
    description: Text | None = None
    categories: dict[str, Text] = field(default_factory=dict, metadata=_NULL_IS_EMPTY)
    classifier: ClassifierSettings | None = field(default=None, metadata=_NULL_REFUSED)
    input: list[RuleRecord] = field(default_factory=list, metadata={"noun": "rule", **_NULL_IS_EMPTY})
    output: list[RuleRecord] = field(default_factory=list, metadata={"noun": "rule", **_NULL_IS_EMPTY})
    examples: list[Example] = field(default_factory=list, metadata={"noun": "example", **_NULL_IS_EMPTY})
    where: Where = where_field()

    def __post_init__(self) -> None:
        for cid in self.categories:
            if not _ID.fullmatch(cid):
                raise BadField(
                    "categories", "a category id must be letters, digits, '_', '-' or '.'", sub=cid
                )
            if cid.lower() == "none":
                raise BadField("categories", "'none' is reserved (the classifier's no-match)", sub=cid)
        if "default" not in self.refusals:
            raise BadField("refusals", "required but missing; add a default refusal text", sub="default")
        self.refusals = {name: text.strip() for name, text in self.refusals.items()}

    def rules(self, direction: str) -> list[Rule]:
        """The runtime rules of one direction, in file order."""
        return [r.to_rule(direction) for r in (self.input if direction == "input" else self.output)]

    def check(self, *, has_judge: bool = False) -> None:
        """What no single record can check: ids, cross-references, rules present, a judge."""
        seen: dict[str, Where] = {}
        for direction in DIRECTIONS:
            for rule in self.input if direction == "input" else self.output:
                if rule.id in seen:
                    first = seen[rule.id]
                    raise rule.where.error(
                        "id",
                        f"duplicate rule id {rule.id!r} (first used by {first.label} at line {first.line}); "
                        "give each rule its own id",
                    )
                seen[rule.id] = rule.where
                self._check_refs(rule)
                if rule.type == "classifier" and self.classifier is None and not has_judge:
                    raise rule.where.error(
                        None,
                        "a classifier rule needs a judge model; add `classifier: {model: NAME_OR_URL}` at the top level",
                    )
        if not self.input and not self.output:
            raise ConfigError(
                f"{self.where.source}:1: input: the policy has no rules; add rules under input: or output:"
            )
        for example in self.examples:
            self._check_example(example)

    def _check_refs(self, rule: RuleRecord) -> None:
        known = list(self.categories)
        hint = " (the policy has no categories:)"
        category = getattr(rule, "category", None)
        if category is not None and category not in self.categories:
            raise rule.where.error(
                "category",
                f"unknown category {category!r}{did_you_mean(category, known, cutoff=0.5) if known else hint}; "
                "add it under categories: to define it",
            )
        for i, cat in enumerate(getattr(rule, "block_categories", ())):
            if cat not in self.categories:
                close = did_you_mean(cat, known, cutoff=0.5) if known else hint
                raise rule.where.error("block_categories", f"unknown category {cat!r}{close}", sub=i)
        if rule.refusal is not None and rule.refusal not in self.refusals:
            raise rule.where.error(
                "refusal",
                f"unknown refusal template {rule.refusal!r}{did_you_mean(rule.refusal, list(self.refusals), cutoff=0.5)}"
                "; define it under refusals:",
            )

    def _check_example(self, example: Example) -> None:
        if example.rule is None:
            return
        ids = [r.id for r in (self.input if example.direction == "input" else self.output)]
        if example.rule not in ids:
            hint = (
                did_you_mean(example.rule, ids, cutoff=0.5)
                if ids
                else f" (the policy has no {example.direction} rules)"
            )
            raise example.where.error("rule", f"no {example.direction} rule {example.rule!r}{hint}")
