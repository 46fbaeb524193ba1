"""One battle's two answers, generated at once and streamed to the page as server-sent events.

Each side's `Contestants.stream` runs on its own thread and hands its text deltas to the
event loop; the page receives them interleaved, each tagged with its side ("a" left, "b"
right) and never with a contestant's name. When both answers are complete they are stored
(`record_answers`) and only then does the stream say ``done``: a vote can never arrive
for answers the store does not hold. A contestant that fails ends the stream with an
error event that names the side, not the model (its message, which may name an endpoint,
goes to the log); the battle stays pending and takes no votes. A page that leaves
mid-stream stops both generators.

Events (``data: JSON`` lines): ``{"type": "battle", "id", "prompt", "category"}`` first, then
``{"type": "delta", "side", "text"}`` and ``{"type": "end", "side"}``, then ``{"type":
"done", "id"}`` or ``{"type": "error", "message"}``.

Not here: choosing the pair and creating the battle (page.py), the contestants themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from weightsmith.arena.records import Battle

log = logging.getLogger(__name__)

SIDES = ("a", "b")


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event carrying `event` as JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def _generate(
    contestants: Any,
    side: str,
    name: str,
    messages: list[dict],
    params: Any,
    put: Callable[..., None],
    stop: threading.Event,
) -> None:
    """Run one side's stream on this thread, handing ("delta" | "end" | "error", side,
    payload) items to `put`."""
    start = time.perf_counter()
    first: float | None = None
    try:
        deltas = contestants.stream(name, messages, params)
        try:
            for delta in deltas:
                if stop.is_set():
                    return
                if first is None:
                    first = time.perf_counter() - start
                if delta:
                    put("delta", side, str(delta))
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()
    except Exception as e:  # an endpoint down, a model error: the page gets a line without the name
        log.warning("arena: contestant %s failed while answering: %s", name, e)
        put("error", side, None)
        return
    total = time.perf_counter() - start
    put(
        "end",
        side,
        {"first_token_s": round(first if first is not None else total, 4), "total_s": round(total, 4)},
    )


async def battle_events(
    *,
    battle: Battle,
    messages: list[dict],
    contestants: Any,
    params: dict[str, Any],
    record: Callable[[dict[str, str], dict[str, Any]], Any],
    release: Callable[[], None],
) -> AsyncIterator[bytes]:
    """The battle's event stream. `params` holds each side's sampling parameters ("a", "b");
    `record(answers, timings)` stores the answers (awaited; it runs off the loop);
    `release()` runs once the stream ends, however it ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(*item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            stop.set()

    names = {"a": battle.model_a, "b": battle.model_b}
    texts: dict[str, list[str]] = {"a": [], "b": []}
    timings: dict[str, Any] = {}
    try:
        yield sse({"type": "battle", "id": battle.id, "prompt": messages, "category": battle.category})
        for side in SIDES:
            args = (contestants, side, names[side], messages, params[side], put, stop)
            threading.Thread(target=_generate, args=args, name=f"arena-{side}", daemon=True).start()
        while len(timings) < len(SIDES):
            kind, side, payload = await queue.get()
            if kind == "error":
                yield sse({"type": "error", "message": f"answer {side.upper()} failed; start a new battle"})
                return
            if kind == "delta":
                texts[side].append(payload)
                yield sse({"type": "delta", "side": side, "text": payload})
            else:
                timings[side] = payload
                yield sse({"type": "end", "side": side})
        try:
            await record({side: "".join(texts[side]) for side in SIDES}, timings)
        except Exception as e:
            log.warning("arena: storing the answers of battle %s failed: %s", battle.id, e)
            yield sse({"type": "error", "message": "the answers could not be stored; start a new battle"})
            return
        yield sse({"type": "done", "id": battle.id})
    finally:
        stop.set()
        release()
