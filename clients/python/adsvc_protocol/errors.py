"""Typed errors shared by the compiler, the server and the SDK.

Every error names what is wrong: `field` locates it (``nodes[id=7]``, ``inputs.x``,
``outputs.z``) and `description` says what. Each class states its gRPC status code
(`grpc_code`, the one table: the server answers with it, the SDK maps a status that
carries no class back with `class_for_status`) and how the CLI exits on it
(`exit_status`). The server's status carries a ``google.rpc.BadRequest`` field
violation (field and description) and a ``google.rpc.ErrorInfo`` whose reason is the
class name; the SDK turns them back into the same class, so local and remote callers
catch the same exceptions.
"""

from __future__ import annotations


class AdsvcError(Exception):
    """Base class. `grpc_code` is the name of the gRPC status code the server returns;
    `exit_status` is the CLI's exit status (1: the engine or server failed; 2: the
    command line, an expression or a file is wrong)."""

    grpc_code = "INTERNAL"
    exit_status = 1

    def __init__(self, description: str, field: str = "", context: str = ""):
        self.description = description
        self.field = field
        self.context = context
        msg = f"{field}: {description}" if field else description
        if context:
            msg = f"{msg}\n{context}"
        super().__init__(msg)

    def summary(self) -> str:
        """One line for people (the CLI prints it): class, field and description."""
        where = f"{self.field}: " if self.field else ""
        return f"{type(self).__name__.rstrip('_')}: {where}{one_line(self.description)}"


def one_line(text) -> str:
    """The first line of `text` with its white space folded."""
    first = str(text).strip().splitlines()
    return " ".join(first[0].split()) if first else ""


class InvalidGraphError(AdsvcError):
    """The graph is malformed."""

    grpc_code = "INVALID_ARGUMENT"


class VersionError(InvalidGraphError):
    """IR or opset version this reader does not know."""


class UnknownOpError(InvalidGraphError):
    """A node names an op that is not in the op table."""


class ArityError(InvalidGraphError):
    """A node has the wrong number of operands."""


class AttributeError_(InvalidGraphError):
    """A node attribute is missing, unknown, of the wrong kind or out of range."""


class UndefinedReferenceError(InvalidGraphError):
    """An operand or output refers to an id that is not defined in the graph."""


class ForwardReferenceError(InvalidGraphError):
    """An operand refers to a node listed later (nodes must be in topological order)."""


class DuplicateIdError(InvalidGraphError):
    """Two inputs/nodes share an id, or two inputs/outputs share a name."""


class CycleError(InvalidGraphError):
    """The operand references form a cycle; `cycle` lists the node ids on it."""

    def __init__(self, description: str, field: str = "", context: str = "", cycle=()):
        super().__init__(description, field, context)
        self.cycle = list(cycle)


class ShapeError(InvalidGraphError):
    """Operand shapes are incompatible with the op."""


class DTypeError(InvalidGraphError):
    """Operand dtypes are incompatible with the op."""


class NotDifferentiableError(InvalidGraphError):
    """A derivative was requested through an integer or boolean value."""


class InvalidRequestError(AdsvcError):
    """The request is malformed apart from the graph (bad mode, wrt name, order ...)."""

    grpc_code = "INVALID_ARGUMENT"


class InputError(AdsvcError):
    """A fed input is missing, unknown, or has the wrong dtype or shape."""

    grpc_code = "INVALID_ARGUMENT"


class EvaluationError(AdsvcError):
    """A kernel failed while evaluating a well-formed graph (e.g. index out of range)."""

    grpc_code = "INVALID_ARGUMENT"


class LimitExceededError(AdsvcError):
    """A configured limit (nodes, tensor elements, message size, order) was exceeded."""

    grpc_code = "RESOURCE_EXHAUSTED"


class HandleNotFoundError(AdsvcError):
    """The compiled-graph handle is not (or no longer) cached on the server."""

    grpc_code = "NOT_FOUND"


class UnauthenticatedError(AdsvcError):
    """A token is required and was missing or wrong."""

    grpc_code = "UNAUTHENTICATED"


class DeadlineExceededError(AdsvcError):
    """The call's deadline expired; the work was stopped."""

    grpc_code = "DEADLINE_EXCEEDED"


class UnavailableError(AdsvcError):
    """The server could not be reached (after retries)."""

    grpc_code = "UNAVAILABLE"


class CancelledError(AdsvcError):
    """The call was cancelled."""

    grpc_code = "CANCELLED"


ERROR_CLASSES: dict[str, type[AdsvcError]] = {
    cls.__name__: cls
    for cls in [
        AdsvcError, InvalidGraphError, VersionError, UnknownOpError, ArityError,
        AttributeError_, UndefinedReferenceError, ForwardReferenceError, DuplicateIdError,
        CycleError, ShapeError, DTypeError, NotDifferentiableError, InvalidRequestError,
        InputError, EvaluationError, LimitExceededError, HandleNotFoundError,
        UnauthenticatedError, DeadlineExceededError, UnavailableError, CancelledError,
    ]
}


class UsageError(AdsvcError):
    """The command line, an expression or a graph file is wrong (CLI exit status 2).
    Its summary is the description alone, after the class's `prefix`."""

    grpc_code = "INVALID_ARGUMENT"
    exit_status = 2
    prefix = ""

    def summary(self) -> str:
        """`prefix` and the description, on one line: no class name, no field."""
        return self.prefix + one_line(self.description)


ERROR_CLASSES[UsageError.__name__] = UsageError

# The class for a status that carries no class name (raised by gRPC itself or a proxy).
_FOR_STATUS = {cls.grpc_code: cls for cls in (
    InvalidRequestError, LimitExceededError, HandleNotFoundError, UnauthenticatedError,
    DeadlineExceededError, UnavailableError, CancelledError)}


def class_for_status(code_name: str) -> type[AdsvcError]:
    """The error class for a gRPC status code name without an ErrorInfo reason."""
    return _FOR_STATUS.get(code_name, AdsvcError)
