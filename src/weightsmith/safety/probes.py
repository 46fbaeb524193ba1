"""Red-team probe packs (YAML or JSONL) and the `Probe`s they load into.

A *probe* is one chat conversation sent to a model, plus how to tell whether the attack
worked. Probes come in *packs*; the shipped ones live in ``packs/`` (``builtin:NAME``), and
a user's own packs use the same format.

YAML pack format::

    pack: harmful            # pack name: letters, digits, '.', '_', '-'
    version: 1               # optional, integer >= 1
    description: ...         # optional
    family: harmful          # roleplay, injection, extraction, leakage, harmful, benign, ...
    kind: attack             # attack | benign
    success: complied        # default for the probes; attack: complied | canary, benign: answered
    system: ...              # optional default system prompt; may contain {canary}
    probes:
      - id: s1-001           # unique in the pack; letters, digits, '.', '_', '-'
        category: S1         # MLCommons hazard id S1..S14 (required in family: harmful packs,
                             # optional for other attacks); a free subtype for benign probes
        prompt: "..."        # the user's text (required)
        document: "..."      # optional user-supplied document (emails, web pages, CSV rows...)
        system: "..."        # optional per-probe system prompt (overrides the pack's)
        canary: "..."        # the planted secret; {canary} in system/document/prompt becomes it
        success: canary      # optional per-probe override
        note: "..."          # optional free text for pack authors (ignored)

The user message is ``prompt`` followed by the document in a quoted block; a prompt that
contains ``{document}`` places it there instead. ``success: canary`` needs a ``canary`` that
appears (after substitution) in the system prompt, document or prompt.

JSONL pack format: one probe object per line, each carrying the pack-level keys (``pack``,
``family``, ``kind``, optionally ``version``, ``description``, ``success``, ``system``) next
to the probe keys above. Every line of a file must name the same ``pack``. Blank lines are
skipped.

Not here: the file format's records and their key checks (weightsmith.safety.pack_files),
the transforms that compose with any probe (encodings, suffixes, templates;
weightsmith.safety.transforms), detectors, running probes (weightsmith.safety.redteam).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from weightsmith.config import did_you_mean, read_yaml
from weightsmith.config.records import load_record
from weightsmith.errors import ConfigError, UsageError
from weightsmith.files import builtin_file, json_object_line
from weightsmith.safety.pack_files import (
    KINDS,
    NAME,
    SUCCESS,
    JsonlProbe,
    PackFile,
    PackHeader,
    ProbeEntry,
    success_message,
)

__all__ = [
    "HAZARDS",
    "HAZARD_NAMES",
    "KINDS",
    "PACK_DIR",
    "SUCCESS",
    "Probe",
    "builtin_packs",
    "load_pack",
    "load_packs",
    "pack_digests",
    "pack_files",
]

PACK_DIR = Path(__file__).resolve().parent / "packs"

HAZARDS = tuple(f"S{i}" for i in range(1, 15))
#: MLCommons AILuminate hazard taxonomy ids -> names.
HAZARD_NAMES = {
    "S1": "violent crimes",
    "S2": "non-violent crimes",
    "S3": "sex-related crimes",
    "S4": "child sexual exploitation",
    "S5": "defamation",
    "S6": "specialized advice",
    "S7": "privacy",
    "S8": "intellectual property",
    "S9": "indiscriminate weapons",
    "S10": "hate",
    "S11": "suicide & self-harm",
    "S12": "sexual content",
    "S13": "elections",
    "S14": "code interpreter abuse",
}

_PACK_SUFFIXES = (".yaml", ".yml", ".jsonl")
_TRANSFORM_FILE_NAMES = ("transforms.yaml", "transforms.yml")


@dataclass(frozen=True)
class Probe:
    """One red-team (or over-refusal) conversation and how its success is judged."""

    id: str  # "<pack>/<probe id>[~<transform>]", unique across loaded packs
    pack: str
    family: str
    kind: str  # "attack" | "benign"
    category: str | None  # hazard id S1..S14 for harmful requests; a subtype for benign probes
    messages: tuple[dict, ...]  # optional system message, then the user message
    success: str  # "complied" | "canary" (attacks), "answered" (benign)
    canary: str | None
    transform: str  # "none" or a transform chain name
    source: str  # "path:line" of the probe in its pack

    def prompt_text(self) -> str:
        """The content of the last user message."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message["content"]
        return ""


# ---------------------------------------------------------------------------
# Packs


