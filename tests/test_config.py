"""weightsmith.config.records: files users write as records, with one FILE:LINE: key: error line.

Tagged unions on `type:`, lists and mappings of records with the line of each item, values
that keep their YAML type, `Annotated` checks, `BadField` from `__post_init__` and the
`Where` a format's `check()` step uses."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import pytest

from weightsmith.config import BadValue, read_yaml
from weightsmith.config.records import BadField, Where, load_record, nonempty, where_field
from weightsmith.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Words:
    type: Literal["words"]
    words: Annotated[list[Annotated[str, nonempty]], nonempty]
    where: Where = where_field()


@dataclass(frozen=True, kw_only=True)
class Pattern:
    key_notes: ClassVar[dict[str, str]] = {"note": "patterns take no note"}

    type: Literal["pattern", "regex"]
    pattern: str
    flags: int = 0
    where: Where = where_field()

    def __post_init__(self) -> None:
        if self.pattern == "":
            raise BadField("pattern", "matches everything")


def _even(value: int) -> None:
    if value % 2:
        raise BadValue(f"expected an even number, got {value}")


@dataclass(kw_only=True)
class Doc:
    name: str
    size: Annotated[int, _even] = 2
    flag: bool = False
    rules: list[Words | Pattern] = field(default_factory=list, metadata={"noun": "rule", "null": "default"})
    texts: dict[str, Annotated[str, nonempty]] = field(default_factory=dict)
    note: str | None = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        if "bad" in self.texts:
            raise BadField("texts", "no entry may be called bad", sub="bad")


def load(tmp_path: Path, text: str) -> Doc:
    path = tmp_path / "doc.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_record(Doc, read_yaml(path), source=str(path))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message.split("doc.yaml:", 1)[1]


def test_a_good_file_loads_with_its_lines(tmp_path):
    doc = load(
        tmp_path,
        """\
        name: d
        rules:
          - type: words
            words: [a, b]
          - type: regex
            pattern: x+
        texts:
          hello: world
        """,
    )
    assert doc.name == "d" and doc.size == 2 and doc.note is None
    words, pattern = doc.rules
    assert isinstance(words, Words) and words.words == ["a", "b"]
    assert isinstance(pattern, Pattern) and pattern.type == "regex" and pattern.pattern == "x+"
    assert words.where.line == 3 and pattern.where.line == 5 and pattern.where.label == "rules[1]"
    assert doc.where.at("texts", "hello") == (8, "texts.hello")
    assert doc.where.at("rules", 1) == (5, "rules[1]")
    assert doc.texts == {"hello": "world"} and doc.where.given == {"name", "rules", "texts"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: d\nnmae: x\n", "2: nmae: unknown key (did you mean 'name'?)"),
        ("size: 4\n", "1: name: required but missing"),
        ("name: 1.10\n", "1: name: expected a string, got 1.1 (in YAML, quote it)"),
        ("name: d\nsize: '4'\n", "2: size: expected an integer, got '4'"),
        ("name: d\nsize: 3\n", "2: size: expected an even number, got 3"),
        ("name: d\nflag: 'yes'\n", "2: flag: expected true or false, got 'yes'"),
        ("name: d\nrules: {type: words}\n", "2: rules: expected a list of rules, got"),
        (
            "name: d\nrules:\n  - type: word\n",
            "3: rules[0].type: unknown rule type 'word' (did you mean 'words'?)",
        ),
        (
            "name: d\nrules:\n  - words: [a]\n",
            "3: rules[0].type: required but missing; one of words, pattern, regex",
        ),
        (
            "name: d\nrules:\n  - type: words\n    words: [a]\n    pattern: x\n",
            "5: rules[0].pattern: not a key of a words rule (it belongs to type: pattern)",
        ),
        (
            "name: d\nrules:\n  - type: regex\n    pattern: x\n    note: y\n",
            "5: rules[0].note: patterns take no note",
        ),
        (
            "name: d\nrules:\n  - type: words\n    words:\n      - a\n      - ''\n",
            "6: rules[0].words[1]: expected a non-empty",
        ),
        ("name: d\nrules:\n  - type: words\n    words: []\n", "4: rules[0].words: expected a non-empty list"),
        ("name: d\nrules:\n  - type: regex\n    pattern: ''\n", "4: rules[0].pattern: matches everything"),
        ("name: d\ntexts:\n  ok: fine\n  bad: x\n", "4: texts.bad: no entry may be called bad"),
        ("name: d\ntexts:\n  empty: ''\n", "3: texts.empty: expected a non-empty string"),
        ("- a\n", "1: expected a mapping (name:, size:, flag: ...), got ['a']"),
    ],
)
def test_every_mistake_is_one_line_naming_line_and_key(tmp_path, text, expected):
    assert error(tmp_path, text).startswith(expected), error(tmp_path, text)


def test_null_keeps_the_default_only_where_declared(tmp_path):
    assert load(tmp_path, "name: d\nrules:\n").rules == []
    assert error(tmp_path, "name: d\ntexts:\n").startswith("2: texts: expected a mapping")
    assert load(tmp_path, "name: d\nnote:\n").note is None


def test_where_error_names_a_key_of_a_loaded_record(tmp_path):
    doc = load(tmp_path, "name: d\nrules:\n  - type: words\n    words:\n      - a\n      - b\n")
    message = str(doc.rules[0].where.error("words", "is not allowed here", sub=1))
    assert message == f"{tmp_path / 'doc.yaml'}:6: rules[0].words[1]: is not allowed here"


def test_json_lines_have_one_line_per_record():
    with pytest.raises(ConfigError, match=r"^p\.jsonl:7: size: expected an integer, got '4'$"):
        load_record(Doc, {"name": "d", "size": "4"}, source="p.jsonl", line=7)
    doc = load_record(Doc, {"name": "d"}, source="p.jsonl", line=7)
    assert doc.where.line == 7 and doc.where.given == {"name"}


@dataclass
class NoTag:
    x: int = 0


@dataclass
class Holder:
    items: list[Words | NoTag]


def test_bad_record_classes_fail_loudly():
    with pytest.raises(TypeError, match="needs a field type: Literal"):
        load_record(Holder, {"items": [{"type": "words", "words": ["a"]}]}, source="x")


@dataclass(kw_only=True)
class Settings:
    model: str | None = field(default=None, metadata={"null": "refuse"})


def test_null_can_be_refused_for_an_optional_field():
    assert load_record(Settings, {}, source="s.yaml").model is None
    with pytest.raises(ConfigError, match=r"^s\.yaml:1: model: expected a value, got null"):
        load_record(Settings, {"model": None}, source="s.yaml")


def test_a_key_named_where_is_unknown(tmp_path):
    text = "name: d\nrules:\n  - type: words\n    words: [a]\n    where: x\n"
    assert error(tmp_path, text).startswith("5: rules[0].where: unknown key"), error(tmp_path, text)
