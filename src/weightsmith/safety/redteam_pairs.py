"""Preference pairs from a red-team run, for DPO: refuse what was attacked, keep helping with
what only looked alarming.

From one configuration's scored attempts (the first one, the bare model, unless
`PairOptions.pairs_from` names another):

* an attack that succeeded (the detectors found the reply complied or leaked) gives a pair
  whose rejected answer is the model's reply and whose chosen answer is a refusal;
* a benign prompt the model answered (not a refusal) gives a pair whose chosen answer is the
  model's reply and whose rejected answer is a refusal, so the fork does not learn to refuse
  everything;
* everything else is skipped and counted: attacks the model resisted, benign prompts it
  refused (no helpful answer to prefer), empty replies, and benign pairs over
  `--benign-ratio`.

The prompt is the exact conversation the model was sent: the transformed probe text as chat
messages, with its system prompt. The refusal, in order of preference: the guarded model's
own reply to the same probe when `--judge` approved it (found no violation); the
`--refusal-text`; with `--guard`, the refusal the guard gave that probe, or the policy's
template for the probe's category; else one of the built-in `REFUSALS` for the probe's kind of
harm, picked by a hash of the probe id (deterministic).

Rows are TRL conversational preference rows with a ``meta`` record (source, kind, probe,
pack, transform, category, split, model, config, chosen_from); `weightsmith.preference_pairs`
writes them and ``NAME.meta.json``. Not here: running probes (redteam.py), the split
(split.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from weightsmith.config import did_you_mean, opt
from weightsmith.errors import UsageError
from weightsmith.preference_pairs import meta_path, pair_row, write_pairs
from weightsmith.safety.guarded import CONTENT_FILTER
from weightsmith.safety.split import DEFAULT_HELDOUT, probe_side

__all__ = ["REFUSALS", "PairOptions", "PairSet", "Refusals", "build_pairs", "pairs_for_run", "source_config"]

log = logging.getLogger(__name__)

#: Built-in refusals by kind of request; a probe gets one of its kind's, by a hash of its id.
REFUSALS: dict[str, tuple[str, ...]] = {
    "default": (
        "I can't help with that. It could cause real harm, so I won't provide it. If there is a "
        "safe, legitimate goal behind the question, tell me more and I'll gladly help with that.",
        "I'm not able to help with this request, because it could be used to hurt people. I'm happy "
        "to help with something else, or with a safer version of what you need.",
        "Sorry, I can't assist with that. If you're working on something related, such as research, "
        "safety or prevention, I can point you to general, responsible information instead.",
    ),
    "self_harm": (
        "I can't help with that, but I don't want you to face this alone. Please reach out to "
        "someone you trust, or contact a local crisis line or emergency number right now.",
        "I'm not able to give that information. It sounds like things may be really hard at the "
        "moment; talking to a crisis line, a doctor or someone close to you can help.",
    ),
    "secret": (
        "I can't share that. It is confidential information I've been asked to keep private.",
        "Sorry, I won't reveal hidden instructions, keys or other private details from my setup. "
        "Is there something else I can help you with?",
    ),
    "advice": (
        "I can't give specific advice on that. A qualified professional who knows your situation "
        "is the right person to ask; I can share general background if that helps.",
    ),
}
#: Hazard categories (MLCommons ids) with their own refusals; the rest use "default".
_CATEGORY_GROUP = {"S11": "self_harm", "S6": "advice"}


@dataclass(kw_only=True)
class PairOptions:
    """Preference pairs out of a run (the redteam command's flags, embedded flattened)."""

    pairs: str | None = opt(
        None, "write DPO preference pairs (TRL JSONL) from this run's replies to FILE", metavar="FILE"
    )
    pairs_from: str | None = opt(
        None,
        "the configuration whose replies feed the pairs (none: the first, the bare model)",
        metavar="NAME",
    )
    refusal_text: str | None = opt(
        None, "the refusal pairs prefer (none: the guard's, else built-in ones by kind of request)"
    )
    benign_ratio: float | None = opt(None, "at most this many benign pairs per attack pair")

    def __post_init__(self) -> None:
        if self.refusal_text is not None and not self.refusal_text.strip():
            raise UsageError("--refusal-text is empty; give the refusal text or leave the option out")
        if self.benign_ratio is not None and self.benign_ratio < 0:
            raise UsageError(f"--benign-ratio must be at least 0, got {self.benign_ratio}")
        for flag, value in (("--pairs-from", self.pairs_from), ("--refusal-text", self.refusal_text),
                            ("--benign-ratio", self.benign_ratio)):  # fmt: skip
            if value is not None and self.pairs is None:
                raise UsageError(f"{flag} shapes preference pairs; add --pairs FILE")


def _pick(key: str, options: Sequence[str]) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(options)]


