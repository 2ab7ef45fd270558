"""Agent configuration: kernel command line, TOML file, environment and flags → one AgentConfig.

Sources, in increasing priority::

    defaults ← kernel command line ← TOML file ← environment ← command-line flags

One table of option specs (``OPTIONS``) drives every source: each option names its dataclass
field, its parser, and the key it has in each source (kernel command line, TOML, environment).
The default is the dataclass field's default.

An invalid value never stops the agent: it is reported in ``AgentConfig.warnings`` and ignored,
so the value from the lower-priority sources (in the end, the default) stays in effect.
``load()`` never raises.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kagent.ttrpc import addresses

__all__ = [
    "AgentConfig",
    "OPTIONS",
    "Option",
    "load",
    "normalise_log_level",
    "parse_bool",
    "parse_cmdline",
    "parse_duration",
    "parse_go_duration",
    "validate_server_addr",
]

PROC_CMDLINE = "/proc/cmdline"
MAX_FILE_SIZE = 1 << 20  # a config file or kernel command line larger than this is refused
MAX_VSOCK_PORT = addresses.MAX_VSOCK_PORT
MAX_PIPE_SIZE = 0x7FFFFFFF  # F_SETPIPE_SZ takes an int


@dataclass(frozen=True)
class AgentConfig:
    log_level: str = "info"  # trace, debug, info, warning, error, critical
    dev_mode: bool = False
    debug_console: bool = False
    debug_console_vport: int = 0
    debug_console_addr: str | None = None  # tests/developers: serve the console on unix:///path
    log_vport: int = 0
    log_addr: str | None = None  # tests/developers: forward logs on unix:///path
    metrics_addr: str | None = None  # HOST:PORT (or unix://, vsock://) for GET /metrics
    trace_addr: str = "vsock://2:10240"  # where spans go (the host's trace forwarder)
    trace_file: str | None = None  # spans as JSON lines to this file instead
    server_addr: str = "vsock://-1:1024"
    tracing: bool = False
    hotplug_timeout: float = 3.0  # seconds
    unified_cgroup_hierarchy: bool = False
    container_pipe_size: int = 0
    passfd_listener_port: int = 0
    passfd_listener_addr: str | None = None  # tests/developers: the passfd listener on unix:///path
    config_file: str | None = None
    policy_file: str | None = None
    cgroup_parent: str = "kagent"  # top-level cgroup that kagent owns in each hierarchy
    # ttRPC server resource bounds (kagent.ttrpc.limits says what each one bounds and why)
    ttrpc_max_connections: int = 64
    ttrpc_max_inflight: int = 1024  # requests in progress on one connection
    ttrpc_max_inflight_total: int = 4096
    ttrpc_max_inflight_bytes: int = 64 << 20  # request bytes held by requests in progress
    ttrpc_max_message_size: int = 4 << 20  # upstream ttrpc's messageLengthMax; also the maximum
    ttrpc_frame_timeout: float = 30.0  # seconds a started frame may stay incomplete
    warnings: tuple[str, ...] = ()  # every option rejected, and why

    def to_json_dict(self) -> dict[str, Any]:
        """All fields, JSON-ready (for ``kagent --print-config``)."""
        out = dataclasses.asdict(self)
        out["hotplug_timeout"] = float(self.hotplug_timeout)
        out["ttrpc_frame_timeout"] = float(self.ttrpc_frame_timeout)
        out["warnings"] = list(self.warnings)
        return out


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(AgentConfig) if f.name != "warnings"
}


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes a string (kernel command line, environment) or a native TOML value
# and returns the parsed value, or raises ValueError with a short reason.

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool:
    """1/0, true/false, yes/no, on/off (case-insensitive)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("invalid boolean (use 1/0, true/false, yes/no, on/off)")


_LOG_LEVELS = {
    "trace": "trace",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "critical",
    "panic": "critical",
    "critical": "critical",
}
_VERBOSITY = {"trace": 0, "debug": 1, "info": 2, "warning": 3, "error": 4, "critical": 5}


