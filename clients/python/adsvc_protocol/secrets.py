"""Reading a secret (a bearer token, a store key) from a file: the one rule the CLI, the
server and the SDK share — a regular file or a pipe (never a device: `/dev/zero` must
not be read), at most MAX_SECRET_FILE_BYTES, the first line, stripped, printable ASCII
(it travels as gRPC metadata)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from adsvc_protocol.errors import UsageError

MAX_SECRET_FILE_BYTES = 64 * 1024


def _shown(path: str, limit: int = 200) -> str:
    return path if len(path) <= limit else path[:limit] + "..."


def read_secret_file(path: str, what: str,
                     error: Callable[[str], Exception] = UsageError) -> str:
    """The first line of the file `path`, stripped (may be empty: the caller says what
    an empty secret means); `error(message)` is raised, messages starting with `what`
    (e.g. "--token-file")."""
    where = f"{what} {_shown(path)}"
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:
        raise error(f"{where}: {getattr(e, 'strerror', None) or e}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise error(f"{where}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as e:
        raise error(f"cannot read {where}: {e.strerror or e}") from None
    line, newline, _ = data.partition(b"\n")
    if not newline and len(data) > MAX_SECRET_FILE_BYTES:
        raise error(f"{where}: the first line is longer than {MAX_SECRET_FILE_BYTES:,} bytes")
    text = line.decode("ascii", errors="replace").strip()
    if "\ufffd" in text or not all(" " <= c <= "~" for c in text):
        raise error(f"{where}: the secret must be printable ASCII")
    return text

