"""Agent policy: every request checked against a Rego policy (upstream's ``agent-policy``).

In confidential deployments the host is not trusted, so the agent itself decides which
requests it honours.  Before each grpc.AgentService call the request, as JSON, is the input
to ``data.agent_policy.<RequestMessageName>``; the result is a boolean, or an object
``{"allowed": bool, "ops": [JSON patch]}`` whose ops update the policy's data (upstream
keeps its state under ``data.pstate``) for later decisions.

The engine is rego-cpp (``regopy``).  A policy is compiled once per load into a bundle
with one entry point per request name; only a change of its data (``ops``) compiles again,
because a rego-cpp bundle carries its data.  Decisions are serialized: a stateful policy
sees the requests one at a time, in the order they arrived.

The input has upstream's shape, the serde JSON of its rust-protobuf messages
(kagent.policy_input); ``ops`` are applied with kagent.jsonpatch.

rego-cpp writes ``print()`` output (and compile errors) to C++ ``std::cout``, i.e. fd 1:
while the engine runs, fd 1 points at a memfd and what lands there becomes the prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from kagent import protocols
from kagent.errors import AgentError, InvalidArgument, PermissionDenied
from kagent.jsonpatch import PatchError, apply_patch  # re-exported: the policy's API
from kagent.log import get_logger
from kagent.policy_input import request_input  # re-exported: the policy's API
from kagent.protocols import agent_pb2

log = get_logger("policy")

DEFAULT_POLICY_FILE = "/etc/kata-opa/default-policy.rego"
PACKAGE = "agent_policy"
FEATURE = "agent-policy"  # AgentDetails.extra_features
MAX_POLICY_BYTES = 16 << 20  # upstream's limit for a policy document
ALLOW_FAILURES_RULE = "AllowRequestsFailingPolicy"
INITIAL_DATA: dict[str, Any] = {"pstate": {}}  # upstream's policy state lives under data.pstate
OFFLOAD_BYTES = 1024  # requests larger than this (serialized) are decided off the event loop

AGENT_SERVICE = "grpc.AgentService"
RULES: tuple[str, ...] = tuple(sorted(
    {m.request.DESCRIPTOR.name for m in protocols.methods().values() if m.service == AGENT_SERVICE}
    | {ALLOW_FAILURES_RULE}))


class PolicyLoadError(Exception):
    """The policy text cannot be read or compiled."""


# Rego: comments and blank lines, then the package.  rego-cpp compiles a text without one
# (or with another package): the agent_policy rules would then all be undefined, every
# request refused, SetPolicy included, until the agent restarts.
_PACKAGE_LINE = re.compile(r"\A(?:[ \t\r\n]++|#[^\n]*+)*+package[ \t]+" + PACKAGE + r"(?=[ \t\r\n#;]|\Z)")


def check_policy_text(text: str) -> None:
    """Refuse a policy the engine would take but the agent could never decide with."""
    if "\0" in text:  # rego-cpp reads a C string: it would silently drop the rest
        raise PolicyLoadError("the policy contains a NUL byte")
    if not _PACKAGE_LINE.match(text):
        raise PolicyLoadError(f"the policy must begin with 'package {PACKAGE}' "
                              f"(the agent asks data.{PACKAGE}.<RequestName>)")


# The request as upstream's serde JSON, and JSON patch for stateful policies, live in
# their own modules; their public names are re-exported here.

# --- the Rego engine -------------------------------------------------------------------------

class _Stdout:
    """Catch what rego-cpp writes to fd 1 (std::cout) while it runs: prints and compile errors.

    A process-wide redirection, so it is taken under the engine's lock, and only around the
    engine's calls; anything else written to fd 1 in that window lands here too (the agent's
    own logs go to stderr).
    """

    def __init__(self) -> None:
        self._fd = os.memfd_create("kagent-policy-prints", os.MFD_CLOEXEC)
        self._libc = ctypes.CDLL(None)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def captured(self):
        with self._lock:
            with contextlib.suppress(Exception):
                sys.stdout.flush()  # our own pending output goes where it was meant to go
            self._libc.fflush(None)
            try:
                saved = os.dup(1)
            except OSError:
                saved = -1  # fd 1 is closed: leave it closed afterwards
            os.dup2(self._fd, 1)
            out: list[str] = []
            try:
                yield out
            finally:
                self._libc.fflush(None)  # std::cout writes through C stdout's buffer
                if saved >= 0:
                    os.dup2(saved, 1)
                    os.close(saved)
                else:
                    os.close(1)
                size = os.lseek(self._fd, 0, os.SEEK_CUR)
                if size:
                    out.append(os.pread(self._fd, size, 0).decode(errors="replace"))
                    os.ftruncate(self._fd, 0)
                    os.lseek(self._fd, 0, os.SEEK_SET)


_the_stdout: _Stdout | None = None


def _stdout() -> _Stdout:
    global _the_stdout
    if _the_stdout is None:
        _the_stdout = _Stdout()
    return _the_stdout


def _regopy():
    import regopy
    from regopy import rego_shared

    return regopy, rego_shared


class _InputError(ValueError):
    pass


class _NulInInput(_InputError):
    """A string of the request holds a NUL byte, which rego-cpp's C API cannot take."""

    def __init__(self) -> None:
        super().__init__("a string contains a NUL byte")
        self.where: list[str] = []  # innermost first, added as the error goes up

    def field(self) -> str:
        return "input" + "".join(reversed(self.where))