def normalise_log_level(text: str) -> str:
    """A logrus/slog level name → trace, debug, info, warning, error or critical."""
    try:
        return _LOG_LEVELS[text.strip().lower()]
    except KeyError:
        raise ValueError("invalid log level (use trace, debug, info, warn, error, fatal)") from None


_GO_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_GO_UNIT_RE = "|".join(sorted((re.escape(u) for u in _GO_UNITS_NS), key=len, reverse=True))
_GO_TERM = re.compile(rf"([0-9]*)(?:\.([0-9]*))?({_GO_UNIT_RE})")
_MAX_DURATION_NS = (1 << 63) - 1  # Go's time.Duration is an int64 of nanoseconds


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration``, returned in seconds.

    ``[+-]`` then one or more ``<number><unit>`` terms, number = digits with an optional
    fraction, unit = ns, us, µs, ms, s, m, h. ``"0"`` alone is allowed. Computed in integer
    nanoseconds like Go (fractions truncated to the nanosecond, int64 overflow is an error).
    A bare number other than 0 is an error, as in Go: see ``parse_duration``.
    """
    s = text
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("invalid duration")
    total = 0
    pos = 0
    while pos < len(s):
        m = _GO_TERM.match(s, pos)
        if m is None or (not m.group(1) and not m.group(2)):
            raise ValueError("invalid duration")
        whole, frac, unit = m.group(1), (m.group(2) or "")[:30], m.group(3)
        if len(whole) > 20:
            raise ValueError("invalid duration (out of range)")
        scale = _GO_UNITS_NS[unit]
        total += int(whole or "0") * scale + int(frac or "0") * scale // 10 ** len(frac)
        if total > _MAX_DURATION_NS + negative:
            raise ValueError("invalid duration (out of range)")
        pos = m.end()
    return (-total if negative else total) / 1e9


_BARE_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def parse_duration(text: str) -> float:
    """A Go duration (``10s``, ``1m30s``, ``500ms``) or a bare number of seconds (``10``, ``1.5``)."""
    s = text.strip()
    if _BARE_NUMBER.fullmatch(s):
        seconds = float(s)
        if not math.isfinite(seconds) or abs(seconds) * 1e9 > _MAX_DURATION_NS:
            raise ValueError("invalid duration (out of range)")
        return seconds
    return parse_go_duration(s)


def _p_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return parse_bool(value)
    raise ValueError("expected a boolean")


def _p_log_level(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a log level name")
    return normalise_log_level(value)


_DECIMAL = re.compile(r"\+?[0-9]+")


def _integer(value: object, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected {what}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-") and _DECIMAL.fullmatch(text[1:]):
            raise ValueError("must not be negative")
        if not _DECIMAL.fullmatch(text) or len(text) > 20:
            raise ValueError(f"invalid {what}")
        value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    if value > maximum:
        raise ValueError(f"{what} out of range (max {maximum})")
    return value


def _p_port(value: object) -> int:
    return _integer(value, "port number", MAX_VSOCK_PORT)


def _p_pipe_size(value: object) -> int:
    return _integer(value, "size in bytes", MAX_PIPE_SIZE)


MAX_MESSAGE_SIZE = 4 << 20  # upstream hosts neither send nor accept larger ttRPC frames
MIN_MESSAGE_SIZE = 4096


def _p_limit(value: object) -> int:
    """A count limit of the ttRPC server: 1 .. 2**20."""
    number = _integer(value, "number", 1 << 20)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _p_byte_limit(value: object) -> int:
    number = _integer(value, "size in bytes", 1 << 40)
    if number < MIN_MESSAGE_SIZE:
        raise ValueError(f"must be at least {MIN_MESSAGE_SIZE}")
    return number


def _p_message_size(value: object) -> int:
    number = _integer(value, "size in bytes", MAX_MESSAGE_SIZE)
    if number < MIN_MESSAGE_SIZE:
        raise ValueError(f"must be at least {MIN_MESSAGE_SIZE}")
    return number


def _p_timeout(value: object) -> float:
    """Seconds > 0: a Go duration or bare number (string), a number, or ``{secs=N, nanos=M}``."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise ValueError("invalid duration") from None
    elif isinstance(value, bool):
        raise ValueError("expected a duration")
    elif isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or abs(seconds) * 1e9 > _MAX_DURATION_NS:
            raise ValueError("invalid duration (out of range)")
    elif isinstance(value, dict):
        seconds = _duration_table(value)
    else:
        raise ValueError("expected a duration")
    if seconds <= 0:
        raise ValueError("duration must be greater than zero")
    return seconds


