"""Arena battle files: battle logs in (read) and preference pairs out (written).

Battle logs are Chatbot Arena's battle format, one battle per JSON object, as JSON lines or
as one JSON list (the published ``clean_battle_*.json`` files)::

    {"question_id": "q1", "model_a": "m1", "model_b": "m2", "winner": "model_a",
     "conversation_a": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     "conversation_b": [...], "category": "greeting", "judge": "arena_user_7", "tstamp": 1.7e9}

``winner`` is ``model_a``, ``model_b``, ``tie`` or ``tie (bothbad)`` (``both_bad`` too). The
prompt is ``prompt`` (text or chat messages ending with a user turn) or, failing that, the
turns before the last answer of ``conversation_a`` when ``conversation_b`` has the same ones
(a multi-turn battle whose histories differ keeps no text: it still counts for ratings). The
answers are ``answer_a``/``answer_b`` or the last assistant turns of the conversations. The
id is ``id`` or ``question_id`` (else one derived from the line's content); a second line with
the same id and models is another vote on that battle. ``judge`` names the voter: in the
published logs that is an anonymised person (``arena_user_N``), so the vote's kind is
``import`` and the name its voter; with ``judges_are_models=True`` it is ``judge:NAME``. Keys
the published logs carry that ratings do not use (`IGNORED_KEYS`) are skipped; any other key
is a mistake. A shared log is untrusted: lines, records and the whole file are bounded, and
every problem is one line ``FILE:LINE: key: what is wrong; how to fix``.

Preference pairs are TRL's preference format in its conversational form, one JSON object a
line: ``{"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}],
"rejected": [...]}``. Beside ``NAME.jsonl`` goes ``NAME.meta.json``: the source's sha256, the
filters and the battle ids in row order, so a DPO run can say which votes it learned from.
For KTO the rows are unpaired instead (``{"prompt", "completion", "label"}``, two a battle).
Both files are written by `weightsmith.preference_pairs`, as the red-team's pairs are.

Not here: the records (records.py), storage, the command line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from weightsmith.arena.records import IMPORTED, Battle, Vote, judge_voter, voter_matches
from weightsmith.config.fields import BadValue, did_you_mean
from weightsmith.config.records import BadField, Where, load_record, where_field
from weightsmith.errors import ConfigError, UsageError
from weightsmith.files import json_object_line
from weightsmith.preference_pairs import (
    FORMAT,
    UNPAIRED_FORMAT,
    meta_path,
    pair_row,
    unpaired_row,
    write_pairs,
)

#: A log's winner -> the vote's choice.
WINNERS = {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "both_bad", "both_bad": "both_bad"}
#: Keys of the published battle logs that ratings and exports do not use.
IGNORED_KEYS = frozenset(
    "turn anony language openai_moderation toxic_chat_tag conv_metadata dedup_tag category_tag "
    "is_code timestamp evaluation_session_id evaluation_order full_conversation".split()
)
#: Bounds on an untrusted log (keyword arguments of `read_battle_log`).
MAX_LINE_BYTES = 1 << 20
MAX_RECORDS = 1_000_000
MAX_JSON_BYTES = 512 << 20
_MAX_NAME = 200
_ROLES = ("system", "user", "assistant")


def _model_name(value: str) -> None:
    if not value.strip():
        raise BadValue("expected a model name, got an empty string; name the model")
    if len(value) > _MAX_NAME or any(ord(ch) < 32 for ch in value):
        raise BadValue(f"a model name is one line of at most {_MAX_NAME} characters; shorten it")


@dataclass(frozen=True, kw_only=True)
class LogLine:
    """One battle of a battle log, as checked by `load_record` (see the module docstring)."""

    model_a: Annotated[str, _model_name]
    model_b: Annotated[str, _model_name]
    winner: str
    id: Any = None
    question_id: Any = None
    prompt: Any = None
    conversation_a: Any = None
    conversation_b: Any = None
    answer_a: str | None = None
    answer_b: str | None = None
    category: str | None = None
    judge: str | None = None
    tstamp: float | None = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        if self.model_a == self.model_b:
            raise BadField(
                "model_b",
                f"same as model_a ({self.model_a!r}); a battle needs two different models: fix or drop it",
            )
        if self.winner not in WINNERS:
            hint = did_you_mean(self.winner, list(WINNERS))
            raise BadField(
                "winner", f"unknown winner {self.winner!r}{hint}; write one of {', '.join(WINNERS)}"
            )
        for key in ("id", "question_id"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip()
            ):
                raise BadField(key, f"expected a string or number, got {value!r}; give the battle's id")
            if value is not None and len(str(value)) > _MAX_NAME:
                raise BadField(key, f"longer than {_MAX_NAME} characters; shorten the id")


def _messages(rec: LogLine, key: str, value: Any, last: str) -> list[dict]:
    """Chat messages of `key`, checked: role and content strings, the last turn's role `last`."""
    if isinstance(value, str) and key == "prompt":
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise rec.where.error(
            key, "expected a non-empty list of chat messages ({role, content}); fix the list"
        )
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or set(msg) - {"role", "content"} or not {"role", "content"} <= set(msg):
            raise rec.where.error(
                key, "expected a message {role: ..., content: ...}; give exactly those keys", i
            )
        if msg["role"] not in _ROLES:
            raise rec.where.error(key, f"role is {msg['role']!r}; write one of {', '.join(_ROLES)}", i)
        if not isinstance(msg["content"], str):
            raise rec.where.error(key, "content is not a string; write the message's text", i)
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != last:
        raise rec.where.error(key, f"the last message is {out[-1]['role']!r}; it should be the {last}'s turn")
    return out


