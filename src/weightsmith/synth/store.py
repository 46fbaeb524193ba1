"""A synth run's work folder: what was kept and dropped so far, and where the run stands, so a
run killed at any point continues where its last finished step left off.

`OUT/work/kept.jsonl` and `OUT/work/dropped.jsonl` grow by one step's lines at a time
(appended and fsynced); `OUT/work/state.json` (written atomically after them) records the
step count, the funnel and each file's length at the end of the last finished step. On open,
each file is cut back to that length, so lines of a step that did not finish are dropped and
the step runs again from the same seeds: no duplicate and nothing lost.

Not here: what a step does (synth.pipeline), the final files (synth.output).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError
from weightsmith.files import fsync_dir, write_json_atomic

STATE_VERSION = 1


@dataclass
class State:
    step: int = 0
    cursor: dict[str, Any] = field(default_factory=dict)  # the recipe's place in its input
    funnel: dict[str, Any] = field(default_factory=lambda: {"candidates": 0, "kept": 0, "dropped": {}})
    sizes: dict[str, int] = field(default_factory=lambda: {"kept": 0, "dropped": 0})
    done: bool = False


class WorkStore:
    """The kept and dropped lines and the state of one run."""

    def __init__(self, out: Path) -> None:
        self.folder = out / "work"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths = {"kept": self.folder / "kept.jsonl", "dropped": self.folder / "dropped.jsonl"}
        self.state_path = self.folder / "state.json"
        self.state = self._load_state()
        for name, path in self.paths.items():
            size = self.state.sizes[name]
            if not path.exists():
                if size:
                    raise UsageError(f"{path} is missing but {self.state_path} says it held {size} bytes; "
                                     "start afresh with --overwrite")  # fmt: skip
                path.touch()
            elif path.stat().st_size < size:
                raise UsageError(
                    f"{path} is shorter than {self.state_path} says; start afresh with --overwrite"
                )
            with open(path, "r+b") as f:
                f.truncate(size)  # lines of a step that never finished
        self.kept = self._read("kept")
        self.dropped = self._read("dropped")

    def _load_state(self) -> State:
        if not self.state_path.exists():
            return State()
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            if data.pop("version", None) != STATE_VERSION:
                raise ValueError("another version")
            return State(**data)
        except (ValueError, TypeError) as e:
            raise UsageError(
                f"{self.state_path}: not a synth state file ({e}); start afresh with --overwrite"
            ) from None

    def _read(self, name: str) -> list[dict[str, Any]]:
        text = self.paths[name].read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def commit(
        self, kept: list[dict], dropped: list[dict], *, cursor: dict[str, Any], done: bool = False
    ) -> None:
        """Append one finished step's lines, then record it in the state (atomically)."""
        for name, rows in (("kept", kept), ("dropped", dropped)):
            if rows:
                with open(self.paths[name], "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                    f.flush()
                    os.fsync(f.fileno())
            self.state.sizes[name] = self.paths[name].stat().st_size
        fsync_dir(self.folder)
        self.kept.extend(kept)
        self.dropped.extend(dropped)
        funnel = self.state.funnel
        funnel["candidates"] += len(kept) + len(dropped)
        funnel["kept"] += len(kept)
        for row in dropped:
            funnel["dropped"][row["reason"]] = funnel["dropped"].get(row["reason"], 0) + 1
        self.state.step += 1
        self.state.cursor = cursor
        self.state.done = done
        write_json_atomic(self.state_path, {"version": STATE_VERSION, **self.state.__dict__})
