"""Policy rails: `Rule` and the matching it does (keywords, regular expressions, PII detectors).

A `Rule` is one rail of a guardrail policy. Keywords match whole words, case-insensitively
(`*` matches the rest of a word); regex rules carry their patterns compiled at load; pii
rules run the built-in detectors in `PII_KINDS` order (email, phone, credit_card with a Luhn
check, ip_address, us_ssn, api_key). A rule finds what it matches in a text (also in its
rot13, leetspeak-normalised and base64-decoded readings when `decode` is set) or redacts it.

Not here: `Guard` and `Verdict`, which run rules in order (policy.py); the policy file
format, whose rule records check their fields and become `Rule`s (policy_file.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from weightsmith.safety.encodings import b64decode_runs, decoded_views, rot13, unleet

__all__ = ["PII_KINDS", "Rule", "keyword_regex", "labelled_views"]

#: PII detectors, in the order they run: card numbers before phones, so a phone pattern
#: never eats part of a card number.
PII_KINDS = ("credit_card", "us_ssn", "api_key", "email", "ip_address", "phone")
_DEFAULT_REDACT = "[{kind}]"


# ---------------------------------------------------------------------------
# PII detectors


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _phone_ok(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    if not 7 <= len(digits) <= 15:
        return False
    # A bare run of digits is a phone number only at a phone number's usual length.
    return bool(re.search(r"[\s.()+-]", s)) or 10 <= len(digits) <= 11


def _ip_ok(s: str) -> bool:
    return all(int(part) <= 255 for part in s.split("."))


_KEY_PREFIXED = (
    r"(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_live_[A-Za-z0-9]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,})"
)


def _key_ok(s: str) -> bool:
    if re.fullmatch(_KEY_PREFIXED, s):
        return True
    # A generic token: long, mixing upper case, lower case and digits, and not base64 of text.
    has_all = re.search(r"[A-Z]", s) and re.search(r"[a-z]", s) and re.search(r"\d", s)
    return bool(has_all) and not b64decode_runs(s)


_PII: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    "credit_card": (re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), _card_ok),
    "us_ssn": (
        re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"),
        None,
    ),
    "api_key": (
        re.compile(rf"(?<![\w+/=-])(?:{_KEY_PREFIXED}|[A-Za-z0-9_-]{{32,}})(?![\w+/=-])"),
        _key_ok,
    ),
    "email": (re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?!\w)"), None),
    "ip_address": (re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)"), _ip_ok),
    "phone": (
        re.compile(
            r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-]?)"
            r"\d{3,4}[ .-]?\d{3,5}(?![ .-]?\d)(?!\w)"
        ),
        _phone_ok,
    ),
}


def _pii_find(kind: str, text: str) -> list[re.Match[str]]:
    pattern, valid = _PII[kind]
    return [m for m in pattern.finditer(text) if valid is None or valid(m.group(0))]


def keyword_regex(phrase: str) -> str:
    """The regular expression for a keyword phrase: whole words, `*` matching the rest of a word."""
    words = []
    for word in phrase.split():
        words.append("".join(r"\w*" if c == "*" else re.escape(c) for c in word))
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


def labelled_views(text: str) -> list[tuple[str, str]]:
    """(label, view) for each of `decoded_views(text)`; the label is "" for the text itself."""
    r13, leet = rot13(text), unleet(text)
    out = []
    for view in decoded_views(text):
        if view == text:
            label = ""
        elif view == r13:
            label = "rot13"
        elif view == leet:
            label = "leetspeak"
        else:
            label = "base64"
        out.append((label, view))
    return out


# ---------------------------------------------------------------------------
# rules


@dataclass
class Rule:
    """One rail. Build through `Guard.load`; fields are checked there (policy_file.py).

    Keywords and patterns are compiled when the rule is made."""

    id: str
    type: str
    direction: str
    action: str
    category: str | None = None
    refusal: str | None = None
    decode: bool = False
    description: str | None = None
    keywords: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    case_sensitive: bool = False
    detect: tuple[str, ...] = ()
    redact_with: str = _DEFAULT_REDACT
    block_categories: tuple[str, ...] = ()
    line: int = 0
    _compiled: list[tuple[str, re.Pattern[str]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.type == "keywords":
            self._compiled = [(w, re.compile(keyword_regex(w), re.IGNORECASE)) for w in self.keywords]
        elif self.type == "regex":
            flags = 0 if self.case_sensitive else re.IGNORECASE
            self._compiled = [(p, re.compile(p, flags)) for p in self.patterns]
        else:
            self._compiled = []

    def find(self, text: str, views: Callable[[str], list[tuple[str, str]]] = labelled_views) -> str | None:
        """What this (keywords, regex or pii) rule matches in `text` or its decoded views, else None.

        `views` gives (label, view) pairs for a text; callers pass a cached one."""
        for label, view in views(text) if self.decode else [("", text)]:
            hit = self._find_plain(view)
            if hit is not None:
                return f"{hit} (decoded from {label})" if label else hit
        return None

    def _find_plain(self, text: str) -> str | None:
        if self.type == "pii":
            kinds = [k for k in PII_KINDS if k in self.detect and _pii_find(k, text)]
            return ", ".join(kinds) if kinds else None
        for source, pattern in self._compiled:
            found = pattern.search(text)
            if found:
                return source if self.type == "keywords" else _clip(found.group(0))
        return None

    def redact(self, text: str) -> tuple[str, str | None]:
        """`text` with this rule's matches replaced, and what matched (None: nothing)."""
        hits: list[str] = []
        if self.type == "pii":
            for kind in PII_KINDS:
                if kind not in self.detect:
                    continue
                found = _pii_find(kind, text)
                if found:
                    hits.append(kind)
                    mark = self.redact_with.format(kind=kind, KIND=kind.upper())
                    for m in reversed(found):
                        text = text[: m.start()] + mark + text[m.end() :]
        else:
            # Not the matched text: that is what the rule hides.
            mark = self.redact_with.format(kind=self.id, KIND=self.id.upper())
            total = 0
            for _source, pattern in self._compiled:
                text, n = pattern.subn(lambda _m: mark, text)
                total += n
            if total:
                hits.append(f"{total} match{'es' if total > 1 else ''}")
        return text, (", ".join(hits) if hits else None)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
