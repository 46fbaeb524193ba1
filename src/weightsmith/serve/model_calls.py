"""Work for the model besides decoding (prompt scoring), queued for the scheduler's thread.

The scheduler's thread owns the model (its adapters' row selection, its caches), so anything
else that runs the model is handed to it: `submit(fn)` queues a call and returns a Future, and
the scheduler runs one call per step (`run_one`), so running streams keep getting a token
meanwhile. That includes anything that reads the weights through PyTorch or our C kernels
(`state_dict`, hashing): an OpenMP-parallel op on a second thread gives the OpenMP runtime
(libgomp) a second thread team, and from then on, counting more threads than cores, it stops
spinning at barriers and puts threads to sleep. A decode step passes a few hundred
barriers, so every token paid a few hundred sleeps and wake-ups (measured: one client's
decode 1.4x slower, int4 on 2 cores). Not here: what the calls compute (prompt_logprobs.py), the loop (scheduler.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class CallQueue:
    """Calls waiting for the model's thread; `wake` is the scheduler's condition (its lock)."""

    def __init__(self, limit: int, wake: threading.Condition) -> None:
        self.limit = limit
        self.wake = wake
        self.waiting: deque[tuple[Callable[[], Any], Future]] = deque()

    def __len__(self) -> int:
        return len(self.waiting)

    def submit(self, fn: Callable[[], Any], full: Callable[[str], Exception]) -> Future:
        """Queue `fn()`; `full(message)` is raised when `limit` calls already wait."""
        future: Future = Future()
        with self.wake:
            if len(self.waiting) >= self.limit:
                raise full(f"{len(self.waiting)} calls are waiting (the limit, --max-queue)")
            self.waiting.append((fn, future))
            self.wake.notify()
        return future

    def run_one(self) -> None:
        """Run the oldest call here (a call whose client went away is skipped)."""
        with self.wake:
            fn, future = self.waiting.popleft() if self.waiting else (None, None)
        if future is None or not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except Exception as e:  # the call's own failure, reported to its request
            future.set_exception(e)

    def fail_all(self, message: str) -> None:
        with self.wake:
            waiting, self.waiting = list(self.waiting), deque()
        for _, future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(message))
