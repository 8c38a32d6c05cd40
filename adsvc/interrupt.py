"""Cooperative interruption of long loops (deadlines, cancellation).

Decoding, every pass and the evaluator take an optional `check` callable and call it
every CHECK_EVERY nodes/steps; it raises to stop the work.
"""

from __future__ import annotations

from collections.abc import Callable

CHECK_EVERY = 256
Checker = Callable[[], None] | None
