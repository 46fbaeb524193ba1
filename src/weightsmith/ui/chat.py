"""Chat with a model or a fork from the UI: what can be chosen, one loaded model, streamed replies.

A chat target is a store model (`store:NAME`) or a model inside the workspace (`path:REL`): a
checkpoint folder, a GGUF file, or a LoRA adapter folder, loaded onto its base model. An
adapter's base is the `model` input of its lineage record, else its adapter_config.json's
`base_model_name_or_path`, and it must be a store model or a model inside the workspace:
a shared adapter never makes the UI download anything or read outside the folder it shows.
Targets are checked again on every request (a key names a target, never a file).

`ModelSlot` holds one loaded model at a time (memory stays bounded by the largest model
chosen): it loads on first use, and choosing another model frees the first before the
second loads. One reply is generated at a time; a second request while one streams gets
429. The reply goes through the serve stack's pieces: the request is validated like an API
body (`serve.schemas.parse`), the conversation is rendered with the checkpoint's own chat
template inside `TemplateLimits` (`serve.prepare.render`), and tokens come from the model's
`Engine` (one text-level engine for chat, serve, eval and the arena), with the checkpoint's
generation_config.json as sampling defaults.

`chat_events` streams server-sent events (``data: JSON``): ``{"status": "loading", "model"}``
and ``{"status": "loaded", "seconds"}`` when the model loads, ``{"text"}`` per text delta,
then ``{"done": true, "finish_reason", "prompt_tokens", "tokens", "seconds"}`` or
``{"error": LINE}``. A page that leaves mid-reply stops the generation.

Not here: the page and its script (pages.py, static/chat.js), --allow-run (app.py), options
(weightsmith.commands.ui).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from weightsmith.arena.battle_stream import sse
from weightsmith.errors import WeightsmithError
from weightsmith.files import is_inside
from weightsmith.lineage.record import LINEAGE_FILE, MAX_RECORD_BYTES
from weightsmith.prompt_cache import CHAT_BUDGET, PromptCache
from weightsmith.serve.schemas import ApiError
from weightsmith.ui.workspace import PageError, Scan, Workspace, model_kind

log = logging.getLogger(__name__)

#: Largest adapter_config.json read to find a base model.
MAX_CONFIG_BYTES = 1 << 20
KINDS = {"store": "store model", "hf": "checkpoint", "gguf": "GGUF file", "adapter": "fork (LoRA adapter)"}


@dataclass(kw_only=True)
class ChatOptions:
    """What chat may do (from `weightsmith ui`'s flags)."""

    allow_run: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_tokens: int = 512  # most tokens in one reply
    max_prompt_chars: int = 32_000  # most characters in one conversation


@dataclass
class Target:
    """A model a chat can load: `model` (a store model's path, or a workspace path) and, for a
    fork, its `adapter` folder; `problem` says why it cannot be loaded."""

    key: str
    label: str
    kind: str
    model: str | None = None
    adapter: str | None = None
    problem: str | None = None


class Turn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(BaseModel):
    """POST /api/chat."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str = Field(min_length=1, max_length=4200)
    messages: list[Turn] = Field(min_length=1, max_length=400)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


def _read_json(path: Path, limit: int) -> Any:
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _base_specs(folder: Path) -> list[tuple[str, Path | None]]:
    """Candidate bases of an adapter folder: (spec, its path relative to the folder if given)."""
    out: list[tuple[str, Path | None]] = []
    record = _read_json(folder / LINEAGE_FILE, MAX_RECORD_BYTES)
    inputs = record.get("inputs") if isinstance(record, dict) else None
    for i in inputs if isinstance(inputs, list) else []:
        if isinstance(i, dict) and i.get("role") == "model" and isinstance(i.get("spec"), str):
            rel = i.get("relpath")
            out.append((i["spec"], folder / rel if isinstance(rel, str) else None))
    config = _read_json(folder / "adapter_config.json", MAX_CONFIG_BYTES)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if isinstance(base, str) and base:
        out.append((base, None))
    return out


def adapter_base(ws: Workspace, folder: Path, store: dict[str, Path]) -> tuple[str | None, str | None]:
    """(the base model to load, None), or (None, why there is none we may load)."""
    specs = _base_specs(folder)
    for spec, relative in specs:
        if spec in store:
            return str(store[spec]), None
        for path in (relative, Path(spec) if Path(spec).is_absolute() else folder / spec):
            if path is None or not is_inside(path, ws.root) or not path.exists():
                continue
            if path.suffix == ".gguf" or (path.is_dir() and model_kind(path, _names(path)) == "hf"):
                return str(path), None
    if not specs:
        return None, "no base model recorded (lineage.json or adapter_config.json)"
    return None, f"its base model {specs[0][0]!r} is neither in the store nor a model inside the workspace"


def _names(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()][:10_000]
    except OSError:
        return []


def store_paths(models: list[dict[str, Any]]) -> dict[str, Path]:
    """Usable store models by name."""
    return {m["name"]: Path(m["path"]) for m in models if not m.get("problem") and m.get("kind") != "broken"}


def targets(ws: Workspace, scan: Scan, store: dict[str, Path]) -> list[Target]:
    """Every model a chat could load: the store's, then the workspace's by path."""
    out = [Target(f"store:{name}", name, "store", str(path)) for name, path in sorted(store.items())]
    for rel, kind in sorted(scan.models.items()):
        out.append(_workspace_target(ws, rel, kind, store))
    return out


def _workspace_target(ws: Workspace, rel: str, kind: str, store: dict[str, Path]) -> Target:
    path = ws.root / rel
    target = Target(f"path:{rel}", rel, kind)
    if kind == "adapter":
        target.adapter = str(path)
        target.model, target.problem = adapter_base(ws, path, store)
    else:
        target.model = str(path)
    return target


def find_target(ws: Workspace, key: str, store: dict[str, Path]) -> Target:
    """The target a request names, checked now; ApiError when it is not one."""
    kind, _, name = key.partition(":")
    if kind == "store" and name in store:
        return Target(key, name, "store", str(store[name]))
    if kind == "path":
        try:
            path = ws.resolve(name)
        except PageError as e:  # outside the workspace (403) or missing (404)
            raise ApiError(e.status, str(e), param="model") from None
        found = "gguf" if path.is_file() and path.suffix == ".gguf" else None
        found = found or (model_kind(path, _names(path)) if path.is_dir() else None)
        if found is None:
            raise ApiError(
                404, f"{name}: not a model (a checkpoint folder, GGUF file or LoRA adapter)", param="model"
            )
        return _workspace_target(ws, ws.rel(path), found, store)
    raise ApiError(
        404, f"{key[:200]!r}: no such model; pick one from the list on the chat page", param="model"
    )


class ModelSlot:
    """One loaded model at a time, and one reply at a time (see the module docstring)."""

    def __init__(self, options: ChatOptions, loader: Callable[..., Any] | None = None) -> None:
        self.options = options
        self.busy = threading.Lock()
        self.key: str | None = None
        self.llm: Any = None
        if loader is None:
            from weightsmith.llm import load as loader
        self._loader = loader

    def load(self, target: Target) -> Any:
        """The target's model, loaded unless it already is (the previous one freed first)."""
        if self.key == target.key and self.llm is not None:
            return self.llm
        self.key, self.llm = None, None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        o = self.options
        self.llm = self._loader(
            target.model, device=o.device, dtype=o.dtype, auto_pull=False, adapter=target.adapter
        )
        engine = getattr(self.llm, "engine", None)
        if engine is not None:  # each reply resends the conversation: only its new turn is prefilled
            engine.prompt_cache = PromptCache(CHAT_BUDGET)
        self.key = target.key
        return self.llm


def _reply(
    slot: ModelSlot, target: Target, body: ChatBody, put: Callable[[Any], None], stop: threading.Event
) -> None:
    """Load (if needed) and answer on this thread, handing events to `put`; frees the slot."""
    from weightsmith.chat_template import TemplateLimits
    from weightsmith.serve.prepare import render

    try:
        if slot.key != target.key:
            put({"status": "loading", "model": target.label})
            start = time.perf_counter()
            slot.load(target)
            put({"status": "loaded", "seconds": round(time.perf_counter() - start, 3)})
        llm = slot.llm
        if not llm.tokenizer.chat_template:
            put({"error": f"{target.label} has no chat template, so it cannot chat; `weightsmith generate` "
                 "continues plain text"})  # fmt: skip
            return
        ids = render(llm, [t.model_dump() for t in body.messages], TemplateLimits())
        cap = slot.options.max_tokens
        params = llm.sampling_params(max_tokens=min(body.max_tokens or cap, cap), temperature=body.temperature,
                                     top_p=body.top_p)  # fmt: skip
        with contextlib.closing(llm.engine.stream(ids, params)) as deltas:
            for delta in deltas:
                if stop.is_set():
                    return
                if delta.text:
                    put({"text": delta.text})
                c = delta.completion
                if c is not None:
                    put({"done": True, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                         "tokens": c.completion_tokens,
                         "seconds": round(c.prefill_seconds + c.decode_seconds, 3)})  # fmt: skip
    except ApiError as e:
        put({"error": e.message})
    except WeightsmithError as e:
        put({"error": str(e)})
    except Exception as e:  # a bug, not bad input: logged with its traceback, one line to the page
        log.exception("ui chat with %s failed", target.label)
        put({"error": f"internal error ({type(e).__name__}); see the server's log"})
    finally:
        slot.busy.release()
        put(None)


def chat_events(slot: ModelSlot, target: Target, body: ChatBody) -> AsyncIterator[bytes]:
    """Start the reply now and return its event stream; the caller holds `slot.busy`, which
    the worker releases when it ends (so also when nobody ever reads the stream). Call it on
    the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            stop.set()

    threading.Thread(target=_reply, args=(slot, target, body, put, stop), name="ui-chat", daemon=True).start()
    return _drain(queue, stop)


async def _drain(queue: asyncio.Queue, stop: threading.Event) -> AsyncIterator[bytes]:
    try:
        while (item := await queue.get()) is not None:
            yield sse(item)
    finally:
        stop.set()  # the page left (or the reply ended): the worker stops at its next token


__all__ = ["KINDS", "ChatBody", "ChatOptions", "ModelSlot", "Target", "chat_events", "find_target", "targets"]