class Engine:
    """A compiled policy and its data; every call is serialized by a lock.

    Not async: the caller decides whether a call runs on the event loop or in a thread.
    """

    def __init__(self, text: str, data: dict[str, Any] | None = None, *, name: str = PACKAGE) -> None:
        check_policy_text(text)
        self.text = text
        self.name = name
        self.data = copy.deepcopy(INITIAL_DATA if data is None else data)
        self._lock = threading.Lock()
        self._regopy, self._rs = _regopy()
        self._stdout = _stdout()
        self._query = self._regopy.Interpreter()
        self._bundle = self._compile(self.data)
        self.allow_failures = False
        try:
            value, _ = self.evaluate(ALLOW_FAILURES_RULE, {})
            self.allow_failures = value is True
        except AgentError:
            pass  # an AllowRequestsFailingPolicy that fails means "no"

    def _compile(self, data: dict[str, Any]):
        rego = self._regopy.Interpreter()
        with self._lock, self._stdout.captured() as errors:
            try:
                rego.add_module(self.name, self.text)
                rego.add_data_json(json.dumps(data))
                return rego.build(None, [f"{PACKAGE}/{rule}" for rule in RULES])
            except self._rs.RegoError as exc:
                failure: Exception = exc
        # rego-cpp prints a readable report (minus its ~~~ and --- rules); the exception is an AST dump
        lines = [line.strip() for line in "".join(errors).splitlines()]
        detail = " ".join(line for line in lines if line and not set(line) <= set("-~^ "))
        raise PolicyLoadError((detail or " ".join(str(failure).split()))[:2000])

    def evaluate(self, rule: str, doc: dict[str, Any]) -> tuple[Any, str]:
        """(value, prints) of ``data.agent_policy.<rule>`` for input ``doc``; value None = undefined.

        Raises AgentError (INTERNAL) when the policy fails at evaluation, InvalidArgument
        when ``doc`` holds a string the engine cannot be given (a NUL byte).
        """
        rs = self._rs
        lib = rs.rego
        with self._lock, self._stdout.captured() as printed:
            handle = lib.regoNewInput()
            try:
                _put(lib, handle, doc)
                rs.rego_set_input(self._query._impl, handle)
            except _NulInInput as exc:  # the host's to fix, and never decided: refused as invalid
                raise InvalidArgument(f"{rule}: {exc.field()} contains a NUL byte, "
                                      "which the policy engine cannot be given") from None
            except (rs.RegoError, _InputError) as exc:
                raise AgentError(f"{rule}: internal error: policy input rejected: {exc}") from None
            finally:
                lib.regoFreeInput(handle)
            out = lib.regoBundleQueryEntrypoint(self._query._impl, self._bundle._impl,
                                                f"{PACKAGE}/{rule}".encode())
            if not out:
                raise AgentError(f"{rule}: internal error: policy query failed: "
                                 f"{rs.rego_get_error(self._query._impl)}")
            try:
                ok = lib.regoOutputOk(out)
                text = rs.rego_output_string(out) if ok else _errors(rs, lib.regoOutputNode(out))
            finally:
                lib.regoFreeOutput(out)
        prints = " ".join(line.strip() for line in "".join(printed).splitlines() if line.strip())
        if not ok:
            raise AgentError(f"{rule}: internal error: policy evaluation failed: {text}")
        if text == "undefined":
            return None, prints
        try:
            results = json.loads(text)
            if isinstance(results, list):
                (results,) = results
            (value,) = results["expressions"]
        except (ValueError, KeyError, TypeError):
            raise AgentError(f"{rule}: internal error: unexpected policy result {text[:200]}") from None
        return value, prints

    def apply(self, ops: Any) -> None:
        """Patch the data with ``ops`` and compile again (rego-cpp bundles carry their data)."""
        data = apply_patch(self.data, ops)
        if not isinstance(data, dict):
            raise PatchError("the data document must stay an object")
        self._bundle = self._compile(data)
        self.data = data