def _text(rec: LogLine) -> tuple[list[dict] | None, str | None, str | None]:
    """(prompt, answer A, answer B) of a log line; Nones where the line carries no text."""
    prompt = None if rec.prompt is None else _messages(rec, "prompt", rec.prompt, "user")
    answers = [rec.answer_a, rec.answer_b]
    convs = [rec.conversation_a, rec.conversation_b]
    turns = [
        None if c is None else _messages(rec, k, c, "assistant")
        for k, c in zip(_CONV_KEYS, convs, strict=True)
    ]
    for i, conv in enumerate(turns):
        if conv is not None and answers[i] is None:
            answers[i] = conv[-1]["content"]
    if prompt is None and turns[0] is not None and turns[1] is not None and turns[0][:-1] == turns[1][:-1]:
        prompt = turns[0][:-1] if len(turns[0]) > 1 and turns[0][-2]["role"] == "user" else None
    if prompt is None or None in answers:
        return None, None, None
    return prompt, answers[0], answers[1]


_CONV_KEYS = ("conversation_a", "conversation_b")


def read_battle_log(
    path: str | Path,
    *,
    judges_are_models: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_records: int = MAX_RECORDS,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> list[tuple[Battle, Vote]]:
    """(battle, vote) pairs of a battle log (JSON lines or a JSON list); ConfigError naming
    FILE:LINE at the first bad line, before anything is returned."""
    path = Path(path)
    pairs: list[tuple[Battle, Vote]] = []
    seen: dict[str, tuple[Battle, int]] = {}
    for line, item, raw in _records(path, max_line_bytes, max_records, max_json_bytes):
        stripped = {k: v for k, v in item.items() if k not in IGNORED_KEYS}
        rec = load_record(LogLine, stripped, source=str(path), line=line)
        pairs.append(_pair(rec, raw, seen, judges_are_models))
    if not pairs:
        raise ConfigError(f"{path}:1: the log holds no battles; write one battle object per line")
    return pairs


def _pair(rec: LogLine, raw: bytes, seen: dict[str, tuple[Battle, int]], judges: bool) -> tuple[Battle, Vote]:
    key = "id" if rec.id is not None else "question_id"
    given = rec.id if rec.id is not None else rec.question_id
    battle_id = str(given) if given is not None else "log-" + hashlib.sha256(raw).hexdigest()[:16]
    if battle_id in seen:
        battle, first = seen[battle_id]
        if (battle.model_a, battle.model_b) != (rec.model_a, rec.model_b):
            raise rec.where.error(
                key,
                f"{battle_id!r} is already the battle {battle.model_a} vs {battle.model_b} on line {first}; "
                "give this battle its own id",
            )
    else:
        prompt, answer_a, answer_b = _text(rec)
        battle = Battle(battle_id, rec.model_a, rec.model_b, prompt, answer_a, answer_b, rec.category)
        seen[battle_id] = (battle, rec.where.line)
    kind = judge_voter(rec.judge) if judges and rec.judge else IMPORTED
    vote = Vote(battle_id, WINNERS[rec.winner], kind, rec.judge or "", rec.tstamp or 0.0)
    return battle, vote


def _records(path: Path, max_line: int, max_records: int, max_json: int) -> Iterator[tuple[int, dict, bytes]]:
    """(line, object, its bytes) of each record of a JSONL file or a JSON list, bounded."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
            f.seek(0)
            if head.startswith(b"["):
                yield from _json_list(path, f.read(max_json + 1), max_json, max_records)
            else:
                yield from _json_lines(path, f, max_line, max_records)
    except FileNotFoundError:
        raise UsageError(f"battle log not found: {path} (check the path)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder; give a .jsonl or .json battle log") from None
    except OSError as exc:
        raise UsageError(f"cannot read battle log {path}: {exc.strerror or exc}") from None


def _json_lines(path: Path, f: Any, max_line: int, max_records: int) -> Iterator[tuple[int, dict, bytes]]:
    count = 0
    for n in itertools.count(1):
        raw = f.readline(max_line + 2)
        if not raw:
            return
        body = raw.rstrip(b"\r\n")
        if n == 1:
            body = body.removeprefix(b"\xef\xbb\xbf")
        if len(body) > max_line:
            raise ConfigError(
                f"{path}:{n}: the line is longer than {max_line} bytes; shorten the battle "
                "(or raise the line limit if the log is trusted)"
            )
        if not body.strip():
            continue
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}:{n}: not UTF-8 text; save the log as UTF-8") from None
        count += 1
        _check_count(path, n, count, max_records)
        yield n, json_object_line(text, f"{path}:{n}", "battle", ConfigError), body


def _json_list(path: Path, data: bytes, max_json: int, max_records: int) -> Iterator[tuple[int, dict, bytes]]:
    if len(data) > max_json:
        raise ConfigError(
            f"{path}:1: the JSON list is larger than {max_json} bytes; write it as JSON lines "
            "(one battle a line), which is read a line at a time"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the log as UTF-8") from None
    decoder = json.JSONDecoder()
    pos, line, count = text.index("[") + 1, 1 + text.count("\n", 0, text.index("[")), 0
    while True:
        start = _skip_space(text, pos)
        line += text.count("\n", pos, start)
        if start < len(text) and text[start] == "]" and count == 0:
            return
        try:
            item, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); a battle log is "
                "a JSON list of battle objects"
            ) from None
        if not isinstance(item, dict):
            raise ConfigError(f"{path}:{line}: expected a JSON object (a battle), got {type(item).__name__}")
        count += 1
        _check_count(path, line, count, max_records)
        yield line, item, text[start:end].encode("utf-8")
        line += text.count("\n", start, end)
        pos = _skip_space(text, end)
        line += text.count("\n", end, pos)
        if pos < len(text) and text[pos] == "]":
            return
        if pos >= len(text) or text[pos] != ",":
            raise ConfigError(
                f"{path}:{line}: expected ',' or ']' after a battle; the JSON list is cut short"
            )
        pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _check_count(path: Path, line: int, count: int, max_records: int) -> None:
    if count > max_records:
        raise ConfigError(
            f"{path}:{line}: more than {max_records} battles; split the log "
            "(or raise the battle limit if the log is trusted)"
        )


# ---------------------------------------------------------------------------
# preference pairs out


@dataclass(frozen=True)
class ExportFilters:
    """Which battles become preference pairs. Ties never do; both-bad only as unpaired rows (no
    chosen answer)."""

    voters: tuple[str, ...] = ()  # voter kinds to count (``judge``: any judge); () counts all
    min_votes: int = 1  # counted votes a battle needs
    min_margin: float = 0.0  # the winner's share of the counted votes (ties included) it needs

    def __post_init__(self) -> None:
        if self.min_votes < 1:
            raise UsageError(f"min_votes must be at least 1, got {self.min_votes}")
        if not 0.0 <= self.min_margin <= 1.0:
            raise UsageError(f"min_margin is a share of the votes, between 0 and 1; got {self.min_margin}")

    def counts(self, vote: Vote) -> bool:
        return not self.voters or any(voter_matches(vote.voter_kind, v) for v in self.voters)


@dataclass
class Export:
    """What `export_preferences` wrote: paths, rows, and why other battles were left out."""

    path: str
    meta: str
    rows: int
    battle_ids: list[str]
    votes: int  # counted votes of the exported battles
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def majority(votes: list[Vote]) -> tuple[str | None, float]:
    """(the choice with the most votes, its share); (None, share) when two choices tie for most."""
    top = Counter(v.choice for v in votes).most_common()
    share = top[0][1] / len(votes)
    return (None, share) if len(top) > 1 and top[0][1] == top[1][1] else (top[0][0], share)


def preference_rows(
    battles: Iterable[Battle], votes: Iterable[Vote], filters: ExportFilters, *, unpaired: bool = False
) -> tuple[list[dict], list[str], int, dict[str, int]]:
    """(TRL rows, the battle id of each, counted votes, skipped battles by reason) of battles and
    votes. Pairs by default; `unpaired`, TRL's unpaired rows for KTO: a battle with a winner
    gives its answer as desirable and the other as undesirable, a both-bad verdict both answers
    as undesirable (the signal pairs cannot carry)."""
    by_battle: dict[str, list[Vote]] = {}
    for v in votes:
        if filters.counts(v):
            by_battle.setdefault(v.battle_id, []).append(v)
    rows, ids, used, skipped = [], [], 0, Counter()
    for battle in {b.id: b for b in battles}.values():
        counted = by_battle.get(battle.id, [])
        choice, share = majority(counted) if counted else (None, 0.0)
        reason = (
            "no counted votes" if not counted
            else "too few votes" if len(counted) < filters.min_votes
            else "no majority" if choice is None
            else "tie" if choice == "tie"
            else "both bad" if choice == "both_bad" and not unpaired
            else "margin too small" if share < filters.min_margin
            else "no prompt or answers" if not battle.prompt or battle.answer_a is None or battle.answer_b is None
            else ""
        )  # fmt: skip
        if reason:
            skipped[reason] += 1
            continue
        assert battle.answer_a is not None and battle.answer_b is not None
        win, lose = (
            (battle.answer_b, battle.answer_a) if choice == "b" else (battle.answer_a, battle.answer_b)
        )
        if not unpaired:
            rows.append(pair_row(battle.prompt, win, lose))
        else:
            good = choice != "both_bad"
            rows += [unpaired_row(battle.prompt, win, good), unpaired_row(battle.prompt, lose, False)]
        ids += [battle.id] * (2 if unpaired else 1)
        used += len(counted)
    return rows, ids, used, dict(skipped)


def export_preferences(
    path: str | Path,
    battles: Iterable[Battle],
    votes: Iterable[Vote],
    *,
    source_sha256: str,
    source: str = "",
    filters: ExportFilters | None = None,
    unpaired: bool = False,
) -> Export:
    """Write TRL preference pairs (`unpaired`: TRL's unpaired rows for KTO, see
    `preference_rows`) to `path` and their provenance to ``NAME.meta.json``.

    Everything is checked and built before either file is touched; each is written
    atomically, the pairs first, and the meta file records the pairs file's sha256, so a
    meta file that does not match its pairs (a crash between the two renames) is detected."""
    filters = filters or ExportFilters()
    path = Path(path)
    meta = meta_path(path)
    if len(source_sha256) != 64 or any(c not in "0123456789abcdef" for c in source_sha256):
        raise UsageError(f"source_sha256 must be 64 lowercase hex digits, got {source_sha256!r}")
    rows, ids, used, skipped = preference_rows(battles, votes, filters, unpaired=unpaired)
    if not rows:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no battles"
        raise UsageError(f"no battle passes the filters ({why}); relax the filters or collect more votes")
    write_pairs(
        path,
        rows,
        {
            "source": {"path": source, "sha256": source_sha256},
            "filters": {
                **asdict(filters),
                "voters": list(filters.voters),
                "ties": "excluded",
                "both_bad": "both answers undesirable" if unpaired else "excluded",
            },
            "votes": used,
            "skipped": skipped,
            "battle_ids": ids,  # row i comes from battle_ids[i]
        },
        row_format=UNPAIRED_FORMAT if unpaired else FORMAT,
    )
    return Export(str(path), str(meta), len(rows), ids, used, skipped)
