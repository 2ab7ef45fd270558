"""JSON-lines logging: one JSON object per line, shaped like the upstream agent's slog_json.

    {"time": "2026-12-03T16:37:56.123456789Z", "level": "info", "msg": "rpc done",
     "name": "kata-agent", "pid": 1, "source": "agent", "subsystem": "rpc",
     "rpc": "Check", "duration_ms": 0.1}

Use ``get_logger(subsystem)``; keyword arguments become fields::

    log = get_logger("rpc")
    log.info("rpc done", rpc="Check", duration_ms=0.1)
    log.exception("rpc failed", rpc="Check")        # adds "error" and "traceback"
    clog = log.bind(container_id=cid)               # fields carried by every record

A log call never raises: a record that cannot be written (closed stream, broken pipe) is
dropped and counted in ``dropped()``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import IO, Any

__all__ = [
    "TRACE",
    "JsonFormatter",
    "JsonLinesHandler",
    "KagentLogger",
    "dropped",
    "get_logger",
    "set_level",
    "setup",
]

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

ROOT = "kagent"  # the logger tree that setup() configures
NAME = "kata-agent"
SOURCE = "agent"

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
    "critical": logging.CRITICAL,
}
_NAMES = {
    TRACE: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
# Keys that every record has: a field with one of these names is renamed "field.<name>".
_RESERVED = frozenset({"time", "level", "msg", "name", "pid", "source", "subsystem",
                       "error", "traceback", "stack"})
# Keyword arguments of a log call that are not fields.
_CALL_KWARGS = ("exc_info", "stack_info", "stacklevel", "extra")


def _level_number(level: str | int) -> int | None:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        return _LEVELS.get(level.strip().lower())
    return None


def _level_name(levelno: int) -> str:
    name = _NAMES.get(levelno)
    if name is not None:
        return name
    # A custom level: the name of the nearest standard level at or below it.
    for number in sorted(_NAMES, reverse=True):
        if levelno >= number:
            return _NAMES[number]
    return "trace"


# ---------------------------------------------------------------------------------------------
# Formatting.

_second_cache: tuple[int, str] = (-1, "")


def format_time_ns(ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds: 2026-12-03T16:37:56.123456789Z."""
    global _second_cache
    sec, frac = divmod(ns, 1_000_000_000)
    cached_sec, text = _second_cache
    if cached_sec != sec:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second_cache = (sec, text)
    return f"{text}.{frac:09d}Z"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return object.__repr__(value)
        except Exception:  # pragma: no cover - object.__repr__ does not fail
            return "<unprintable>"


_ENCODER = json.JSONEncoder(default=_safe_str, allow_nan=False, separators=(",", ":"))
_dumps = _ENCODER.encode


def _record_message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # bad %-format arguments: show what we were given
        return f"{_safe_str(record.msg)} {_safe_str(record.args)}"