@dataclass
class Refusals:
    """Where a pair's refusal comes from: `text`, else the `guard`, else `REFUSALS`."""

    text: str | None = None
    guard: Any = None

    def template(self, rec: dict) -> tuple[str, str]:
        """(refusal, origin) for the probe of transcript record `rec`."""
        if self.text is not None:
            return self.text, "refusal-text"
        if self.guard is not None and hasattr(self.guard, "refusal_for"):
            return self._from_policy(rec), "guard"
        if "leaked" in rec:  # a canary probe: a planted secret came out
            group = "secret"
        else:
            group = _CATEGORY_GROUP.get(str(rec.get("category")), "default")
        return _pick(rec["probe"], REFUSALS[group]), "builtin"

    def _from_policy(self, rec: dict) -> str:
        """The policy's refusal for a block rule of the probe's category, else its default."""
        category = rec.get("category") if rec.get("kind") == "attack" else None
        for direction in ("input", "output"):
            for rule in self.guard.rules(direction):
                if rule.action == "block" and category is not None and rule.category == category:
                    return self.guard.refusal_for(rule.refusal, category)
        return self.guard.refusal_for(None, category)


@dataclass
class PairSet:
    """The rows of a pairs file and what went into them."""

    rows: list[dict]
    counts: dict[str, int]  # pairs by kind: attack, benign
    skipped: dict[str, int]  # attempts that gave no pair, by reason
    chosen_from: dict[str, int] = field(default_factory=dict)  # attack pairs by refusal origin

    def summary(self) -> dict[str, Any]:
        return {"rows": len(self.rows), "counts": self.counts, "skipped": self.skipped,
                "chosen_from": self.chosen_from}  # fmt: skip


def _attack_chosen(rec: dict, guarded: dict | None, refusals: Refusals) -> tuple[str, str]:
    """(chosen answer, origin) for a successful attack."""
    if guarded is not None and guarded["reply"].strip():
        blocked = guarded.get("finish_reason") == CONTENT_FILTER  # the reply is the guard's refusal
        if not blocked and guarded.get("violation") is False:  # the model's own reply, judged safe
            return guarded["reply"], "judge-approved"
        if blocked and refusals.text is None:
            return guarded["reply"], "guard"
    return refusals.template(rec)


def _skip_reason(rec: dict) -> str:
    """Why an attempt gives no pair ("" when it gives one)."""
    if not rec["reply"].strip():
        return "empty reply"
    if rec["kind"] == "attack":
        return "" if rec.get("success") else "attack resisted"
    return "benign refused" if rec.get("over_refused") else ""


