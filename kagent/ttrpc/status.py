"""Errors to ttRPC status, in one place.

Handlers raise domain errors (kagent.errors) or let unexpected exceptions
escape; the server turns each into (code, message) here and nowhere else.
"""

from __future__ import annotations

import asyncio
import errno

from kagent.errors import AgentError
from kagent.ttrpc.codes import Code

# EMFILE: the agent's own limit; ENFILE: the guest's file table.  Not ENOMEM: the kernel also
# answers it for what is no shortage (fork into a pid namespace whose init has exited, an
# address range that is not mapped), and a guest short of memory mostly meets the OOM killer,
# not an errno; an ENOMEM stays INTERNAL, with its traceback, where it can be looked into.
OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})


class RpcError(Exception):
    """A non-OK status, as the client sees it (and as handlers may raise it)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{Code.name_of(code)}: {message}")
        self.code = int(code)
        self.message = message


def status_of(exc: BaseException) -> tuple[Code, str, bool]:
    """(code, message, unexpected) for an exception raised by a handler.

    ``unexpected`` is True for errors nobody chose a code for: the server logs
    those with their traceback.
    """
    if isinstance(exc, AgentError):
        return exc.code, exc.message, False
    if isinstance(exc, RpcError):
        return Code(exc.code) if exc.code in Code._value2member_map_ else Code.UNKNOWN, exc.message, False
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Code.DEADLINE_EXCEEDED, "timeout", False
    if isinstance(exc, NotImplementedError):
        return Code.UNIMPLEMENTED, str(exc) or "not implemented", False
    if isinstance(exc, OSError) and exc.errno in OUT_OF_FDS:
        # The guest's load, not a bug: the host may retry later.  No traceback.
        return Code.RESOURCE_EXHAUSTED, f"the agent ran out of file descriptors: {exc}", False
    if isinstance(exc, OSError) and exc.strerror:
        # A readable "[Errno 2] No such file or directory: '/x'" beats a bare repr.
        return Code.INTERNAL, str(exc), True
    text = str(exc)
    return Code.INTERNAL, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, True
