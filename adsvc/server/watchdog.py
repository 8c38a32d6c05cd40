"""One thread that fires callbacks at deadlines: the idle timeout of streaming calls.

A stream waiting for its client's next message holds a server thread; arming a
deadline before the wait and disarming it after costs two dict operations, and the
callback (cancelling the call) frees the thread if the client never sends.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


class Watchdog:
    """Calls callbacks at their deadlines, from one daemon thread started on first use."""

    def __init__(self, name: str = "adsvc-watchdog"):
        self._name = name
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, callback: Callable[[], None]) -> int:
        """Call `callback` in `seconds` unless disarmed first; returns the key to disarm."""
        key = next(self._ids)
        with self._cond:
            self._armed[key] = (time.monotonic() + seconds, callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name,
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return key

    def disarm(self, key: int) -> None:
        """Forget the callback of `key` (unknown keys are ignored); one that is already
        being fired still runs."""
        with self._cond:
            self._armed.pop(key, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [k for k, (t, _) in self._armed.items() if t <= now]
                fire = [self._armed.pop(k)[1] for k in due]
                if not fire:
                    nxt = min((t for t, _ in self._armed.values()), default=now + 60.0)
                    self._cond.wait(max(0.01, nxt - now))
                    continue
            for callback in fire:
                try:
                    callback()
                except Exception:  # a failed cancel must not stop the loop
                    pass
