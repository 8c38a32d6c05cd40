"""Cooperative interruption of long loops (deadlines, cancellation).

Decoding and every pass take an optional `check()` callable and call it every
CHECK_EVERY nodes; it raises to stop the work. The evaluator calls its `interrupt`
with keywords: `steps` done so far and the `upcoming` step's estimated seconds, also
whenever about CHECK_SECONDS of estimated work ran since the last call — so a deadline
stops a run of few expensive steps too, and a step that cannot finish in time is not
started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

CHECK_EVERY = 256  # nodes or steps between checks
CHECK_SECONDS = 0.01  # estimated seconds of evaluation between checks
# A step is not started when its estimate is over this many times the time left: the
# estimate is a calibration of a shared machine (it can be several times off until the
# evaluator's own timings correct it), and refusing work that would finish is worse
# than an overrun bounded by one step.
REFUSE_MARGIN = 3.0
Checker = Callable[[], None] | None
Interrupt = Callable[..., None]  # interrupt(steps: int = 0, upcoming: float = 0.0)


# Loops run many iterations inside one evaluation step: the evaluator makes its
# interrupt reachable from their kernels for the length of a run.
_ACTIVE: ContextVar[Interrupt | None] = ContextVar("adsvc_interrupt", default=None)


@contextmanager
def interrupting(interrupt: Interrupt | None) -> Iterator[None]:
    """Make `interrupt` the one loop kernels call (see `loop_checker`) inside the block."""
    token = _ACTIVE.set(interrupt)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def loop_checker(body) -> Callable[[], None] | None:
    """For a loop kernel about to run `body` (a plan with an estimated `seconds` per
    run): a function to call after each iteration, which calls the active interrupt every
    CHECK_EVERY iterations or about CHECK_SECONDS of estimated work; None when no
    interrupt is active."""
    interrupt = _ACTIVE.get()
    if interrupt is None:
        return None
    seconds = body.seconds
    state = [0, 0.0]

    def tick() -> None:
        state[0] += 1
        state[1] += seconds
        if state[0] % CHECK_EVERY == 0 or state[1] >= CHECK_SECONDS:
            state[1] = 0.0
            interrupt(steps=state[0], upcoming=seconds)
    return tick


# The passes run again over loop bodies from inside derivative rules, which take no
# checker: differentiation makes its checker reachable from them for its duration.
_COMPILING: ContextVar[Callable[[], None] | None] = ContextVar("adsvc_compile_check",
                                                               default=None)


@contextmanager
def compiling(check: Callable[[], None] | None) -> Iterator[None]:
    """Make `check` the one `compile_check()` returns inside the block."""
    token = _COMPILING.set(check)
    try:
        yield
    finally:
        _COMPILING.reset(token)


def compile_check() -> Callable[[], None] | None:
    """The active differentiation's checker (deadlines, cancellation), or None."""
    return _COMPILING.get()
