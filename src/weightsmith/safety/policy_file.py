"""Reading guardrail policy files: YAML -> a checked `Guard` (format: policies/README.md).

`read_policy` parses a policy file with line numbers kept for every key and list item, checks
every field (known keys, rule types and actions, ids, category and refusal references,
templates, regular expressions, PII kinds, examples) and builds the `Guard`. Every mistake
is reported at load as one ConfigError line naming FILE:LINE, the field and how to fix it.

Not here: resolving `builtin:NAME` and checking texts (policy.py, whose `Guard.load` calls
`read_policy`); `Rule` matching and the PII detectors (rails.py).
"""

from __future__ import annotations

import difflib
import hashlib
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from weightsmith.config import LineLoader, read_yaml
from weightsmith.errors import ConfigError
from weightsmith.eval.judge import JudgeBackend
from weightsmith.safety.policy import ACTIONS, DIRECTIONS, RULE_TYPES, ClassifierSettings, Example, Guard
from weightsmith.safety.rails import PII_KINDS, Rule, _keyword_regex

__all__ = ["read_policy"]

_TOP_KEYS = (
    "policy",
    "version",
    "description",
    "refusals",
    "categories",
    "classifier",
    "input",
    "output",
    "examples",
)
_CLASSIFIER_KEYS = ("model", "endpoint_model", "api_key_env", "max_tokens")
_COMMON_RULE_KEYS = ("id", "type", "action", "category", "refusal", "decode", "description")
_TYPE_KEYS = {
    "keywords": ("keywords",),
    "regex": ("patterns", "case_sensitive", "redact_with"),
    "pii": ("detect", "redact_with"),
    "classifier": ("block_categories",),
}
_TYPE_ACTIONS = {
    "keywords": ("block",),
    "regex": ("block", "redact"),
    "pii": ("block", "redact"),
    "classifier": ("block",),
}
_EXAMPLE_KEYS = ("text", "direction", "expect", "rule", "redacted", "note")
_REFUSAL_FIELDS = ("category", "category_description")
_REDACT_FIELDS = ("kind", "KIND")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_policy(
    path: Path,
    *,
    judge: JudgeBackend | None = None,
    load_model: Callable[[str], Any] | None = None,
) -> Guard:
    """The `Guard` for the policy file at `path`; ConfigError naming FILE:LINE if it is bad."""
    data = read_yaml(
        path,
        what="policy file",
        hint="give a .yaml policy file or builtin:NAME",
        loader=_PolicyLoader,
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return _Parser(str(path)).parse(data, digest=digest, judge=judge, load_model=load_model)


# ---------------------------------------------------------------------------
# reading policy files


class _MarkedList(list):
    """A YAML sequence that remembers the 1-based line of each item."""

    item_lines: list[int]


class _PolicyLoader(LineLoader):
    """LineLoader whose sequences are `_MarkedList`s too."""


def _construct_sequence(loader: _PolicyLoader, node: yaml.SequenceNode) -> _MarkedList:
    data = _MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    data.item_lines = [child.start_mark.line + 1 for child in node.value]
    return data


_PolicyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _key_line(container: Any, key: Any, default: int) -> int:
    if isinstance(container, dict):
        return getattr(container, "key_lines", {}).get(key, default)
    if isinstance(container, list):
        lines = getattr(container, "item_lines", None)
        if lines and isinstance(key, int) and 0 <= key < len(lines):
            return lines[key]
    return default


def _show(value: Any) -> str:
    return repr(value)


def _did_you_mean(key: Any, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(options), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(options)}"


def _template_fields(text: str) -> list[str]:
    """Field names used by a str.format template; ValueError if it does not parse."""
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, line: int, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}:{line}: {where}: {message}")

    # -- small checks ---------------------------------------------------------

    def string(self, value: Any, line: int, where: str, *, quote_hint: bool = False) -> str:
        if not isinstance(value, str) or not value.strip():
            hint = "; quote it" if quote_hint and value is not None and not isinstance(value, str) else ""
            raise self.error(line, where, f"expected a non-empty string, got {_show(value)}{hint}")
        return value

    def boolean(self, value: Any, line: int, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(line, where, f"expected true or false, got {_show(value)}")
        return value

    def strings(self, value: Any, line: int, where: str, what: str) -> list[tuple[int, str]]:
        """A non-empty list of non-empty strings -> [(line, item)]."""
        if not isinstance(value, list) or not value:
            raise self.error(line, where, f"expected a non-empty list of {what}, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            item_line = _key_line(value, i, line)
            if not isinstance(item, str) or not item.strip():
                hint = (
                    " (YAML reads yes/no/on/off and numbers unquoted; quote it)" if item is not None else ""
                )
                raise self.error(
                    item_line, f"{where}[{i}]", f"expected a non-empty string, got {_show(item)}{hint}"
                )
            out.append((item_line, item))
        return out

    def mapping(self, value: Any, line: int, where: str, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.error(line, where, f"expected a mapping of {what}, got {_show(value)}")
        return value

    def template(self, text: str, line: int, where: str, allowed: Sequence[str]) -> None:
        try:
            names = _template_fields(text)
        except ValueError as e:
            raise self.error(
                line, where, f"bad template ({e}); write a literal brace as {{{{ or }}}}"
            ) from None
        for name in names:
            if name not in allowed:
                raise self.error(
                    line,
                    where,
                    f"unknown placeholder {{{name}}}; use {', '.join('{' + a + '}' for a in allowed)} "
                    "(write a literal brace as {{ or }})",
                )

    # -- the file ---------------------------------------------------------------

    def parse(
        self,
        data: Any,
        *,
        digest: str,
        judge: JudgeBackend | None,
        load_model: Callable[[str], Any] | None,
    ) -> Guard:
        if not isinstance(data, dict):
            raise self.error(
                1,
                "policy",
                f"expected a mapping of policy keys (policy:, version:, ...), got {type(data).__name__}",
            )
        for key in data:
            if key not in _TOP_KEYS:
                raise self.error(
                    _key_line(data, key, 1), str(key), f"unknown key; {_did_you_mean(key, _TOP_KEYS)}"
                )
        for key in ("policy", "version", "refusals"):
            if key not in data:
                raise self.error(1, key, f"required but missing; add `{key}:` at the top level")

        def line(key: str) -> int:
            return _key_line(data, key, 1)

        name = self.string(data["policy"], line("policy"), "policy")
        version = self.string(data["version"], line("version"), "version", quote_hint=True)
        description = None
        if data.get("description") is not None:
            description = self.string(data["description"], line("description"), "description")
        categories = self.categories(data.get("categories"), line("categories"))
        refusals = self.refusals(data["refusals"], line("refusals"))
        classifier = self.classifier(data["classifier"], line("classifier")) if "classifier" in data else None

        seen: dict[str, tuple[str, int]] = {}
        rules: dict[str, list[Rule]] = {}
        for direction in DIRECTIONS:
            rules[direction] = []
            if direction not in data:
                continue
            items = data[direction]
            if items is None:
                continue
            if not isinstance(items, list):
                raise self.error(line(direction), direction, f"expected a list of rules, got {_show(items)}")
            for i, item in enumerate(items):
                rule = self.rule(item, _key_line(items, i, line(direction)), f"{direction}[{i}]", direction)
                if rule.id in seen:
                    where, first = seen[rule.id]
                    raise self.error(
                        rule.line,
                        f"{direction}[{i}].id",
                        f"duplicate rule id {rule.id!r} (first used by {where} at line {first}); "
                        "give each rule its own id",
                    )
                seen[rule.id] = (f"{direction}[{i}]", rule.line)
                self.check_refs(rule, f"{direction}[{i}]", categories, refusals, item)
                if rule.type == "classifier" and classifier is None and judge is None:
                    raise self.error(
                        rule.line,
                        f"{direction}[{i}]",
                        "a classifier rule needs a judge model; add `classifier: {model: NAME_OR_URL}` "
                        "at the top level",
                    )
                rules[direction].append(rule)
        if not rules["input"] and not rules["output"]:
            raise self.error(1, "input", "the policy has no rules; add rules under input: or output:")

        examples = self.examples(data.get("examples"), line("examples"), rules) if "examples" in data else []
        return Guard(
            name=name,
            version=version,
            path=self.path,
            digest=digest,
            description=description,
            categories=categories,
            refusals=refusals,
            classifier=classifier,
            input_rules=rules["input"],
            output_rules=rules["output"],
            examples=examples,
            judge=judge,
            load_model=load_model,
        )

    def categories(self, value: Any, line: int) -> dict[str, str]:
        if value is None:
            return {}
        value = self.mapping(value, line, "categories", "category ids to descriptions (S1: violent crimes)")
        out = {}
        for cid, desc in value.items():
            item_line = _key_line(value, cid, line)
            if not isinstance(cid, str) or not _ID.fullmatch(cid):
                raise self.error(
                    item_line, f"categories.{cid}", "a category id must be letters, digits, '_', '-' or '.'"
                )
            if cid.lower() == "none":
                raise self.error(
                    item_line, "categories.none", "'none' is reserved (the classifier's no-match)"
                )
            out[cid] = self.string(desc, item_line, f"categories.{cid}")
        return out

    def refusals(self, value: Any, line: int) -> dict[str, str]:
        value = self.mapping(value, line, "refusals", "template names to texts (default: ...)")
        out = {}
        for key, text in value.items():
            item_line = _key_line(value, key, line)
            text = self.string(text, item_line, f"refusals.{key}")
            self.template(text, item_line, f"refusals.{key}", _REFUSAL_FIELDS)
            out[str(key)] = text.strip()
        if "default" not in out:
            raise self.error(line, "refusals.default", "required but missing; add a default refusal text")
        return out

    def classifier(self, value: Any, line: int) -> ClassifierSettings:
        value = self.mapping(value, line, "classifier", "judge settings (model: NAME_OR_URL)")
        for key in value:
            if key not in _CLASSIFIER_KEYS:
                raise self.error(
                    _key_line(value, key, line),
                    f"classifier.{key}",
                    f"unknown key; {_did_you_mean(key, _CLASSIFIER_KEYS)}",
                )

        def at(key: str) -> int:
            return _key_line(value, key, line)

        if "model" not in value:
            raise self.error(
                line, "classifier.model", "required; a model name or an endpoint URL (http://.../v1)"
            )
        model = self.string(value["model"], at("model"), "classifier.model")
        endpoint_model = self.string(
            value.get("endpoint_model", "default"), at("endpoint_model"), "classifier.endpoint_model"
        )
        api_key_env = None
        if value.get("api_key_env") is not None:
            api_key_env = self.string(value["api_key_env"], at("api_key_env"), "classifier.api_key_env")
        max_tokens = value.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise self.error(
                at("max_tokens"),
                "classifier.max_tokens",
                f"expected a positive integer, got {_show(max_tokens)}",
            )
        return ClassifierSettings(model, endpoint_model, api_key_env, max_tokens, line)

    def rule(self, item: Any, line: int, where: str, direction: str) -> Rule:
        if not isinstance(item, dict):
            raise self.error(line, where, f"expected a rule mapping (id:, type:, ...), got {_show(item)}")

        def at(key: str) -> int:
            return _key_line(item, key, line)

        for key in ("id", "type"):
            if key not in item:
                raise self.error(line, f"{where}.{key}", "required but missing")
        rid = self.string(item["id"], at("id"), f"{where}.id", quote_hint=True)
        if not _ID.fullmatch(rid):
            raise self.error(at("id"), f"{where}.id", f"{rid!r}: use letters, digits, '_', '-' or '.'")
        rtype = item["type"]
        if rtype not in RULE_TYPES:
            raise self.error(
                at("type"),
                f"{where}.type",
                f"unknown rule type {_show(rtype)}; {_did_you_mean(rtype, RULE_TYPES)}",
            )
        allowed = [
            k for k in _COMMON_RULE_KEYS if not (rtype == "classifier" and k in ("category", "decode"))
        ]
        allowed += _TYPE_KEYS[rtype]
        for key in item:
            if key in allowed:
                continue
            owner = next((t for t, keys in _TYPE_KEYS.items() if key in keys), None)
            if owner is not None:
                msg = f"not a key of a {rtype} rule (it belongs to type: {owner})"
            elif rtype == "classifier" and key in ("category", "decode"):
                msg = (
                    "not a key of a classifier rule: the judge names the category (list the ones to block "
                    "in block_categories) and reads the text as written"
                )
            else:
                msg = f"unknown key; {_did_you_mean(key, allowed)}"
            raise self.error(at(key), f"{where}.{key}", msg)
        if "action" not in item:
            raise self.error(
                line, f"{where}.action", f"required but missing; one of {', '.join(_TYPE_ACTIONS[rtype])}"
            )
        action = item["action"]
        if action not in _TYPE_ACTIONS[rtype]:
            ok = " or ".join(_TYPE_ACTIONS[rtype])
            why = " (only pii and regex rules can redact)" if action == "redact" else ""
            raise self.error(
                at("action"),
                f"{where}.action",
                f"{_show(action)} is not valid for a {rtype} rule{why}; use {ok}",
            )
        rule = Rule(id=rid, type=rtype, direction=direction, action=action, line=line)
        if rtype != "classifier":
            if "category" not in item:
                raise self.error(
                    line, f"{where}.category", "required but missing; name a category from categories:"
                )
            rule.category = self.string(item["category"], at("category"), f"{where}.category")
        if item.get("refusal") is not None:
            if action != "block":
                raise self.error(at("refusal"), f"{where}.refusal", "only block rules refuse; remove refusal")
            rule.refusal = self.string(item["refusal"], at("refusal"), f"{where}.refusal")
        if "decode" in item:
            rule.decode = self.boolean(item["decode"], at("decode"), f"{where}.decode")
            if rule.decode and action == "redact":
                raise self.error(
                    at("decode"),
                    f"{where}.decode",
                    "decode works with action: block only (redaction edits the text as written); remove it",
                )
        if item.get("description") is not None:
            rule.description = self.string(item["description"], at("description"), f"{where}.description")
        if "redact_with" in item:
            if action != "redact":
                raise self.error(
                    at("redact_with"), f"{where}.redact_with", "only redact rules use redact_with"
                )
            rule.redact_with = self.string(item["redact_with"], at("redact_with"), f"{where}.redact_with")
            self.template(rule.redact_with, at("redact_with"), f"{where}.redact_with", _REDACT_FIELDS)

        if rtype == "keywords":
            if "keywords" not in item:
                raise self.error(line, f"{where}.keywords", "required: a list of words or phrases")
            words = self.strings(item["keywords"], at("keywords"), f"{where}.keywords", "words or phrases")
            rule.keywords = tuple(w.strip() for _, w in words)
            rule._compiled = [(w, re.compile(_keyword_regex(w), re.IGNORECASE)) for w in rule.keywords]
        elif rtype == "regex":
            if "case_sensitive" in item:
                rule.case_sensitive = self.boolean(
                    item["case_sensitive"], at("case_sensitive"), f"{where}.case_sensitive"
                )
            if "patterns" not in item:
                raise self.error(line, f"{where}.patterns", "required: a list of regular expressions")
            pats = self.strings(item["patterns"], at("patterns"), f"{where}.patterns", "regular expressions")
            flags = 0 if rule.case_sensitive else re.IGNORECASE
            for i, (pline, pat) in enumerate(pats):
                try:
                    compiled = re.compile(pat, flags)
                except re.error as e:
                    raise self.error(
                        pline,
                        f"{where}.patterns[{i}]",
                        f"rule {rid}: invalid regular expression {pat!r}: {e}; fix the pattern "
                        "(in YAML, single-quote patterns so backslashes stay as written)",
                    ) from None
                if compiled.search(""):
                    raise self.error(
                        pline,
                        f"{where}.patterns[{i}]",
                        f"rule {rid}: {pat!r} matches empty text; it would match everything",
                    )
                rule._compiled.append((pat, compiled))
            rule.patterns = tuple(p for _, p in pats)
        elif rtype == "pii":
            if "detect" not in item:
                raise self.error(
                    line, f"{where}.detect", f"required: a list of PII kinds from {', '.join(PII_KINDS)}"
                )
            kinds = self.strings(item["detect"], at("detect"), f"{where}.detect", "PII kinds")
            for i, (kline, kind) in enumerate(kinds):
                if kind not in PII_KINDS:
                    raise self.error(
                        kline,
                        f"{where}.detect[{i}]",
                        f"unknown PII kind {kind!r}; {_did_you_mean(kind, PII_KINDS)}",
                    )
            rule.detect = tuple(k for k in PII_KINDS if k in {kind for _, kind in kinds})
        else:
            if "block_categories" not in item:
                raise self.error(
                    line, f"{where}.block_categories", "required: the category ids the judge blocks"
                )
            cats = self.strings(
                item["block_categories"], at("block_categories"), f"{where}.block_categories", "category ids"
            )
            rule.block_categories = tuple(c for _, c in cats)
        return rule

    def check_refs(self, rule: Rule, where: str, categories: dict, refusals: dict, item: dict) -> None:
        def at(key: str) -> int:
            return _key_line(item, key, rule.line)

        if rule.category is not None and rule.category not in categories:
            known = list(categories)
            hint = _did_you_mean(rule.category, known) if known else "the policy has no categories:"
            raise self.error(
                at("category"),
                f"{where}.category",
                f"unknown category {rule.category!r}; {hint} (add it under categories: to define it)",
            )
        for i, cat in enumerate(rule.block_categories):
            if cat not in categories:
                lines = item.get("block_categories")
                raise self.error(
                    _key_line(lines, i, at("block_categories")),
                    f"{where}.block_categories[{i}]",
                    f"unknown category {cat!r}; {_did_you_mean(cat, list(categories)) if categories else 'add categories:'}",
                )
        if rule.refusal is not None and rule.refusal not in refusals:
            raise self.error(
                at("refusal"),
                f"{where}.refusal",
                f"unknown refusal template {rule.refusal!r}; {_did_you_mean(rule.refusal, list(refusals))} "
                "(define it under refusals:)",
            )

    def examples(self, value: Any, line: int, rules: dict[str, list[Rule]]) -> list[Example]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(line, "examples", f"expected a list of examples, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            where = f"examples[{i}]"
            item_line = _key_line(value, i, line)
            if not isinstance(item, dict):
                raise self.error(item_line, where, f"expected a mapping (text:, expect:), got {_show(item)}")

            def at(key: str, item: dict = item, item_line: int = item_line) -> int:
                return _key_line(item, key, item_line)

            for key in item:
                if key not in _EXAMPLE_KEYS:
                    raise self.error(
                        at(key), f"{where}.{key}", f"unknown key; {_did_you_mean(key, _EXAMPLE_KEYS)}"
                    )
            for key in ("text", "expect"):
                if key not in item:
                    raise self.error(item_line, f"{where}.{key}", "required but missing")
            text = item["text"]
            if not isinstance(text, str):
                raise self.error(
                    at("text"), f"{where}.text", f"expected a string, got {_show(text)}; quote it"
                )
            direction = item.get("direction", "input")
            if direction not in DIRECTIONS:
                raise self.error(
                    at("direction"), f"{where}.direction", f"{_show(direction)}: use input or output"
                )
            expect = item["expect"]
            if expect not in ACTIONS:
                raise self.error(
                    at("expect"), f"{where}.expect", f"{_show(expect)}: use allow, block or redact"
                )
            rule = item.get("rule")
            if rule is not None:
                ids = [r.id for r in rules[direction]]
                if rule not in ids:
                    hint = _did_you_mean(rule, ids) if ids else f"the policy has no {direction} rules"
                    raise self.error(
                        at("rule"), f"{where}.rule", f"no {direction} rule {_show(rule)}; {hint}"
                    )
                if expect == "allow":
                    raise self.error(
                        at("rule"), f"{where}.rule", "only with expect: block or redact; remove it"
                    )
            redacted = item.get("redacted")
            if redacted is not None:
                if expect != "redact":
                    raise self.error(
                        at("redacted"), f"{where}.redacted", "only with expect: redact; remove it"
                    )
                if not isinstance(redacted, str):
                    raise self.error(
                        at("redacted"), f"{where}.redacted", f"expected a string, got {_show(redacted)}"
                    )
            note = item.get("note")
            if note is not None and not isinstance(note, str):
                raise self.error(at("note"), f"{where}.note", f"expected a string, got {_show(note)}")
            out.append(Example(text, direction, expect, rule, redacted, note, item_line))
        return out