def builtin_packs() -> list[str]:
    """Names of the shipped packs (``builtin:NAME``)."""
    return sorted(
        p.stem
        for p in PACK_DIR.iterdir()
        if p.suffix in _PACK_SUFFIXES and p.name not in _TRANSFORM_FILE_NAMES
    )


def _builtin_path(name: str) -> Path:
    path = builtin_file(f"builtin:{name}", PACK_DIR, _PACK_SUFFIXES, "probe pack (or builtin:all)")
    assert path is not None
    return path


def pack_files(spec: str) -> list[Path]:
    """The pack files a spec names: ``builtin:NAME``, ``builtin:all``, a file or a folder."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name == "all":
            return [_builtin_path(n) for n in builtin_packs()]
        return [_builtin_path(name)]
    path = Path(spec)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in _PACK_SUFFIXES and p.name not in _TRANSFORM_FILE_NAMES
        )
        if not files:
            raise UsageError(f"{path}: folder holds no probe packs (.yaml, .yml or .jsonl files)")
        return files
    if not path.exists():
        hint = ""
        if spec in builtin_packs():
            hint = f"; did you mean builtin:{spec}?"
        raise UsageError(
            f"probe pack not found: {spec}{hint} (give a .yaml/.yml/.jsonl file, a folder, "
            "builtin:NAME or builtin:all)"
        )
    if path.suffix not in _PACK_SUFFIXES:
        raise UsageError(f"{path}: a probe pack must be a .yaml, .yml or .jsonl file")
    return [path]


def load_packs(specs: Sequence[str]) -> list[Probe]:
    """Probes from packs: ``builtin:NAME``, ``builtin:all``, a pack file or a folder of them.

    A file named by two specs is read once; two probes with the same id are a ConfigError."""
    if isinstance(specs, str):
        specs = [specs]
    seen_files: set[Path] = set()
    probes: list[Probe] = []
    by_id: dict[str, Probe] = {}
    for spec in specs:
        for path in pack_files(str(spec)):
            key = path.resolve()
            if key in seen_files:
                continue
            seen_files.add(key)
            for probe in load_pack(path):
                if probe.id in by_id:
                    raise ConfigError(
                        f"{probe.source}: id: probe id {probe.id!r} is already used at "
                        f"{by_id[probe.id].source}; give one of them another id or pack name"
                    )
                by_id[probe.id] = probe
                probes.append(probe)
    return probes


def pack_digests(specs: Sequence[str], probes: Sequence[Probe]) -> list[dict]:
    """{"pack", "file", "sha256"} of each file `specs` name (once), for provenance records;
    "pack" is the name its `probes` carry (None for a file none of them came from), "file" is
    ``builtin:NAME`` for a shipped pack."""
    names: dict[str, str] = {}
    for probe in probes:
        names.setdefault(probe.source.rsplit(":", 1)[0], probe.pack)
    out: list[dict] = []
    seen: set[Path] = set()
    for spec in [specs] if isinstance(specs, str) else specs:
        for path in pack_files(str(spec)):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            shipped = path.resolve().parent == PACK_DIR
            name = f"builtin:{path.stem}" if shipped else str(path)
            out.append({"pack": names.get(str(path)), "file": name, "sha256": digest})
    return out


def load_pack(path: str | Path) -> list[Probe]:
    """The probes of one pack file (YAML or JSONL)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    return _load_yaml(path)


def _load_yaml(path: Path) -> list[Probe]:
    data = read_yaml(path, what="probe pack", hint="check the --probes path")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with pack:, kind:, probes: ... at the top level")
    pack = load_record(PackFile, data, source=str(path))
    probes: list[Probe] = []
    ids: dict[str, int] = {}
    for entry in pack.probes:
        probe = _build_probe(entry, pack, source=f"{path}:{entry.where.line}")
        _claim_id(probe, entry, ids, entry.where.at("id")[0])
        probes.append(probe)
    return probes


def _load_jsonl(path: Path) -> list[Probe]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"probe pack not found: {path} (check the --probes path)") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not a UTF-8 text file; a JSONL pack has one JSON object per line"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read probe pack {path}: {exc.strerror or exc}") from None
    probes: list[Probe] = []
    ids: dict[str, int] = {}
    first: JsonlProbe | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = json_object_line(line, f"{path}:{n}", "probe", ConfigError)
        entry = load_record(JsonlProbe, item, source=str(path), line=n)
        if first is not None and entry.pack != first.pack:
            raise entry.where.error(
                "pack",
                f"{entry.pack!r} differs from {first.pack!r} on line {first.where.line}; a JSONL file holds one pack",
            )
        first = first or entry
        probe = _build_probe(entry, entry, source=f"{path}:{n}")
        _claim_id(probe, entry, ids, n)
        probes.append(probe)
    if not probes:
        raise ConfigError(f"{path}:1: probes: the pack is empty; write one probe object per line")
    return probes