def _put(lib, handle, value: Any) -> None:
    """Build a rego-cpp input term from a JSON-like value, through its C API."""
    kind = type(value)
    if kind is str:
        raw = value.encode()
        if b"\0" in raw:  # a C string would silently cut it short
            raise _NulInInput()
        lib.regoInputString(handle, raw)
    elif kind is dict:
        for key, item in value.items():
            try:
                _put(lib, handle, key)
                _put(lib, handle, item)
            except _NulInInput as exc:
                exc.where.append(f".{key}" if str(key).isidentifier() else f"[{key!r}]")
                raise
            lib.regoInputObjectItem(handle)
        lib.regoInputObject(handle, len(value))
    elif kind is list:
        for i, item in enumerate(value):
            try:
                _put(lib, handle, item)
            except _NulInInput as exc:
                exc.where.append(f"[{i}]")
                raise
        lib.regoInputArray(handle, len(value))
    elif kind is bool:
        lib.regoInputBoolean(handle, value)
    elif kind is int:
        if -(1 << 63) <= value < (1 << 63):
            lib.regoInputInt(handle, value)
        else:  # a uint64 beyond int64: the nearest number rather than a wrapped one
            lib.regoInputFloat(handle, float(value))
    elif value is None:
        lib.regoInputNull(handle)
    elif kind is float:
        lib.regoInputFloat(handle, value)
    else:
        raise _InputError(f"cannot pass a {kind.__name__} to the policy")


def _errors(rs, node) -> str:
    """The messages of an error node: (rego-errorseq (error (errormsg ...) ... (errorcode ...)))."""
    texts = []
    for i in range(rs.rego_node_size(node)):
        error = rs.rego_node_get(node, i)
        parts = []
        for j in range(rs.rego_node_size(error)):
            child = rs.rego_node_get(error, j)
            if rs.rego.regoNodeType(child) in (1801, 1803):  # ErrorMsg, ErrorCode
                with contextlib.suppress(rs.RegoError):
                    parts.append(rs.rego_node_value(child))
        texts.append(" ".join(p for p in parts if p))
    return "; ".join(t for t in texts if t) or "unknown error"


# --- what the agent enforces -----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    rule: str
    allowed: bool
    prints: str = ""
    reason: str = ""  # why a denial was turned into an allow, or why a rule denied

    def denial(self) -> PermissionDenied:
        text = self.prints if not self.reason else f"{self.prints} ({self.reason})".lstrip()
        return PermissionDenied(f"{self.rule} is blocked by policy: {text}")


def policy_path(configured: str | None, default_file: str = DEFAULT_POLICY_FILE) -> str | None:
    """The policy to load at start-up: the configured file, else the default one if it exists."""
    if configured:
        return configured
    return default_file if os.path.exists(default_file) else None