def _duration_table(table: dict[str, object]) -> float:
    """serde's std::time::Duration: ``{secs = N, nanos = M}``, both optional integers."""
    extra = set(table) - {"secs", "nanos"}
    if extra:
        raise ValueError(f"unexpected key {sorted(extra)[0]!r} in duration table")
    secs, nanos = table.get("secs", 0), table.get("nanos", 0)
    for name, part in (("secs", secs), ("nanos", nanos)):
        if isinstance(part, bool) or not isinstance(part, int) or part < 0:
            raise ValueError(f"duration {name} must be a non-negative integer")
    assert isinstance(secs, int) and isinstance(nanos, int)
    if nanos > 999_999_999:
        raise ValueError("duration nanos must be below 1000000000")
    if secs * 1_000_000_000 + nanos > _MAX_DURATION_NS:
        raise ValueError("invalid duration (out of range)")
    return secs + nanos / 1e9


def validate_server_addr(addr: str) -> str:
    """Check that ``addr`` is an address the agent can listen on; return it unchanged."""
    parsed = addresses.parse(addr)
    if parsed.scheme not in addresses.LISTEN_SCHEMES or not addr.startswith(parsed.scheme + "://"):
        raise ValueError(f"{addr!r} is a client-side address (the agent listens on unix, vsock or serial)")
    return addr


def _p_server_addr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an address string")
    return validate_server_addr(value)


def _p_listen_addr(value: object) -> str:
    """unix:///path, unix://@name or vsock://CID:PORT; a bare /path means unix://."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected an address")
    addr = value if "://" in value else "unix://" + value
    if addresses.parse(addr).scheme not in ("unix", "vsock"):
        raise ValueError("expected unix:///path or vsock://CID:PORT")
    return addr


def _p_metrics_addr(value: object) -> str:
    from kagent.rpcmetrics import parse_metrics_addr

    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT")
    parse_metrics_addr(value)
    return value


def _p_path(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a path string")
    if not value:
        raise ValueError("empty path")
    if "\0" in value:
        raise ValueError("path contains a NUL byte")
    return value


def _p_cgroup_parent(value: object) -> str:
    """A cgroup path relative to each hierarchy's root: ``kagent`` or ``a/b``; slashes trimmed."""
    if not isinstance(value, str):
        raise ValueError("expected a cgroup name")
    name = value.strip("/")
    parts = name.split("/")
    if not name or "\0" in name or any(p in ("", ".", "..") or p != p.strip() for p in parts):
        raise ValueError("invalid cgroup name")
    return name


def _p_cgroup_no_v1(value: object) -> bool:
    # A kernel option: only "all" concerns us; other values (controller lists) are not ours.
    if value == "all":
        return True
    raise ValueError("not 'all'")


# ---------------------------------------------------------------------------------------------
# The option table.


@dataclass(frozen=True)
class Option:
    field: str  # AgentConfig field
    parse: Callable[[object], Any]  # str or TOML value → value; ValueError(reason) if invalid
    cmdline: tuple[str, ...] = ()  # kernel command line keys
    toml: str | None = None  # TOML key
    env: str | None = None  # environment variable
    flag: bool = False  # the bare cmdline key (no "=value") means True
    quiet: bool = False  # someone else's option that we only peek at: never warn about it

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.field]