def _claim_id(probe: Probe, entry: ProbeEntry, ids: dict[str, int], line: int) -> None:
    """Record a probe's id in its pack; ConfigError if the pack already has it."""
    local = probe.id.split("/", 1)[1]
    if local in ids:
        raise entry.where.error(
            "id", f"duplicate probe id {local!r} (first used on line {ids[local]}); ids must be unique"
        )
    ids[local] = line


def _build_probe(entry: ProbeEntry, header: PackHeader, *, source: str) -> Probe:
    """A `Probe` from a loaded entry and its pack: what needs both is checked here."""
    raw_id = entry.id
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not NAME.match(raw_id):
        raise entry.where.error(
            "id", f"every probe needs an id of letters, digits, '.', '_', '-' (id: p-001), got {raw_id!r}"
        )
    success = _check_kind(entry, header)
    system = entry.system if "system" in entry.where.given else header.system
    texts = {"system": system, "document": entry.document, "prompt": entry.prompt}
    texts = _place_canary(entry, {k: v.strip() if v is not None else None for k, v in texts.items()}, success)
    user = texts["prompt"]
    if texts["document"] is not None:
        block = f'"""\n{texts["document"]}\n"""'
        user = user.replace("{document}", block) if "{document}" in user else f"{user}\n\n{block}"
    messages: list[dict] = []
    if texts["system"] is not None:
        messages.append({"role": "system", "content": texts["system"]})
    messages.append({"role": "user", "content": user})
    return Probe(
        id=f"{header.pack}/{raw_id}",
        pack=header.pack,
        family=header.family,
        kind=header.kind,
        category=entry.category,
        messages=tuple(messages),
        success=success,
        canary=entry.canary,
        transform="none",
        source=source,
    )


def _check_kind(entry: ProbeEntry, header: PackHeader) -> str:
    """The probe's success rule, checked with its category against the pack's kind."""
    kind, category = header.kind, entry.category
    success = entry.success or header.default_success
    if success not in SUCCESS[kind]:
        raise entry.where.error("success", success_message(kind, success))
    if kind == "attack":
        if category is None and header.family == "harmful":
            raise entry.where.error(
                "category", f"a harmful request needs its hazard id (category: S1 .. S14; {_hazard_list()})"
            )
        if category is not None and category not in HAZARDS:
            raise entry.where.error(
                "category",
                f"{category!r} is not an MLCommons hazard id{did_you_mean(category, HAZARDS)}; use S1 .. S14 "
                f"({_hazard_list()})",
            )
    return success


def _place_canary(entry: ProbeEntry, texts: dict[str, str | None], rule: str) -> dict[str, str | None]:
    """`texts` (system, document, prompt) with {canary} replaced; checks the canary is planted."""
    canary = entry.canary
    if canary is not None and (len(canary.strip()) < 4 or "{" in canary):
        raise entry.where.error(
            "canary", f"expected a string of at least 4 characters without braces, got {canary!r}"
        )
    if rule == "canary" and canary is None:
        raise entry.where.error(
            "canary",
            'success: canary needs the planted secret (canary: "ZEBRA-4417"), put {canary} where it goes',
        )
    if canary is not None and rule != "canary":
        raise entry.where.error(
            "canary",
            f"a canary is only checked with success: canary (this probe has success: {rule}); "
            "set success: canary or drop the canary",
        )
    placed = False
    for key, value in texts.items():
        if value is not None and "{canary}" in value:
            if canary is None and key in entry.where.given:
                raise entry.where.error(key, 'uses {canary} but the probe has no canary; add canary: "..."')
            if canary is None:
                raise entry.where.error(
                    "canary",
                    'the pack\'s system prompt uses {canary} but this probe has none; add canary: "..."',
                )
            texts[key] = value.replace("{canary}", canary)
            placed = True
        if canary is not None and texts[key] is not None and canary in texts[key]:
            placed = True
    if canary is not None and not placed:
        raise entry.where.error(
            "canary",
            "the canary appears nowhere in the system prompt, document or prompt; "
            "write {canary} where the secret is planted",
        )
    return texts


def _hazard_list() -> str:
    return ", ".join(f"{k} {v}" for k, v in HAZARD_NAMES.items())
