"""Resource bounds of the ttRPC server: what one peer may hold of the agent.

In a VM the agent dying is the pod dying, so no peer may make it hold memory,
descriptors or tasks without bound.  Every bound below is a ``Limits`` field
(configurable: ``agent.ttrpc_*`` options, see kagent.config) and every refusal
is a RESOURCE_EXHAUSTED status whose message names the limit and its option:

- ``max_connections`` (64): connections served at once.  One more is accepted,
  its first request is answered RESOURCE_EXHAUSTED ("too many connections ...")
  and it is closed; if it sends nothing it is closed after ``refuse_grace``
  seconds.  A warning is logged (at most one a second, with the count of the
  ones not logged) — accepting, rather than leaving it in the backlog, tells the
  host why instead of letting it hang.
- ``max_inflight`` (1024): requests in progress on one connection (ReadStdout
  and WaitProcess long-polls count); ``max_inflight_total`` (4096): on all of them.
- ``max_inflight_bytes`` (64 MiB): request payload bytes held by the requests in
  progress (a WriteStdin to a container that does not read holds its data).
- ``max_message`` (4 MiB, upstream's ``messageLengthMax``): a request frame
  longer than this is refused on its own stream ("message length N exceed
  maximum message size of M", as Go ttrpc says) and its body is discarded as it
  arrives; the connection goes on.  Replies keep the server's own 4 MiB bound
  (a ReadStdout of 1 MiB stays possible with a smaller request limit).
- ``frame_timeout`` (30 s): a frame that has started arriving must be complete
  within this time, else the connection is closed with a logged warning.  A peer
  that sends a header and then nothing (slowloris) would otherwise keep the
  buffer for that frame, up to ``max_message`` bytes, forever.  An idle
  connection with no partial frame is *not* closed: hosts keep connections open
  between calls.  So the worst case held by peers is about
  ``max_connections * max_message`` of frame buffers plus ``max_inflight_bytes``.

A request that completes without waiting (an eager handler) is never in flight.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kagent import log as klog
from kagent.ttrpc.frame_defs import MESSAGE_LENGTH_MAX

if TYPE_CHECKING:
    from kagent.ttrpc.server import Connection

__all__ = ["Admission", "ConnectionGuard", "Limits"]

_log = klog.get_logger("ttrpc")


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64
    max_inflight: int = 1024  # per connection
    max_inflight_total: int = 4096
    max_inflight_bytes: int = 64 << 20
    max_message: int = MESSAGE_LENGTH_MAX
    frame_timeout: float = 30.0  # seconds
    refuse_grace: float = 1.0  # seconds a refused connection may take to send its first request

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The limits an AgentConfig asks for (its ``ttrpc_*`` fields; defaults where absent)."""
        names = {
            "max_connections": "ttrpc_max_connections",
            "max_inflight": "ttrpc_max_inflight",
            "max_inflight_total": "ttrpc_max_inflight_total",
            "max_inflight_bytes": "ttrpc_max_inflight_bytes",
            "max_message": "ttrpc_max_message_size",
            "frame_timeout": "ttrpc_frame_timeout",
        }
        values = {mine: getattr(config, theirs) for mine, theirs in names.items() if hasattr(config, theirs)}
        return cls(**values)


class _RateLimitedWarning:
    """One warning per ``interval`` seconds; the ones in between are counted, not lost."""

    def __init__(self, message: str, interval: float = 1.0) -> None:
        self.message = message
        self.interval = interval
        self._last = -interval
        self._suppressed = 0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        self._last = now
        if self._suppressed:
            fields["not_logged_since_last"] = self._suppressed
            self._suppressed = 0
        _log.warning(self.message, **fields)


