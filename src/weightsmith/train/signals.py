"""Ctrl-C and SIGTERM during training: the first asks the loop to stop at the next step it can
save a checkpoint after; a second one stops at once (KeyboardInterrupt).

Not here: what stopping saves (loop.py, checkpoints.py).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """Inside, the first SIGINT/SIGTERM sets the event the loop checks after each step; a second
    one raises KeyboardInterrupt. Off the main thread (no handlers there) the event stays unset."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after this step and saving a checkpoint (interrupt again to stop now)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
