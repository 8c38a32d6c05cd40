"""Cooperative interruption of long loops (deadlines, cancellation).

Decoding and every pass take an optional `check()` callable and call it every
CHECK_EVERY nodes; it raises to stop the work. The evaluator calls its `interrupt`
with keywords: `steps` done so far and the `upcoming` step's estimated seconds, also
whenever about CHECK_SECONDS of estimated work ran since the last call — so a deadline
stops a run of few expensive steps too, and a step that cannot finish in time is not
started.
"""

from __future__ import annotations

from collections.abc import Callable

CHECK_EVERY = 256  # nodes or steps between checks
CHECK_SECONDS = 0.01  # estimated seconds of evaluation between checks
# A step is not started when its estimate is over this many times the time left: the
# estimate is a calibration of a shared machine (it can be several times off until the
# evaluator's own timings correct it), and refusing work that would finish is worse
# than an overrun bounded by one step.
REFUSE_MARGIN = 3.0
Checker = Callable[[], None] | None
Interrupt = Callable[..., None]  # interrupt(steps: int = 0, upcoming: float = 0.0)
