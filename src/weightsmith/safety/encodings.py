"""Text encodings used by attacks, and the views a defender decodes them back into.

Red-team transforms hide a request in base64, rot13 or leetspeak; the leak detector and
guardrail rules must see through the same disguises. Both sides use these functions, so an
encoding the scanner can apply is one the detectors and policies can undo.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re

#: Leetspeak substitutions applied by `leetspeak` (letter -> digit or symbol).
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_UNLEET = {v: k for k, v in LEET.items()} | {"@": "a", "$": "s", "!": "i", "|": "l", "+": "t"}

# Runs that could be base64 of at least a few characters (padding optional).
_B64_RUN = re.compile(r"[A-Za-z0-9+/]{12,}={0,2}")


def b64encode(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def leetspeak(text: str) -> str:
    return "".join(LEET.get(c.lower(), c) for c in text)


def unleet(text: str) -> str:
    """Map leetspeak digits and symbols back to letters (only inside words with letters)."""

    def fix(match: re.Match[str]) -> str:
        word = match.group(0)
        if not any(c.isalpha() for c in word):
            return word  # a plain number stays a number
        return "".join(_UNLEET.get(c, c) for c in word)

    return re.sub(r"[\w@$!|+]+", fix, text)


def b64decode_runs(text: str) -> list[str]:
    """Every base64-looking run in `text` that decodes to mostly printable UTF-8 text."""
    out = []
    for run in _B64_RUN.findall(text):
        padded = run + "=" * (-len(run) % 4)
        try:
            raw = base64.b64decode(padded, validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            continue
        printable = sum(c.isprintable() or c.isspace() for c in decoded)
        if decoded and printable / len(decoded) >= 0.9:
            out.append(decoded)
    return out


def decoded_views(text: str) -> list[str]:
    """`text`, then its rot13, leetspeak-normalized and base64-decoded readings (deduplicated).

    A rule or detector that checks every view catches a request or a secret hidden by one
    layer of these encodings. rot13 of ordinary text is gibberish, so checking it costs
    nothing in false matches for keyword rules written in plain words.
    """
    views = [text, rot13(text), unleet(text), *b64decode_runs(text)]
    seen: set[str] = set()
    return [v for v in views if not (v in seen or seen.add(v))]