OPTIONS: tuple[Option, ...] = (
    Option("log_level", _p_log_level, cmdline=("agent.log",), toml="log_level",
           env="KATA_AGENT_LOG_LEVEL"),
    Option("dev_mode", _p_bool, cmdline=("agent.devmode",), toml="dev_mode", flag=True),
    Option("debug_console", _p_bool, cmdline=("agent.debug_console",), toml="debug_console",
           flag=True),
    Option("debug_console_vport", _p_port, cmdline=("agent.debug_console_vport",),
           toml="debug_console_vport"),
    Option("debug_console_addr", _p_listen_addr, cmdline=("agent.debug_console_addr",),
           toml="debug_console_addr", env="KAGENT_DEBUG_CONSOLE_ADDR"),
    Option("log_vport", _p_port, cmdline=("agent.log_vport",), toml="log_vport"),
    Option("log_addr", _p_listen_addr, cmdline=("agent.log_addr",), toml="log_addr",
           env="KAGENT_LOG_ADDR"),
    Option("metrics_addr", _p_metrics_addr, cmdline=("agent.metrics_addr",), toml="metrics_addr",
           env="KAGENT_METRICS_ADDR"),
    Option("trace_addr", _p_listen_addr, cmdline=("agent.trace_addr",), toml="trace_addr",
           env="KATA_AGENT_TRACE_ADDR"),
    Option("trace_file", _p_path, cmdline=("agent.trace_file",), toml="trace_file",
           env="KATA_AGENT_TRACE_FILE"),
    Option("server_addr", _p_server_addr, cmdline=("agent.server_addr",), toml="server_addr",
           env="KATA_AGENT_SERVER_ADDR"),
    Option("tracing", _p_bool, cmdline=("agent.trace",), toml="tracing",
           env="KATA_AGENT_TRACING", flag=True),
    Option("hotplug_timeout", _p_timeout, cmdline=("agent.hotplug_timeout",),
           toml="hotplug_timeout"),
    Option("unified_cgroup_hierarchy", _p_bool,
           cmdline=("agent.unified_cgroup_hierarchy", "systemd.unified_cgroup_hierarchy"),
           toml="unified_cgroup_hierarchy", flag=True),
    Option("unified_cgroup_hierarchy", _p_cgroup_no_v1, cmdline=("cgroup_no_v1",), quiet=True),
    Option("container_pipe_size", _p_pipe_size, cmdline=("agent.container_pipe_size",),
           toml="container_pipe_size"),
    Option("passfd_listener_port", _p_port, cmdline=("agent.passfd_listener_port",),
           toml="passfd_listener_port"),
    Option("passfd_listener_addr", _p_listen_addr, cmdline=("agent.passfd_listener_addr",),
           toml="passfd_listener_addr", env="KAGENT_PASSFD_LISTENER_ADDR"),
    Option("config_file", _p_path, cmdline=("agent.config_file",)),
    Option("policy_file", _p_path, cmdline=("agent.policy_file",), toml="policy_file",
           env="KATA_AGENT_POLICY_FILE"),
    Option("cgroup_parent", _p_cgroup_parent, cmdline=("agent.cgroup_parent",),
           toml="cgroup_parent"),
    Option("ttrpc_max_connections", _p_limit, cmdline=("agent.ttrpc_max_connections",),
           toml="ttrpc_max_connections"),
    Option("ttrpc_max_inflight", _p_limit, cmdline=("agent.ttrpc_max_inflight",),
           toml="ttrpc_max_inflight"),
    Option("ttrpc_max_inflight_total", _p_limit, cmdline=("agent.ttrpc_max_inflight_total",),
           toml="ttrpc_max_inflight_total"),
    Option("ttrpc_max_inflight_bytes", _p_byte_limit, cmdline=("agent.ttrpc_max_inflight_bytes",),
           toml="ttrpc_max_inflight_bytes"),
    Option("ttrpc_max_message_size", _p_message_size, cmdline=("agent.ttrpc_max_message_size",),
           toml="ttrpc_max_message_size"),
    Option("ttrpc_frame_timeout", _p_timeout, cmdline=("agent.ttrpc_frame_timeout",),
           toml="ttrpc_frame_timeout"),
)

