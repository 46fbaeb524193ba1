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

Not here: the transforms that compose with any probe (encodings, suffixes, templates;
weightsmith.safety.transforms), detectors, running probes (weightsmith.safety.redteam).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import read_yaml
from weightsmith.errors import ConfigError, UsageError
from weightsmith.files import builtin_file, json_object_line

PACK_DIR = Path(__file__).resolve().parent / "packs"

KINDS = ("attack", "benign")
SUCCESS = {"attack": ("complied", "canary"), "benign": ("answered",)}
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

_PACK_KEYS = ("pack", "version", "description", "family", "kind", "success", "system", "probes")
_PROBE_KEYS = ("id", "category", "prompt", "document", "system", "canary", "success", "note")
_JSONL_KEYS = tuple(k for k in _PACK_KEYS if k != "probes") + _PROBE_KEYS
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
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


def _hint(value: Any, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


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


def _pack_files(spec: str) -> list[Path]:
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
        for path in _pack_files(str(spec)):
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


def load_pack(path: str | Path) -> list[Probe]:
    """The probes of one pack file (YAML or JSONL)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    return _load_yaml(path)


def _lines(data: Any) -> dict[str, int]:
    return dict(getattr(data, "key_lines", {}))


def _load_yaml(path: Path) -> list[Probe]:
    data = read_yaml(path, what="probe pack", hint="check the --probes path")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with pack:, kind:, probes: ... at the top level")
    lines = _lines(data)

    def err(key: str, msg: str) -> ConfigError:
        line = lines.get(key.split("[")[0].split(".")[0], 1)
        return ConfigError(f"{path}:{line}: {key}: {msg}")

    for key in data:
        if key not in _PACK_KEYS:
            raise err(
                str(key), f"unknown pack key{_hint(key, _PACK_KEYS)} (pack keys: {', '.join(_PACK_KEYS)})"
            )
    header = _read_header(data, err)
    raw = data.get("probes")
    if not isinstance(raw, list) or not raw:
        raise err("probes", "a pack needs a non-empty list of probes (probes: [{id: ..., prompt: ...}, ...])")
    probes: list[Probe] = []
    ids: dict[str, int] = {}
    for i, item in enumerate(raw):
        field = f"probes[{i}]"
        if not isinstance(item, dict):
            raise err(field, f"each probe must be a mapping with id: and prompt:, got {type(item).__name__}")
        item_lines = _lines(item)
        first = min(item_lines.values(), default=lines.get("probes", 1))

        def probe_err(
            key: str | None, msg: str, item_lines=item_lines, first=first, field=field
        ) -> ConfigError:
            line = item_lines.get(key, first) if key else first
            name = f"{field}.{key}" if key else field
            return ConfigError(f"{path}:{line}: {name}: {msg}")

        probe = _read_probe(item, header, probe_err, source=f"{path}:{first}", keys=_PROBE_KEYS)
        local = probe.id.split("/", 1)[1]
        if local in ids:
            raise probe_err(
                "id", f"duplicate probe id {local!r} (first used on line {ids[local]}); ids must be unique"
            )
        ids[local] = item_lines.get("id", first)
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
    pack_name: tuple[str, int] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = json_object_line(line, f"{path}:{n}", "probe", ConfigError)

        def err(key: str | None, msg: str, n: int = n) -> ConfigError:
            return ConfigError(f"{path}:{n}: {key}: {msg}" if key else f"{path}:{n}: {msg}")

        for key in item:
            if key not in _JSONL_KEYS:
                raise err(str(key), f"unknown key{_hint(key, _JSONL_KEYS)} (keys: {', '.join(_JSONL_KEYS)})")
        header = _read_header(item, err)
        if pack_name is not None and header["pack"] != pack_name[0]:
            raise err(
                "pack",
                f"{header['pack']!r} differs from {pack_name[0]!r} on line {pack_name[1]}; "
                "a JSONL file holds one pack",
            )
        pack_name = pack_name or (header["pack"], n)
        probe = _read_probe(item, header, err, source=f"{path}:{n}", keys=_JSONL_KEYS)
        local = probe.id.split("/", 1)[1]
        if local in ids:
            raise err(
                "id", f"duplicate probe id {local!r} (first used on line {ids[local]}); ids must be unique"
            )
        ids[local] = n
        probes.append(probe)
    if not probes:
        raise ConfigError(f"{path}:1: probes: the pack is empty; write one probe object per line")
    return probes


def _text(data: dict, key: str, err, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise err(key, f'missing {key}: every probe needs one ({key}: "...")')
        return None
    if not isinstance(value, str) or not value.strip():
        raise err(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _read_header(data: dict, err) -> dict[str, Any]:
    """The pack-level keys, checked: pack, family, kind, success, system."""
    pack = data.get("pack")
    if not isinstance(pack, str) or not _NAME.match(pack):
        raise err(
            "pack", f"every pack needs a name of letters, digits, '.', '_', '-' (pack: my-pack), got {pack!r}"
        )
    family = data.get("family")
    if not isinstance(family, str) or not _NAME.match(family):
        raise err("family", f"expected a family name such as harmful, injection or benign, got {family!r}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise err("kind", f"expected attack or benign, got {kind!r}{_hint(kind, KINDS)}")
    success = data.get("success", SUCCESS[kind][0])
    if success not in SUCCESS[kind]:
        raise err("success", _success_msg(kind, success))
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise err("version", f"expected an integer >= 1, got {version!r}")
    if "description" in data and not isinstance(data["description"], str):
        raise err("description", f"expected a string, got {data['description']!r}")
    return {
        "pack": pack,
        "family": family,
        "kind": kind,
        "success": success,
        "system": _text(data, "system", err),
    }


def _success_msg(kind: str, success: Any) -> str:
    allowed = SUCCESS[kind]
    return (
        f"a{'n' if kind == 'attack' else ''} {kind} probe's success is {' or '.join(allowed)}, got {success!r}"
        + (_hint(success, allowed) if isinstance(success, str) else "")
    )


def _read_probe(item: dict, header: dict, err, *, source: str, keys: Sequence[str]) -> Probe:
    for key in item:
        if key not in keys:
            raise err(str(key), f"unknown probe key{_hint(key, keys)} (probe keys: {', '.join(_PROBE_KEYS)})")
    raw_id = item.get("id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not _NAME.match(raw_id):
        raise err(
            "id", f"every probe needs an id of letters, digits, '.', '_', '-' (id: p-001), got {raw_id!r}"
        )
    kind = header["kind"]
    success = item.get("success", header["success"])
    if success not in SUCCESS[kind]:
        raise err("success", _success_msg(kind, success))
    category = item.get("category")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        raise err("category", f"expected a string, got {category!r}")
    if kind == "attack":
        if category is None and header["family"] == "harmful":
            raise err(
                "category", f"a harmful request needs its hazard id (category: S1 .. S14; {_hazard_list()})"
            )
        if category is not None and category not in HAZARDS:
            raise err(
                "category",
                f"{category!r} is not an MLCommons hazard id{_hint(category, HAZARDS)}; use S1 .. S14 "
                f"({_hazard_list()})",
            )
    prompt = _text(item, "prompt", err, required=True)
    document = _text(item, "document", err)
    system = _text(item, "system", err) if "system" in item else header["system"]
    canary = item.get("canary")
    if canary is not None and (not isinstance(canary, str) or len(canary.strip()) < 4 or "{" in canary):
        raise err("canary", f"expected a string of at least 4 characters without braces, got {canary!r}")
    if success == "canary" and canary is None:
        raise err(
            "canary",
            'success: canary needs the planted secret (canary: "ZEBRA-4417"), put {canary} where it goes',
        )
    if canary is not None and success != "canary":
        raise err(
            "canary",
            f"a canary is only checked with success: canary (this probe has success: {success}); "
            "set success: canary or drop the canary",
        )
    placed = False
    texts = {"system": system, "document": document, "prompt": prompt}
    for key, value in texts.items():
        if value is not None and "{canary}" in value:
            if canary is None and key in item:
                raise err(key, 'uses {canary} but the probe has no canary; add canary: "..."')
            if canary is None:
                raise err(
                    "canary",
                    'the pack\'s system prompt uses {canary} but this probe has none; add canary: "..."',
                )
            texts[key] = value.replace("{canary}", canary)
            placed = True
        if canary is not None and texts[key] is not None and canary in texts[key]:
            placed = True
    if canary is not None and not placed:
        raise err(
            "canary",
            "the canary appears nowhere in the system prompt, document or prompt; "
            "write {canary} where the secret is planted",
        )
    user = texts["prompt"]
    if texts["document"] is not None:
        block = f'"""\n{texts["document"]}\n"""'
        user = user.replace("{document}", block) if "{document}" in user else f"{user}\n\n{block}"
    messages: list[dict] = []
    if texts["system"] is not None:
        messages.append({"role": "system", "content": texts["system"]})
    messages.append({"role": "user", "content": user})
    return Probe(
        id=f"{header['pack']}/{raw_id}",
        pack=header["pack"],
        family=header["family"],
        kind=kind,
        category=category,
        messages=tuple(messages),
        success=success,
        canary=canary,
        transform="none",
        source=source,
    )


def _hazard_list() -> str:
    return ", ".join(f"{k} {v}" for k, v in HAZARD_NAMES.items())
