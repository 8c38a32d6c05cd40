"""The server's one log line per call (the access line), at INFO on `adsvc.server`.

It is an ordinary log record wherever logging is configured otherwise (pytest's
capture, a deployment's own handlers or filters). In the configuration `adsvc serve`
installs — the records reach one plain StreamHandler whose formatter is `FORMAT` with
the default clock — the call only queues (time, format, arguments), and a writer
thread formats the lines and writes them to that handler's stream under its lock: the
very text the handler would write, with the call's own time, written a few ms after the
response went out (the writer, once woken, waits GATHER seconds and writes what came in
one write) instead of while the client waits. Waking the writer per line cost more
than writing: under 8 client threads throughput fell from 82% to 64% of a bare
echo's. At most MAX_PENDING lines wait: with the stream stuck (nobody reads the log),
calls write their own lines and wait for it, as a plain handler makes them. `flush`
writes what is queued (at shutdown and at exit). On a small call the
synchronous record was about a third of the server's own Python time.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
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

    BATCH = 512  # lines per write at most
    GATHER = 0.005  # seconds the writer waits, once woken, for more lines to write at once
    MAX_PENDING = 10_000  # lines queued at most; beyond, a call writes its own line

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._clock = (-1, "")  # (second, its "%Y-%m-%d %H:%M:%S"), replaced as one
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer_pid = 0  # the process whose writer thread runs (none after a fork)
        self._start_lock = threading.Lock()

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
        if handler is None:
            self._record(fmt, args)
            return
        if self._queue.qsize() >= self.MAX_PENDING:  # the stream is stuck: wait with it
            self._emit(handler, [self._line(time.time(), fmt, args)])
            return
        self._queue.put((time.time(), handler, fmt, args))
        if self._writer_pid != os.getpid():
            self._start()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout` seconds) until every line queued so far is written."""
        if self._writer_pid != os.getpid():
            self._write([self._queue.get_nowait() for _ in range(self._queue.qsize())])
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def _record(self, fmt: str, args: tuple) -> None:
        lg = self.logger  # (no caller lookup: the caller is this module)
        lg.handle(lg.makeRecord(lg.name, logging.INFO, __file__, 0, fmt, args, None, "write"))

    def _start(self) -> None:
        with self._start_lock:
            if self._writer_pid == os.getpid():
                return
            threading.Thread(target=self._run, name="adsvc-access-log", daemon=True).start()
            self._writer_pid = os.getpid()
            atexit.register(self.flush, 1.0)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            items = [get()]
            if self.GATHER:  # (lines come with the next calls: one wake-up for several)
                time.sleep(self.GATHER)
            while len(items) < self.BATCH and not self._queue.empty():
                items.append(get())
            try:
                self._write(items)
            except Exception:  # a bug must not stop the writer (the queue would grow)
                logging.getLogger(__name__).exception("the access log writer failed")
                for item in items:
                    if isinstance(item, threading.Event):
                        item.set()

    def _write(self, items: list) -> None:
        """Write queued lines (in order, one write per handler run) and set the flush
        events among them."""
        lines: list[str] = []
        handler = None
        for item in items:
            if isinstance(item, threading.Event):
                self._emit(handler, lines)
                lines = []
                item.set()
                continue
            now, h, fmt, args = item
            if h is not handler:
                self._emit(handler, lines)
                lines, handler = [], h
            try:
                lines.append(self._line(now, fmt, args))
            except Exception:  # this line only (the record path reports it)
                self._record(fmt, args)
        self._emit(handler, lines)

    def _line(self, now: float, fmt: str, args: tuple) -> str:
        second = int(now)
        clock = self._clock
        if clock[0] != second:
            clock = self._clock = (second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                         time.localtime(second)))
        return (f"{clock[1]},{int((now - second) * 1000):03d} {os.getpid()} INFO "
                f"{self.logger.name} {fmt % args}\n")

    def _emit(self, handler, lines: list[str]) -> None:
        if not lines:
            return
        try:
            with handler.lock:
                handler.stream.write("".join(lines))
                handler.flush()
        except Exception:  # a closed stream, say: logging's own handling
            for line in lines:
                self._record("%s", (line.rstrip("\n").split(" ", 5)[-1],))