class Admission:
    """The server-wide counters behind the limits (one per Server)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.connections = 0  # admitted connections
        self.inflight = 0
        self.inflight_bytes = 0
        self.refused_connections = 0  # since start, for tests and diagnostics
        self.refused_requests = 0
        self._warn_refused = _RateLimitedWarning("too many connections: refusing one")

    def request_refusal(self, conn_inflight: int, size: int) -> str | None:
        """Why a request of ``size`` payload bytes cannot start now, or None."""
        lim = self.limits
        why = None
        if conn_inflight >= lim.max_inflight:
            why = (f"too many requests in flight on this connection ({conn_inflight}, limit {lim.max_inflight}, "
                   "agent.ttrpc_max_inflight)")
        elif self.inflight >= lim.max_inflight_total:
            why = (f"too many requests in flight on all connections ({self.inflight}, limit "
                   f"{lim.max_inflight_total}, agent.ttrpc_max_inflight_total)")
        elif size and self.inflight_bytes + size > lim.max_inflight_bytes:
            why = (f"requests in flight hold {self.inflight_bytes} bytes; {size} more would exceed the limit of "
                   f"{lim.max_inflight_bytes} (agent.ttrpc_max_inflight_bytes)")
        if why is not None:
            self.refused_requests += 1
        return why

    def track(self, task: asyncio.Future, size: int) -> None:
        """Count ``task`` as in flight, holding ``size`` bytes, until it is done."""
        self.inflight += 1
        self.inflight_bytes += size

        def done(_: asyncio.Future) -> None:
            self.inflight -= 1
            self.inflight_bytes -= size

        task.add_done_callback(done)


class _WatchedDecoder:
    """A FrameDecoder that tells its guard when a frame starts and when none is pending."""

    __slots__ = ("_guard", "_inner")

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard

    @property
    def buffered(self) -> int:
        return self._inner.buffered

    @property
    def max_length(self) -> int:
        return self._inner.max_length

    def feed(self, data: Any) -> list:
        frames = self._inner.feed(data)
        if self._inner.buffered:
            # a frame is incomplete: a new one if frames completed before it in this chunk
            if frames or self._guard.partial_since is None:
                self._guard.partial_started()
        elif self._guard.partial_since is not None:
            self._guard.partial_since = None
        return frames


class ConnectionGuard:
    """One connection's side of the limits: admission, in-flight checks, the frame timer."""

    def __init__(self, conn: Connection, admission: Admission) -> None:
        self.conn = conn
        self.admission = admission
        self.limits = admission.limits
        self.partial_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.refusal: str | None = None
        if admission.connections >= self.limits.max_connections:
            admission.refused_connections += 1
            self.refusal = (f"too many connections ({admission.connections} open, limit "
                            f"{self.limits.max_connections}, agent.ttrpc_max_connections)")
            admission._warn_refused(peer=conn.peer, open=admission.connections,
                                    limit=self.limits.max_connections)
            self._timer = self._loop.call_later(self.limits.refuse_grace, self._close_refused)
        else:
            admission.connections += 1

    @property
    def admitted(self) -> bool:
        return self.refusal is None

    def watch(self, decoder: Any) -> Any:
        """Wrap the connection's decoder (same interface) so that a stalled partial frame is noticed."""
        return _WatchedDecoder(decoder, self)

    # -- requests -------------------------------------------------------------------

    def clear(self, length: int, payload: bytes | None, inflight: int) -> bool:
        """Whether nothing stops this request: the usual case, told in one call per request
        (``refuse`` and ``busy`` say what does, when something does)."""
        lim = self.limits
        adm = self.admission
        return (self.refusal is None and payload is not None and inflight < lim.max_inflight
                and adm.inflight < lim.max_inflight_total
                and adm.inflight_bytes + length <= lim.max_inflight_bytes)

    def refuse(self, length: int, payload: bytes | None) -> str | None:
        """Why this request frame is refused at once (a refused connection: RESOURCE_EXHAUSTED;
        an oversized frame: INVALID_ARGUMENT, as the upstream agent), or None."""
        if self.refusal is not None:
            # Answer this one, then close: the reply is flushed before the close runs.
            self._loop.call_soon(self._close_transport)
            return self.refusal
        if payload is None:
            return f"message length {length} exceed maximum message size of {self.limits.max_message}"
        return None

    def busy(self, length: int) -> str | None:
        """Why a valid request of ``length`` bytes cannot start now (in-flight limits), or None."""
        return self.admission.request_refusal(self.conn.inflight, length)

    def track(self, task: asyncio.Future, length: int) -> None:
        self.admission.track(task, length)

    # -- partial frames ---------------------------------------------------------------

    def partial_started(self) -> None:
        self.partial_since = now = self._loop.time()
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_at(now + self.limits.frame_timeout, self._check_partial)

    def _check_partial(self) -> None:
        self._timer = None
        since = self.partial_since
        if since is None or self._closed:
            return
        deadline = since + self.limits.frame_timeout
        if self._loop.time() >= deadline:
            self.conn._abort(f"a frame stayed incomplete for {self.limits.frame_timeout:g}s "
                             "(agent.ttrpc_frame_timeout)")
            return
        self._timer = self._loop.call_at(deadline, self._check_partial)

    # -- end --------------------------------------------------------------------------

    def _close_refused(self) -> None:
        self._timer = None
        self._close_transport()

    def _close_transport(self) -> None:
        transport = self.conn.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def close(self) -> None:
        """The connection is gone: give back its slot, stop the timer."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.refusal is None:
            self.admission.connections -= 1