def read_policy(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyLoadError(f"{path} is larger than {MAX_POLICY_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise PolicyLoadError(f"{path} is not UTF-8 text") from None


class AgentPolicy:
    """The agent's policy state: none (allow all), an engine, or a failed load (refuse all)."""

    def __init__(self, engine: Engine | None = None, failure: str | None = None) -> None:
        self.engine = engine
        self.failure = failure  # why the start-up policy did not load; cleared by SetPolicy
        self._order = asyncio.Lock()  # decisions in arrival order, one at a time
        # Called once when a first policy makes this enforcing (there is no way back): the
        # agent puts the interceptor on the RPC path only then, so no policy costs nothing.
        self.on_enforcing: Callable[[], None] | None = None

    @classmethod
    def load(cls, configured: str | None, default_file: str = DEFAULT_POLICY_FILE) -> AgentPolicy:
        """The start-up policy.  Never raises: a policy that fails to load refuses every request."""
        path = policy_path(configured, default_file)
        if path is None:
            log.info("no agent policy: every request is allowed")
            return cls()
        try:
            engine = Engine(read_policy(path))
        except PolicyLoadError as exc:
            log.error("agent policy failed to load: every request is refused until SetPolicy",
                      path=path, error=str(exc))
            return cls(failure=f"{path}: {exc}")
        log.info("agent policy loaded", path=path, allow_failures=engine.allow_failures)
        return cls(engine)

    @property
    def enforcing(self) -> bool:
        return self.engine is not None or self.failure is not None

    async def check(self, request: Message) -> Decision:
        async with self._order:
            return await self._decide(request.DESCRIPTOR.name, request)

    async def _decide(self, rule: str, request: Message) -> Decision:
        if self.failure is not None:
            return Decision(rule, False, reason=f"the agent policy failed to load: {self.failure}")
        engine = self.engine
        if engine is None:
            return Decision(rule, True)
        doc = request_input(request)
        heavy = request.ByteSize() > OFFLOAD_BYTES  # a big input costs ~1 ms: keep the loop free
        value, prints = await _run(heavy, engine.evaluate, rule, doc)
        decision = await self._interpret(engine, rule, value, prints)
        if log.isEnabledFor(logging.DEBUG):
            shown = {"policy_bytes": len(doc.get("policy", ""))} if rule == "SetPolicyRequest" else doc
            log.debug("policy decision", rule=rule, allowed=decision.allowed, result=value,
                      prints=prints, reason=decision.reason, input=shown)
        return decision

    async def _interpret(self, engine: Engine, rule: str, value: Any, prints: str) -> Decision:
        if value is None:
            allowed, reason = False, f"rule data.{PACKAGE}.{rule} is undefined"
        elif isinstance(value, bool):
            allowed, reason = value, ""
        elif isinstance(value, dict) and isinstance(value.get("allowed"), bool):
            allowed, reason = value["allowed"], ""
            ops = value.get("ops")
            if allowed and ops:
                try:  # compiles again: off the loop, still in order
                    await asyncio.to_thread(engine.apply, ops)
                except (PatchError, PolicyLoadError) as exc:
                    raise AgentError(f"{rule}: internal error: policy ops cannot be applied: {exc}") from None
        else:
            raise AgentError(f"{rule}: internal error: unexpected policy result {json.dumps(value)[:200]}")
        if not allowed and engine.allow_failures:
            log.warning("request failing the policy allowed (AllowRequestsFailingPolicy)",
                        rule=rule, prints=prints, reason=reason)
            return Decision(rule, True, prints, reason or "denied")
        return Decision(rule, allowed, prints, reason)

    async def set_policy(self, request: agent_pb2.SetPolicyRequest) -> None:
        """SetPolicy: allowed by the current policy's SetPolicyRequest rule, then replace it.

        A policy that does not compile is refused and the current one stays.  In the failed
        start-up state there is no policy to ask: SetPolicy is how the agent recovers.
        """
        async with self._order:
            if self.engine is not None:
                decision = await self._decide("SetPolicyRequest", request)
                if not decision.allowed:
                    raise decision.denial()
            try:  # before compiling, so that the message does not call it a compile error
                check_policy_text(request.policy)
            except PolicyLoadError as exc:
                raise InvalidArgument(f"SetPolicy: {exc}") from None
            try:
                engine = await asyncio.to_thread(Engine, request.policy)
            except PolicyLoadError as exc:
                raise InvalidArgument(f"SetPolicy: the policy does not compile: {exc}") from None
            was_enforcing = self.enforcing
            self.engine, self.failure = engine, None
            if not was_enforcing and self.on_enforcing is not None:
                self.on_enforcing()
        log.info("agent policy replaced", policy_bytes=len(request.policy),
                 allow_failures=engine.allow_failures)

    async def interceptor(self, ctx, request: Message, call_next: Callable[[], Awaitable[Message]]) -> Message:
        """The ttRPC interceptor: every grpc.AgentService call is decided before it runs."""
        if ctx.service != AGENT_SERVICE or not self.enforcing:
            return await call_next()
        rule = ctx.request_name
        if rule == "SetPolicyRequest":
            return await call_next()  # SetPolicy decides inside its handler, atomically
        try:
            decision = await self.check(request)
        except AgentError as exc:
            if rule != "ReadStreamRequest":
                raise
            log.error("policy failed on a read: its data is withheld", rpc=ctx.method, error=exc.message)
            decision = Decision(rule, False)
        if decision.allowed:
            return await call_next()
        if rule == "ReadStreamRequest":
            # Withhold the data but still read it, so that the container's pipe never fills.
            _withhold(await call_next())
            log.debug("read withheld by policy", rpc=ctx.method, prints=decision.prints)
            return agent_pb2.ReadStreamResponse()
        log.info("request blocked by policy", rpc=ctx.method, prints=decision.prints,
                 reason=decision.reason)
        raise decision.denial()


def _withhold(response: Any) -> None:
    """Throw a read's reply away.  A reply still in the pipe (kagent.stdio's RawReply, which
    holds the stream until sent or discarded) is read out first, or the pipe keeps its bytes."""
    if isinstance(response, Message) or not hasattr(response, "discard"):
        return
    try:
        os.read(response.stream.fd, min(response.ready, response.size))
    except BlockingIOError:
        pass
    except (AttributeError, OSError) as exc:
        log.warning("withheld read: its bytes stay in the pipe", error=str(exc))
    finally:
        response.discard()


async def _run(offload: bool, fn: Callable, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args) if offload else fn(*args)