class JsonFormatter(logging.Formatter):
    """A LogRecord → one line of JSON (no newline)."""

    def format(self, record: logging.LogRecord) -> str:
        time_ns = getattr(record, "kagent_time_ns", None)
        if time_ns is None:
            time_ns = int(record.created * 1e9)
        subsystem = getattr(record, "kagent_subsystem", None)
        if subsystem is None:
            name = record.name
            subsystem = name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else "root"
        out: dict[str, Any] = {
            "time": format_time_ns(time_ns),
            "level": _level_name(record.levelno),
            "msg": _record_message(record),
            "name": NAME,
            "pid": record.process if record.process is not None else os.getpid(),
            "source": SOURCE,
            "subsystem": subsystem,
        }
        fields = getattr(record, "kagent_fields", None)
        if fields:
            for key, value in fields.items():
                key = key if isinstance(key, str) else _safe_str(key)
                out["field." + key if key in _RESERVED else key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = _safe_str(exc)
            out["error"] = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            out["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["error"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        try:
            return _dumps(out)
        except (TypeError, ValueError, RecursionError):
            # A field that json cannot take (NaN, non-str dict keys, a cycle): str() it.
            for key, value in out.items():
                try:
                    _dumps(value)
                except (TypeError, ValueError, RecursionError):
                    out[key] = _safe_str(value)
            return _dumps(out)


class JsonLinesHandler(logging.Handler):
    """Writes each record as one JSON line; never raises (a failed write is counted)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.stream = stream  # None: sys.stderr at the time of the write
        self.dropped = 0
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            stream = self.stream if self.stream is not None else sys.stderr
            stream.write(line)
            stream.flush()
        except Exception:
            self.dropped += 1

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.dropped += 1


# ---------------------------------------------------------------------------------------------
# The adapter: keyword arguments are fields.


class KagentLogger(logging.LoggerAdapter[logging.Logger]):
    """``log.info("msg", key=value, ...)``: keyword arguments become JSON fields.

    ``exc_info``, ``stack_info``, ``stacklevel`` and ``extra`` keep their logging meaning; the
    fields of ``extra={"fields": {...}}`` are added too, and other ``extra`` keys become fields.
    """

    def __init__(self, logger: logging.Logger, subsystem: str,
                 fields: Mapping[str, object] | None = None) -> None:
        super().__init__(logger, {"kagent_subsystem": subsystem})
        self.subsystem = subsystem
        self.fields: dict[str, object] = dict(fields or {})

    def bind(self, **fields: object) -> KagentLogger:
        """A logger for the same subsystem whose records all carry ``fields``."""
        return KagentLogger(self.logger, self.subsystem, {**self.fields, **fields})

    # Each level method checks isEnabledFor first, so a disabled call costs only that check.
    # `msg` is positional-only so that a field may be called "msg".

    def trace(self, msg: object, /, *args: object, **kwargs: Any) -> None:
        if self.logger.isEnabledFor(TRACE):
            self._emit(TRACE, msg, args, kwargs)

    def debug(self, msg: object, /, *args: object,  # type: ignore[override]
              **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, msg, args, kwargs)

    def info(self, msg: object, /, *args: object,  # type: ignore[override]
             **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, msg, args, kwargs)

    def warning(self, msg: object, /, *args: object,  # type: ignore[override]
                **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, msg, args, kwargs)

    warn = warning  # type: ignore[assignment]

    def error(self, msg: object, /, *args: object,  # type: ignore[override]
              **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, msg, args, kwargs)

    def exception(self, msg: object, /, *args: object,  # type: ignore[override]
                  exc_info: Any = True,
                  **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, msg, args, {**kwargs, "exc_info": exc_info})

    def critical(self, msg: object, /, *args: object,  # type: ignore[override]
                 **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.CRITICAL):
            self._emit(logging.CRITICAL, msg, args, kwargs)

    fatal = critical

    def log(self, level: int | str, msg: object, /, *args: object,  # type: ignore[override]
            **kwargs: Any) -> None:
        number = _level_number(level)
        if number is not None and self.logger.isEnabledFor(number):
            self._emit(number, msg, args, kwargs)

    def _emit(self, level: int, msg: object, args: tuple[object, ...],
              kwargs: dict[str, Any]) -> None:
        try:
            exc_info = kwargs.pop("exc_info", None)
            stack_info = bool(kwargs.pop("stack_info", False))
            kwargs.pop("stacklevel", None)
            fields: dict[str, object] = dict(self.fields)
            extra = kwargs.pop("extra", None)
            if isinstance(extra, Mapping):
                for key, value in extra.items():
                    if key == "fields" and isinstance(value, Mapping):
                        fields.update(value)
                    else:
                        fields[key] = value
            fields.update(kwargs)
            record_extra = {
                "kagent_subsystem": self.subsystem,
                "kagent_fields": fields,
                "kagent_time_ns": time.time_ns(),
            }
            if exc_info:
                if isinstance(exc_info, BaseException):
                    exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
                elif not isinstance(exc_info, tuple):
                    exc_info = sys.exc_info()
            sinfo = None
            if stack_info:
                frames = traceback.format_stack(sys._getframe(2))
                sinfo = "Stack (most recent call last):\n" + "".join(frames).rstrip("\n")
            # Build the record here rather than through Logger.log: that would walk the stack
            # to find the caller's file and line, which the JSON line does not show.
            logger = self.logger
            record = logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, args,
                                       exc_info, None, record_extra, sinfo)
            logger.handle(record)
        except Exception:  # a log call never raises
            pass


# ---------------------------------------------------------------------------------------------
# Set-up.

_lock = threading.Lock()
_handler: JsonLinesHandler | None = None


def _root() -> logging.Logger:
    return logging.getLogger(ROOT)


def setup(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send the ``kagent`` logger tree to ``stream`` (default: stderr) as JSON lines.

    Idempotent: calling it again replaces the stream and level, never adds a second handler.
    ``level`` is one of trace, debug, info, warning, error, critical (aliases warn, fatal,
    panic accepted); an unknown level means info, and a warning is logged.
    """
    global _handler
    with _lock:
        root = _root()
        if _handler is None:
            _handler = JsonLinesHandler(stream)
        else:
            _handler.stream = stream
        for h in list(root.handlers):
            if h is not _handler:
                root.removeHandler(h)
        if _handler not in root.handlers:
            root.addHandler(_handler)
        root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    """Change the level of the whole ``kagent`` tree."""
    number = _level_number(level)
    _root().setLevel(number if number is not None else logging.INFO)
    if number is None:
        get_logger("log").warning("unknown log level, using info", level=_safe_str(level))


def get_logger(subsystem: str) -> KagentLogger:
    """The logger for one subsystem (``rpc``, ``ttrpc``, ``config``, ``zygote`` ...)."""
    return KagentLogger(logging.getLogger(f"{ROOT}.{subsystem}"), subsystem)


def dropped() -> int:
    """How many records could not be written since setup()."""
    return _handler.dropped if _handler is not None else 0
