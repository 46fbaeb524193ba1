"""Bias audit data files: lexicons (YAML) and stereotype pairs (JSON lines), as records.

A lexicon file (`lexicons/README.md`) is a `LexiconFile`: `lexicon`, `version`, `groups`,
`terms` (aligned rows, one term per group). `read_lexicon` loads it through
`weightsmith.config.load_record` and `LexiconFile.check` checks the rows: a term may repeat
under the same group in several rows (the first row wins when it is replaced: "her" -> "his",
not "him"); a term under two different groups, a repeated row, an unknown or a missing group
is an error naming the file, line and field. `Lexicon` finds and substitutes the terms.

A pair file holds one `Pair` per line: {"id", "more", "less", "bias_type", "direction":
"stereo"|"antistereo"}; `more` is the more stereotypical sentence of the two (CrowS-Pairs'
`sent_more`). Ids are unique in a file.

Not here: the audits that use them (`weightsmith.safety.bias`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from weightsmith.config import read_yaml
from weightsmith.config.records import BadField, Where, load_record, nonempty, where_field
from weightsmith.errors import ConfigError, UsageError
from weightsmith.files import builtin_file, json_object_line

__all__ = [
    "DIRECTIONS",
    "Lexicon",
    "LexiconFile",
    "Pair",
    "lexicons_dir",
    "load_lexicon",
    "load_pairs",
    "match_case",
    "pairs_dir",
    "read_lexicon",
    "read_pairs",
    "resolve_lexicon",
    "resolve_pairs",
]

DIRECTIONS = ("stereo", "antistereo")
_TERM_RE = re.compile(r"\w(?:.*\w)?", re.S)
Text = Annotated[str, nonempty]

# ---------------------------------------------------------------------------
# built-in data


def lexicons_dir() -> Path:
    return Path(str(resources.files("weightsmith.safety") / "lexicons"))


def pairs_dir() -> Path:
    return Path(str(resources.files("weightsmith.safety") / "pairs"))


def _resolve(spec: str, folder: Path, suffix: str, what: str, flag: str) -> Path:
    try:
        found = builtin_file(spec, folder, (suffix,), what)
    except UsageError as e:
        raise UsageError(f"{flag} {e}") from None
    if found is not None:
        return found
    path = Path(spec.strip()).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag} {spec}: {what} file not found (give a file or builtin:NAME)")
    return path


def resolve_lexicon(spec: str) -> Path:
    """`builtin:NAME` (gender, names, dialect) or a YAML file."""
    return _resolve(spec, lexicons_dir(), ".yaml", "lexicon", "--lexicon")


def resolve_pairs(spec: str) -> Path:
    """`builtin:NAME` (stereotype-pairs) or a JSONL file."""
    return _resolve(spec, pairs_dir(), ".jsonl", "pair set", "--pairs")


# ---------------------------------------------------------------------------
# lexicons


def _norm(term: str) -> str:
    return " ".join(term.lower().split())


def match_case(source: str, replacement: str) -> str:
    """`replacement` in the case of `source`: all capitals (two letters or more) -> all
    capitals, a leading capital -> a leading capital, otherwise as the lexicon writes it."""
    letters = [c for c in source if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


@dataclass
class Lexicon:
    """Aligned terms per group; `rows[i][group]` is row i's term for that group."""

    name: str
    version: Any
    groups: list[str]
    rows: list[dict[str, str]]
    source: Path = field(default_factory=lambda: Path("<lexicon>"))
    description: str = ""

    def __post_init__(self) -> None:
        self._row_of: dict[str, int] = {}  # normalized term -> first row holding it
        self._group_of: dict[str, str] = {}
        for i, row in enumerate(self.rows):
            for g in self.groups:
                key = _norm(row[g])
                self._row_of.setdefault(key, i)
                self._group_of.setdefault(key, g)
        terms = sorted(self._row_of, key=lambda t: (-len(t), t))  # longest first: multiword wins
        alternatives = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in terms)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def find(self, text: str) -> list[tuple[str, str]]:
        """(term as written, its group) for every lexicon term in `text`."""
        return [(m.group(0), self._group_of[_norm(m.group(0))]) for m in self._pattern.finditer(text)]

    def substitute(self, text: str, group: str) -> str:
        """`text` with every term of any group replaced by its row's `group` term."""
        if group not in self.groups:
            raise UsageError(f"lexicon {self.name}: no group {group!r} (groups: {', '.join(self.groups)})")

        def repl(m: re.Match) -> str:
            return match_case(m.group(0), self.rows[self._row_of[_norm(m.group(0))]][group])

        return self._pattern.sub(repl, text)

    def find_in(self, value: Any) -> list[tuple[str, str]]:
        """Terms in every string inside `value` (dict values and list items, recursively)."""
        if isinstance(value, str):
            return self.find(value)
        if isinstance(value, dict):
            return [t for v in value.values() for t in self.find_in(v)]
        if isinstance(value, (list, tuple)):
            return [t for v in value for t in self.find_in(v)]
        return []

    def perturb(self, value: Any, group: str) -> Any:
        """A copy of `value` with `substitute` applied to every string inside it (keys kept)."""
        if isinstance(value, str):
            return self.substitute(value, group)
        if isinstance(value, dict):
            return {k: self.perturb(v, group) for k, v in value.items()}
        if isinstance(value, list):
            return [self.perturb(v, group) for v in value]
        if isinstance(value, tuple):
            return tuple(self.perturb(v, group) for v in value)
        return value


