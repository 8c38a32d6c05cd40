"""The one-shot gradient: the SDK's own value_and_grad, run against the server's cache.

Reusing `ClientBase.value_and_grad` keeps the service's answer identical to the local
and remote clients' (same scalar-output rule, same forward-mode seeding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from adsvc.server.compiler import Compiler, Entry, Spec
from adsvc_protocol.client import ClientBase, Compiled
from adsvc_protocol.errors import InvalidRequestError
from adsvc_protocol.proto import ir_pb2


class _CacheBackedClient(ClientBase):
    def __init__(self, compiler: Compiler, interrupt: Callable[[], None] | None,
                 check: Callable[[], None] | None = None):
        self.compiler = compiler
        self.interrupt = interrupt
        self.check = check if check is not None else interrupt
        self.entry: Entry | None = None

    def _compile(self, g, modes, wrt, seed, timeout) -> Compiled:
        if isinstance(g, Entry):
            want = Spec(modes, wrt if wrt is not None else g.spec.wrt, seed)
            if g.spec != want:
                raise InvalidRequestError(
                    f"this handle was compiled for {g.spec.describe()}; this call needs "
                    f"{want.describe()} (send the graph instead)", field="handle")
            entry = g
        else:
            entry, _ = self.compiler.compile(g, Spec(modes, wrt, seed), self.check)
        self.entry = entry
        return Compiled(entry, entry.inputs, entry.outputs, entry.graph)

    def _run(self, compiled, feeds, timeout):
        return compiled.handle.plan.run(feeds, interrupt=self.interrupt)


def value_and_grad(compiler: Compiler, source: Entry | ir_pb2.Graph, mode: str,
                   wrt: tuple[str, ...] | None, feeds: Mapping[str, np.ndarray],
                   interrupt: Callable[[], None] | None,
                   check: Callable[[], None] | None = None):
    """(value, {input: gradient}, output name, entry). `interrupt` is called during
    evaluation, `check` (default: `interrupt`) during compilation; either may raise."""
    client = _CacheBackedClient(compiler, interrupt, check)
    value, grads = client.value_and_grad(source, wrt, mode, feeds)
    entry = client.entry
    name = ClientBase._scalar_output(Compiled(entry, entry.inputs, entry.outputs))
    return value, grads, name, entry
