"""The server's one log line per call (the access line), at INFO on `adsvc.server`.

It is an ordinary log record wherever logging is configured otherwise (pytest's
capture, a deployment's own handlers or filters). In the configuration `adsvc serve`
installs — the records reach one plain StreamHandler whose formatter is `FORMAT` with
the default clock — the line is formatted here and written to that handler's stream
under its lock: the very text the handler would write, without building a LogRecord
and formatting it field by field. On a small call that is about a third of the
server's own Python time.
"""

from __future__ import annotations

import logging
import os
import time

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"


def _plain(handler: logging.Handler) -> bool:
    """Does `handler` write FORMAT lines to a stream, as `logging.basicConfig` made it?"""
    f = handler.formatter
    return (type(handler) is logging.StreamHandler and not handler.filters
            and handler.level <= logging.INFO and type(f) is logging.Formatter
            and f._fmt == FORMAT and f.datefmt is None
            and f.converter is time.localtime and f.default_msec_format == "%s,%03d")


class AccessLog:
    """Writes access lines for `logger` (see the module docstring)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._clock = (-1, "")  # (second, its "%Y-%m-%d %H:%M:%S"), replaced as one

    def _only_handler(self) -> logging.StreamHandler | None:
        """The one plain handler the logger's records reach, or None."""
        found = []
        lg: logging.Logger | None = self.logger
        while lg is not None:
            if lg.filters:
                return None
            found += lg.handlers
            if not lg.propagate:
                break
            lg = lg.parent
        return found[0] if len(found) == 1 and _plain(found[0]) else None

    def write(self, fmt: str, args: tuple) -> None:
        """Log `fmt % args` at INFO (nothing if INFO is off)."""
        lg = self.logger
        if not lg.isEnabledFor(logging.INFO):
            return
        handler = self._only_handler()
        if handler is not None:
            now = time.time()
            second = int(now)
            clock = self._clock
            if clock[0] != second:
                clock = self._clock = (second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                             time.localtime(second)))
            line = (f"{clock[1]},{int((now - second) * 1000):03d} {os.getpid()} INFO "
                    f"{lg.name} {fmt % args}\n")
            try:
                with handler.lock:
                    handler.stream.write(line)
                    handler.flush()
                return
            except Exception:
                pass
        # (no caller lookup: the caller is this method)
        lg.handle(lg.makeRecord(lg.name, logging.INFO, __file__, 0, fmt, args, None, "write"))