# ---------------------------------------------------------------------------
# lexicon files


@dataclass(frozen=True, kw_only=True)
class LexiconFile:
    """A lexicon file as written; `check()` turns its rows into clean aligned rows."""

    lexicon: Text
    groups: Any
    terms: Annotated[list[Any], nonempty]
    version: Any = None
    description: Any = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        groups = self.groups
        if (
            not isinstance(groups, list)
            or len(groups) < 2
            or not all(isinstance(g, str) and g.strip() for g in groups)
            or len(set(groups)) != len(groups)
        ):
            raise BadField("groups", "expected a list of two or more distinct names, e.g. [female, male]")

    def check(self) -> list[dict[str, str]]:
        """The rows, whitespace-normalised; ConfigError naming FILE:LINE and field if one is bad."""
        rows: list[dict[str, str]] = []
        seen: dict[str, tuple[str, int, int | None]] = {}  # term -> (group, row, line)
        rows_seen: dict[tuple, tuple[int, int | None]] = {}
        for i, row in enumerate(self.terms):
            lines = getattr(row, "key_lines", {})
            row_line = min(lines.values()) if lines else self.where.at("terms", i)[0]
            self._check_row(i, row, lines, row_line, seen)
            clean = {g: " ".join(row[g].split()) for g in self.groups}
            signature = tuple(_norm(clean[g]) for g in self.groups)
            if signature in rows_seen:
                other_i, other_line = rows_seen[signature]
                at = f" (line {other_line})" if other_line else ""
                raise self._error(
                    row_line, f"terms[{i}]", f"duplicate row: repeats terms[{other_i}]{at}; remove one"
                )
            rows_seen[signature] = (i, row_line)
            rows.append(clean)
        return rows

    def _error(self, line: int | None, key: str, message: str) -> ConfigError:
        source = self.where.source
        return ConfigError(f"{source}:{line}: {key}: {message}" if line else f"{source}: {key}: {message}")

    def _check_row(self, i: int, row: Any, lines: dict, row_line: int | None, seen: dict) -> None:
        groups, where = self.groups, f"terms[{i}]"
        if not isinstance(row, dict):
            raise self._error(
                row_line, where, f"expected a mapping of group to term, e.g. {{{groups[0]}: ..., ...}}"
            )
        for g in row:
            if g not in groups:
                raise self._error(
                    lines.get(g, row_line),
                    f"{where}.{g}",
                    f"unknown group; the groups are {', '.join(groups)}",
                )
        for g in groups:
            if g not in row:
                raise self._error(
                    row_line,
                    f"{where}.{g}",
                    f"missing; every row gives a term for each of {', '.join(groups)}",
                )
            term = row[g]
            if not isinstance(term, str) or not _TERM_RE.fullmatch(term.strip()):
                raise self._error(
                    lines.get(g, row_line),
                    f"{where}.{g}",
                    f"expected a word or phrase starting and ending with a letter or digit, got {term!r}",
                )
            key = _norm(term)
            if key in seen and seen[key][0] != g:
                other_g, other_i, other_line = seen[key]
                raise self._error(
                    lines.get(g, row_line),
                    f"{where}.{g}",
                    f"duplicate term {term!r}: already under group {other_g} in terms[{other_i}]"
                    f"{f' (line {other_line})' if other_line else ''}; a term belongs to one group",
                )
            seen.setdefault(key, (g, i, lines.get(g, row_line)))


def read_lexicon(path: Path) -> Lexicon:
    """Read and check a lexicon file; each mistake is one ConfigError naming file:line and field."""
    path = Path(path)
    data = read_yaml(path, what="lexicon file", hint="check the --lexicon path")
    loaded = load_record(LexiconFile, data, source=str(path))
    rows = loaded.check()
    description = loaded.description or ""
    return Lexicon(loaded.lexicon.strip(), loaded.version, list(loaded.groups), rows, path, str(description))


def load_lexicon(spec: str) -> Lexicon:
    return read_lexicon(resolve_lexicon(spec))


# ---------------------------------------------------------------------------
# stereotype pairs


@dataclass(frozen=True)
class Pair:
    """One stereotype pair: `more` is the more stereotypical sentence."""

    id: Text
    more: Text
    less: Text
    bias_type: Text
    direction: Literal["stereo", "antistereo"]
    where: Where = where_field()

    def __post_init__(self) -> None:
        if self.more == self.less:
            raise BadField("less", "the same sentence as `more`; swap the group words")

    @property
    def line(self) -> int:
        return self.where.line


def read_pairs(path: Path) -> list[Pair]:
    """Read and check a pairs file; each mistake is one ConfigError naming FILE:LINE and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"pairs file not found: {path} (check the --pairs path)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a pairs file is JSON lines") from None
    pairs: list[Pair] = []
    ids: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        obj = json_object_line(raw, f"{path}:{n}", "pair", ConfigError)
        pair = load_record(Pair, obj, source=str(path), line=n)
        if pair.id in ids:
            raise pair.where.error("id", f"{pair.id!r} already used on line {ids[pair.id]}; ids are unique")
        ids[pair.id] = n
        pairs.append(pair)
    if not pairs:
        raise ConfigError(
            f"{path}: no pairs; one JSON object per line with id, more, less, bias_type, direction"
        )
    return pairs


def load_pairs(spec: str) -> list[Pair]:
    return read_pairs(resolve_pairs(spec))
