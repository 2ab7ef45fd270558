"""kagent.log: JSON lines."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import re
import time

import pytest

from kagent import log

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")
REQUIRED = {"time", "level", "msg", "name", "pid", "source", "subsystem"}


@pytest.fixture
def stream():
    buf = io.StringIO()
    log.setup("trace", stream=buf)
    yield buf
    log.setup("info", stream=None)


def lines(buf: io.StringIO) -> list[dict]:
    text = buf.getvalue()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_line_shape(stream):
    before = time.time_ns()
    log.get_logger("rpc").info("rpc done", rpc="Check", duration_ms=0.1)
    after = time.time_ns()
    (rec,) = lines(stream)
    assert REQUIRED <= set(rec)
    assert rec["level"] == "info" and rec["msg"] == "rpc done"
    assert rec["name"] == "kata-agent" and rec["source"] == "agent"
    assert rec["pid"] == os.getpid() and rec["subsystem"] == "rpc"
    assert rec["rpc"] == "Check" and rec["duration_ms"] == 0.1
    assert TIME_RE.match(rec["time"]), rec["time"]
    seconds = calendar.timegm(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert before <= seconds * 10**9 + int(rec["time"][20:29]) <= after
    assert list(rec)[:7] == ["time", "level", "msg", "name", "pid", "source", "subsystem"]


@pytest.mark.parametrize("ns,text", [
    (0, "1970-01-01T00:00:00.000000000Z"),
    (1_796_315_876_123_456_789, "2026-12-03T16:37:56.123456789Z"),
    (1_796_315_876_000_000_001, "2026-12-03T16:37:56.000000001Z"),
])
def test_format_time_ns(ns, text):
    assert log.format_time_ns(ns) == text


@pytest.mark.parametrize("method,level", [
    ("trace", "trace"), ("debug", "debug"), ("info", "info"), ("warning", "warning"),
    ("error", "error"), ("critical", "critical"),
])
def test_level_names(stream, method, level):
    getattr(log.get_logger("x"), method)("hello")
    assert [r["level"] for r in lines(stream)] == [level]


@pytest.mark.parametrize("setting,emitted", [
    ("trace", ["trace", "debug", "info", "warning", "error", "critical"]),
    ("debug", ["debug", "info", "warning", "error", "critical"]),
    ("info", ["info", "warning", "error", "critical"]),
    ("warning", ["warning", "error", "critical"]),
    ("warn", ["warning", "error", "critical"]),
    ("error", ["error", "critical"]),
    ("critical", ["critical"]),
])
def test_levels_filter(stream, setting, emitted):
    log.set_level(setting)
    lg = log.get_logger("x")
    for method in ("trace", "debug", "info", "warning", "error", "critical"):
        getattr(lg, method)(method)
    assert [r["level"] for r in lines(stream)] == emitted


def test_unknown_level_means_info(stream):
    log.set_level("loud")
    lg = log.get_logger("x")
    lg.debug("hidden")
    lg.info("shown")
    recs = lines(stream)
    assert recs[0]["msg"] == "unknown log level, using info" and recs[0]["level"] == "warning"
    assert [r["msg"] for r in recs[1:]] == ["shown"]


def test_log_method_takes_names_and_numbers(stream):
    lg = log.get_logger("x")
    lg.log("debug", "a")
    lg.log(logging.ERROR, "b")
    lg.log(log.TRACE, "c")
    assert [(r["level"], r["msg"]) for r in lines(stream)] == [
        ("debug", "a"), ("error", "b"), ("trace", "c")]


def test_fields_kwargs_extra_and_bind(stream):
    lg = log.get_logger("rpc").bind(container_id="c1")
    lg.info("one", exec_id="e1", code=0)
    lg.info("two", extra={"fields": {"rpc": "Check"}, "other": 1})
    lg.info("three %s %d", "x", 7, rpc="Exec")
    recs = lines(stream)
    assert recs[0]["container_id"] == "c1" and recs[0]["exec_id"] == "e1" and recs[0]["code"] == 0
    assert recs[1]["rpc"] == "Check" and recs[1]["other"] == 1 and recs[1]["container_id"] == "c1"
    assert recs[2]["msg"] == "three x 7" and recs[2]["rpc"] == "Exec"


def test_reserved_field_names_do_not_clobber(stream):
    log.get_logger("x").info("real", msg="fake", level="fake", subsystem="fake", time=1)
    (rec,) = lines(stream)
    assert rec["msg"] == "real" and rec["level"] == "info" and rec["subsystem"] == "x"
    assert rec["field.msg"] == "fake" and rec["field.time"] == 1


def test_non_serialisable_fields(stream):
    class Thing:
        def __str__(self):
            return "a thing"

    class Broken:
        def __str__(self):
            raise RuntimeError("no")

    cyclic: list = []
    cyclic.append(cyclic)
    log.get_logger("x").info(
        "odd", thing=Thing(), path=b"/bin", s={1}, nan=float("nan"), broken=Broken(),
        keys={(1, 2): "tuple key"}, cyclic=cyclic, surrogate="\udcff", uni="é",
    )
    (rec,) = lines(stream)
    assert rec["thing"] == "a thing"
    assert rec["path"] == "b'/bin'"
    assert rec["s"] == "{1}"
    assert rec["nan"] == "nan"
    assert rec["broken"].startswith("<") and "Broken" in rec["broken"]
    assert isinstance(rec["keys"], str) and isinstance(rec["cyclic"], str)
    assert rec["surrogate"] == "\udcff" and rec["uni"] == "é"
    assert stream.getvalue().isascii()


def test_exception_info(stream):
    lg = log.get_logger("rpc")
    try:
        raise ValueError("bad input")
    except ValueError:
        lg.exception("rpc failed", rpc="Check")
        lg.warning("with exc_info", exc_info=True)
    lg.error("explicit", exc_info=KeyError("k"))
    lg.error("no exception active", exc_info=True)
    recs = lines(stream)
    assert recs[0]["level"] == "error" and recs[0]["rpc"] == "Check"
    assert recs[0]["error"] == "ValueError: bad input"
    assert "Traceback" in recs[0]["traceback"] and "raise ValueError" in recs[0]["traceback"]
    assert recs[1]["level"] == "warning" and recs[1]["error"] == "ValueError: bad input"
    assert recs[2]["error"] == "KeyError: 'k'"
    assert "error" not in recs[3] and "traceback" not in recs[3]


def test_stack_info(stream):
    log.get_logger("x").info("where", stack_info=True)
    (rec,) = lines(stream)
    assert "test_stack_info" in rec["stack"]


def test_bad_format_args_do_not_raise(stream):
    log.get_logger("x").info("%d items", "not a number")
    log.get_logger("x").info("%s %s", "only one")
    recs = lines(stream)
    assert recs[0]["msg"].startswith("%d items") and recs[1]["msg"].startswith("%s %s")


def test_plain_logging_loggers_in_the_tree(stream):
    logging.getLogger("kagent.ttrpc").warning("plain %s", "call")
    logging.getLogger("kagent").error("top")
    recs = lines(stream)
    assert (recs[0]["subsystem"], recs[0]["msg"]) == ("ttrpc", "plain call")
    assert recs[1]["subsystem"] == "root"
    assert all(TIME_RE.match(r["time"]) for r in recs)


def test_closed_stream_does_not_raise():
    buf = io.StringIO()
    log.setup("debug", stream=buf)
    try:
        buf.close()
        before = log.dropped()
        lg = log.get_logger("x")
        lg.info("into the void", x=1)
        lg.exception("also into the void")
        assert log.dropped() == before + 2
    finally:
        log.setup("info", stream=None)


def test_broken_pipe_does_not_raise():
    r, w = os.pipe()
    f = os.fdopen(w, "w")
    os.close(r)
    log.setup("info", stream=f)
    try:
        log.get_logger("x").info("nobody reads this " * 10000)
    finally:
        log.setup("info", stream=None)
        try:
            f.close()
        except BrokenPipeError:
            pass


def test_setup_is_idempotent():
    a, b = io.StringIO(), io.StringIO()
    log.setup("info", stream=a)
    log.setup("info", stream=b)
    try:
        log.get_logger("x").info("once")
        assert a.getvalue() == "" and len(lines(b)) == 1
        assert len(logging.getLogger("kagent").handlers) == 1
        assert logging.getLogger("kagent").propagate is False
    finally:
        log.setup("info", stream=None)


def test_default_stream_is_current_stderr(capsys):
    log.setup("info")
    log.get_logger("x").info("to stderr")
    (rec,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert rec["msg"] == "to stderr"


def test_disabled_call_is_cheap(stream):
    log.set_level("info")
    lg = log.get_logger("x")
    n = 100_000
    t0 = time.perf_counter()
    for i in range(n):
        lg.debug("never", i=i, container_id="c")
    disabled = (time.perf_counter() - t0) / n
    assert stream.getvalue() == ""
    t0 = time.perf_counter()
    for i in range(1000):
        lg.info("always", i=i, container_id="c")
    enabled = (time.perf_counter() - t0) / 1000
    # A disabled call is a method call and a dict lookup: far below emitting a record.
    assert disabled < 5e-6 and disabled * 10 < enabled, (disabled, enabled)


def test_is_a_logger_adapter():
    assert isinstance(log.get_logger("x"), logging.LoggerAdapter)
    assert logging.getLevelName(log.TRACE) == "TRACE"