def build_pairs(
    records: Sequence[dict],
    *,
    guarded: Sequence[dict] = (),
    refusals: Refusals | None = None,
    model: str = "",
    heldout_fraction: float = DEFAULT_HELDOUT,
    benign_ratio: float | None = None,
) -> PairSet:
    """Pairs from one configuration's transcript `records`; `guarded` are the same probes'
    records behind the guard (for judge-approved or guard-given refusals)."""
    refusals = refusals or Refusals()
    behind = {r["probe"]: r for r in guarded}
    rows: list[dict] = []
    skipped: Counter[str] = Counter()
    origins: Counter[str] = Counter()
    for rec in records:
        reason = _skip_reason(rec)
        if reason:
            skipped[reason] += 1
            continue
        if rec["kind"] == "attack":
            chosen, origin = _attack_chosen(rec, behind.get(rec["probe"]), refusals)
            rejected = rec["reply"]
            origins[origin] += 1
        else:
            chosen, (rejected, origin) = rec["reply"], refusals.template(rec)
        meta = {
            "source": "redteam", "kind": rec["kind"], "probe": rec["probe"], "pack": rec["pack"],
            "transform": rec["transform"], "category": rec["category"],
            "split": probe_side(rec, heldout_fraction), "model": model, "config": rec.get("config"),
            "chosen_from": "model" if rec["kind"] == "benign" else origin,
        }  # fmt: skip
        rows.append(pair_row(rec["messages"], chosen, rejected, meta=meta))
    rows = _cap_benign(rows, benign_ratio, skipped)
    counts = Counter(r["meta"]["kind"] for r in rows)
    return PairSet(
        rows, {"attack": counts["attack"], "benign": counts["benign"]}, dict(skipped), dict(origins)
    )


def _cap_benign(rows: list[dict], ratio: float | None, skipped: Counter[str]) -> list[dict]:
    """At most `ratio` benign pairs per attack pair, kept by a hash of the probe id (stable)."""
    if ratio is None:
        return rows
    attack = sum(r["meta"]["kind"] == "attack" for r in rows)
    benign = [r["meta"]["probe"] for r in rows if r["meta"]["kind"] == "benign"]
    cap = int(ratio * attack)
    if len(benign) <= cap:
        return rows
    keep = set(sorted(benign, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[:cap])
    skipped["over benign ratio"] += len(benign) - cap
    return [r for r in rows if r["meta"]["kind"] == "attack" or r["meta"]["probe"] in keep]


def source_config(configs: Sequence[Any], name: str | None) -> tuple[Any, Any]:
    """(the configuration whose replies feed the pairs, the same target behind the guard or
    None); UsageError naming the choices when `name` is not a configuration."""
    labels = [c.label for c in configs]
    if name is not None and name not in labels:
        raise UsageError(
            f"--pairs-from {name!r} is not a configuration of this run{did_you_mean(name, labels)}; "
            f"choose one of: {', '.join(labels)}"
        )
    source = configs[labels.index(name)] if name is not None else configs[0]
    if source.guard is not None:
        return source, source
    guarded = next((c for c in configs if c.bare == source.label), None)
    return source, guarded


def pairs_for_run(
    opts: PairOptions,
    configs: Sequence[Any],
    per_config: dict[str, list[dict]],
    provenance: dict[str, Any],
    heldout_fraction: float = DEFAULT_HELDOUT,
) -> dict[str, Any]:
    """Build the pairs of a finished run and write them (with ``NAME.meta.json``) to
    `opts.pairs`; returns {"path", "meta", "rows", "counts", "skipped", "chosen_from", ...}."""
    assert opts.pairs is not None
    source, guarded = source_config(configs, opts.pairs_from)
    pairs = build_pairs(
        per_config[source.label],
        guarded=per_config[guarded.label] if guarded is not None else (),
        refusals=Refusals(opts.refusal_text, guarded.guard if guarded is not None else None),
        model=source.target.label,
        heldout_fraction=heldout_fraction,
        benign_ratio=opts.benign_ratio,
    )
    if not pairs.rows:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(pairs.skipped.items())) or "no attempts"
        log.warning("no probe produced a preference pair (%s); %s holds 0 pairs", why, opts.pairs)
    info = {
        "source": "redteam",
        "pairs_from": source.label,
        "model": source.target.label,
        "refusal": "text" if opts.refusal_text else ("policy" if guarded is not None else "builtin"),
        "benign_ratio": opts.benign_ratio,
        **pairs.summary(),
        **provenance,
    }
    del info["rows"]
    write_pairs(opts.pairs, pairs.rows, info)
    return {"path": str(opts.pairs), "meta": str(meta_path(opts.pairs)), "pairs_from": source.label,
            **pairs.summary()}  # fmt: skip
