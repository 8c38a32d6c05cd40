"""The one mode normaliser: what "mode" and "order" mean in every request.

A request differentiates `order` times; each pass is "forward" (JVP) or "reverse"
(VJP). `mode` is one mode (repeated `order` times) or one mode per pass; `order`
defaults to the number of modes given. The SDK, the in-process client, the server
(after turning enum values into names) and the CLI all call `normalize_modes`.
"""

from __future__ import annotations

from adsvc_protocol.errors import AdsvcError, InvalidRequestError, LimitExceededError
from adsvc_protocol.proto import service_pb2

FORWARD, REVERSE = "forward", "reverse"
MODES = (FORWARD, REVERSE)
TO_ENUM = {FORWARD: service_pb2.MODE_FORWARD, REVERSE: service_pb2.MODE_REVERSE}
FROM_ENUM = {v: k for k, v in TO_ENUM.items()}


HARD_MAX_ORDER = 1000  # beyond any graph's reach; keeps `modes * order` from allocating


def normalize_modes(mode, order: int | None = None, *, max_order: int | None = None,
                    labels: tuple[str, str] = ("mode", "order"), field_prefix: str = "",
                    error: type[AdsvcError] = InvalidRequestError,
                    allow_empty: bool = False) -> tuple[str, ...]:
    """One mode per differentiation pass; with `allow_empty`, no modes (and no order)
    is the empty tuple: no differentiation (a server's plain evaluation).

    `labels` name the mode and order arguments in messages and error fields (the CLI
    says "--mode"); `max_order` is checked before anything is repeated (an order can
    arrive as 2**64); errors are of class `error` (a LimitExceededError for the limit).
    """
    mode_label, order_label = labels
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if order is None:
        order = len(modes)
    if isinstance(order, bool) or not isinstance(order, int) or order < (
            0 if allow_empty and not modes else 1):
        raise error(f"{order_label} must be an integer >= 1, got {order!r}",
                    field=field_prefix + order_label)
    if len(modes) != 1 and len(modes) != order:
        raise error(f"{mode_label} lists {len(modes)} modes but {order_label} is {order}",
                    field=field_prefix + order_label)
    limit = min(max_order or HARD_MAX_ORDER, HARD_MAX_ORDER)
    if order > limit:  # before `modes * order`
        raise LimitExceededError(f"order {order} exceeds the limit of {limit}",
                                 field=field_prefix + order_label)
    for m in modes:
        if m not in MODES:
            raise error(f"unknown mode {m!r} (use 'forward' or 'reverse')",
                        field=field_prefix + mode_label)
    return modes * order if len(modes) == 1 else modes


def single_mode(mode) -> str:
    """A mode for a call that differentiates once (grad, jacobian): "forward"/"reverse"."""
    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidRequestError(f"unknown mode {mode!r} (use 'forward' or 'reverse')",
                                  field="mode")
    return mode


def mode_from_enum(value: int, field: str, default: str | None = None) -> str:
    """The mode name of a `Mode` enum value; MODE_UNSPECIFIED is `default` (or an error)."""
    if value == service_pb2.MODE_UNSPECIFIED and default is not None:
        return default
    if value not in FROM_ENUM:
        raise InvalidRequestError(f"mode {value} is not MODE_FORWARD or MODE_REVERSE",
                                  field=field)
    return FROM_ENUM[value]