_BY_CMDLINE = {key: opt for opt in OPTIONS for key in opt.cmdline}
_BY_TOML = {opt.toml: opt for opt in OPTIONS if opt.toml}
_BY_FIELD = {opt.field: opt for opt in reversed(OPTIONS)}  # a field's first option is its main one

# Upstream options that kagent does not implement (CoCo, proxies, mem-agent): warned as such.
_UPSTREAM_UNSUPPORTED = frozenset({
    "cdh_api_timeout", "image_pull_timeout", "cdi_timeout", "launch_process_timeout",
    "visible_cdi_devices", "https_proxy", "no_proxy", "guest_components_rest_api",
    "guest_components_procs", "secure_storage_integrity", "mem_agent_enable",
})


def _is_upstream_unsupported(name: str) -> bool:
    return name in _UPSTREAM_UNSUPPORTED or name.startswith("mem_agent_")


# ---------------------------------------------------------------------------------------------
# Rendering values in warnings.


def _show(text: str, limit: int = 120) -> str:
    """A value as it appears in a warning: printable, and not too long."""
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "…"


def _fmt_current(field: str, value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if field in ("hotplug_timeout", "ttrpc_frame_timeout"):
        return f"{value:g}s"
    return _show(str(value))


def _toml_repr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + _show(value) + '"'
    return _show(repr(value))


class _Layers:
    """The values set so far (field → value), over the defaults, and the warnings."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.warnings: list[str] = []

    def current(self, field: str) -> Any:
        return self.values.get(field, _DEFAULTS[field])

    def set(self, opt: Option, raw: object, shown: str) -> None:
        """Parse ``raw`` for ``opt``; on error warn ("<shown>: <reason>, using <current>")."""
        try:
            self.values[opt.field] = opt.parse(raw)
        except (ValueError, TypeError, OverflowError) as exc:
            if opt.quiet:
                return
            reason = str(exc) or "invalid value"
            current = _fmt_current(opt.field, self.current(opt.field))
            self.warnings.append(f"{shown}: {reason}, using {current}")


# ---------------------------------------------------------------------------------------------
# Sources.


def _split_cmdline(text: str) -> list[str]:
    """Split a kernel command line on whitespace outside double quotes (the quotes are dropped)."""
    tokens: list[str] = []
    cur: list[str] = []
    in_quote = False
    started = False
    for ch in text:
        if ch == '"':
            in_quote = not in_quote
            started = True
        elif ch.isspace() and not in_quote:
            if started:
                tokens.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(ch)
            started = True
    if started:
        tokens.append("".join(cur))
    return tokens


def _apply_cmdline(layers: _Layers, text: str) -> None:
    for token in _split_cmdline(text):
        key, eq, value = token.partition("=")
        opt = _BY_CMDLINE.get(key)
        if opt is None:
            if key.startswith("agent."):
                name = key[len("agent."):]
                if _is_upstream_unsupported(name):
                    layers.warnings.append(f"unsupported upstream option {_show(key)}, ignored")
                else:
                    layers.warnings.append(f"unknown option {_show(key)}")
            continue
        if not eq:
            if opt.flag:
                layers.values[opt.field] = True
            elif not opt.quiet:
                layers.warnings.append(
                    f"{key}: missing value, using {_fmt_current(opt.field, layers.current(opt.field))}"
                )
            continue
        layers.set(opt, value, f"{key}={_show(value)}")


def parse_cmdline(text: str) -> tuple[dict[str, Any], list[str]]:
    """Parse a kernel command line: (the options it sets, by AgentConfig field; warnings)."""
    layers = _Layers()
    _apply_cmdline(layers, text)
    return layers.values, layers.warnings


def _read_small_file(path: str, errors: str = "strict") -> str:
    """Read a regular file of at most MAX_FILE_SIZE bytes as UTF-8 (never blocks on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_FILE_SIZE:
                raise ValueError(f"larger than {MAX_FILE_SIZE} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _apply_toml(layers: _Layers, path: str) -> None:
    where = f"config file {_show(path)}"
    try:
        text = _read_small_file(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        layers.warnings.append(f"{where}: cannot read: {_describe_error(exc)}")
        return
    import tomllib  # here, not at start-up: most agents have no config file

    try:
        doc = tomllib.loads(text)
    except Exception as exc:  # TOMLDecodeError, or RecursionError on absurd nesting
        layers.warnings.append(f"{where}: invalid TOML: {_describe_error(exc)}")
        return
    for key, value in doc.items():
        opt = _BY_TOML.get(key)
        if opt is None:
            if _is_upstream_unsupported(key):
                layers.warnings.append(f"{where}: unsupported upstream key {_show(key)}, ignored")
            else:
                layers.warnings.append(f"{where}: unknown key {_show(key)}")
            continue
        layers.set(opt, value, f"{where}: {key} = {_toml_repr(value)}")


def _apply_env(layers: _Layers, environ: Mapping[str, str]) -> None:
    for opt in OPTIONS:
        if opt.env is None:
            continue
        value = environ.get(opt.env)
        if value:  # unset or empty: not set
            layers.set(opt, value, f"{opt.env}={_show(value)}")


def _apply_overrides(layers: _Layers, overrides: Mapping[str, object]) -> None:
    for field, value in overrides.items():
        if value is None:
            continue
        opt = _BY_FIELD.get(field)
        flag = "--" + str(field).replace("_", "-")
        if opt is None or field == "config_file":
            layers.warnings.append(f"unknown override {_show(str(field))}")
            continue
        shown = _show(value) if isinstance(value, str) else _toml_repr(value)
        layers.set(opt, value, f"{flag}={shown}")


def _finish(layers: _Layers) -> AgentConfig:
    values = layers.values
    # agent.devmode implies at least debug logging.
    if values.get("dev_mode") and _VERBOSITY[layers.current("log_level")] > _VERBOSITY["debug"]:
        values["log_level"] = "debug"
    return AgentConfig(**values, warnings=tuple(layers.warnings))


def load(
    cmdline: str | None = None,
    cmdline_file: str | None = None,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Build the agent's configuration from all sources. Never raises for bad input.

    cmdline: the kernel command line text; if None it is read from ``cmdline_file``
        (default /proc/cmdline).
    config_file: a TOML file (``--config``); takes the place of ``agent.config_file``.
    environ: the environment (default ``os.environ``).
    overrides: AgentConfig field → value from command-line flags (None values are skipped).
    """
    layers = _Layers()

    def guarded(stage: str, step: Callable[[], None]) -> None:
        # A safety net: a bug in a parser must not stop the agent either.
        try:
            step()
        except Exception as exc:  # pragma: no cover - only reached through a bug
            layers.warnings.append(f"internal error while reading the {stage}: {exc!r}")

    if cmdline is None:
        path = cmdline_file or PROC_CMDLINE
        try:
            cmdline = _read_small_file(path, errors="replace")
        except (OSError, ValueError) as exc:
            layers.warnings.append(
                f"cannot read the kernel command line {_show(path)}: {_describe_error(exc)}"
            )
            cmdline = ""
    text = cmdline
    guarded("kernel command line", lambda: _apply_cmdline(layers, text))

    if config_file is not None:
        layers.set(_BY_CMDLINE["agent.config_file"], config_file, f"--config={_show(config_file)}")
    toml_path = layers.values.get("config_file")
    if toml_path:
        guarded("config file", lambda: _apply_toml(layers, toml_path))

    env = os.environ if environ is None else environ
    guarded("environment", lambda: _apply_env(layers, env))
    if overrides:
        guarded("command-line flags", lambda: _apply_overrides(layers, overrides))
    return _finish(layers)
