"""Log forwarding: JSON lines to one reader, a bounded buffer while nobody reads, the number
dropped reported to the next reader, and a log call that never blocks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time

import pytest

from kagent import log as klog
from kagent.logforward import LogForwarder, address_for

SUBSYSTEM = "obs-fwd-test"


@pytest.fixture
def logger():
    """A logger of the agent's tree, at debug, whose records reach only the forwarder."""
    base = logging.getLogger(f"{klog.ROOT}.{SUBSYSTEM}")
    base.setLevel(logging.DEBUG)
    base.propagate = False
    try:
        yield klog.get_logger(SUBSYSTEM), base
    finally:
        for h in list(base.handlers):
            base.removeHandler(h)
        base.propagate = True
        base.setLevel(logging.NOTSET)


async def _forwarder(base, tmp_sock_dir, **kw) -> tuple[LogForwarder, str]:
    fwd = LogForwarder(**kw)
    fwd.install(base)
    path = os.path.join(tmp_sock_dir, "log.sock")
    await fwd.start("unix://" + path)
    return fwd, path


async def _read_lines(reader: asyncio.StreamReader, n: int, timeout: float = 5) -> list[dict]:
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            line = await reader.readline()
            assert line, f"EOF after {len(out)} lines"
            out.append(json.loads(line))
    return out


async def test_buffered_lines_reach_the_reader_then_lines_stream(logger, tmp_sock_dir):
    log, base = logger
    fwd, path = await _forwarder(base, tmp_sock_dir)
    try:
        log.info("before anyone listens", n=1)
        log.debug("also before", n=2)
        reader, writer = await asyncio.open_unix_connection(path)
        first = await _read_lines(reader, 2)
        assert [r["msg"] for r in first] == ["before anyone listens", "also before"]
        for r in first:  # the same shape as the stderr lines
            assert r["name"] == "kata-agent" and r["source"] == "agent" and r["subsystem"] == SUBSYSTEM
            assert r["pid"] == os.getpid() and r["time"].endswith("Z")
        assert first[1]["level"] == "debug" and first[1]["n"] == 2
        log.warning("live", container_id="c1")
        (live,) = await _read_lines(reader, 1)
        assert live["msg"] == "live" and live["container_id"] == "c1" and live["level"] == "warning"
        writer.close()
    finally:
        await fwd.close()


async def test_overflow_keeps_the_newest_and_reports_the_count(logger, tmp_sock_dir):
    log, base = logger
    fwd, path = await _forwarder(base, tmp_sock_dir, max_bytes=8192)
    try:
        total = 500
        for i in range(total):
            log.info("line", i=i)
        assert fwd.buffered_bytes <= 8192
        reader, writer = await asyncio.open_unix_connection(path)
        report = (await _read_lines(reader, 1))[0]
        assert report["msg"] == "log lines dropped" and report["level"] == "warning"
        dropped = report["dropped"]
        kept = await _read_lines(reader, total - dropped)
        assert [r["i"] for r in kept] == list(range(dropped, total))  # newest kept, in order
        log.info("after")
        assert (await _read_lines(reader, 1))[0]["msg"] == "after"  # no second report
        writer.close()
    finally:
        await fwd.close()


async def test_a_reader_that_does_not_read_never_blocks_logging(logger, tmp_sock_dir):
    log, base = logger
    fwd, path = await _forwarder(base, tmp_sock_dir, max_bytes=64 << 10)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(path)
        sock.setblocking(False)
        await asyncio.sleep(0.05)  # accepted
        assert fwd.connected
        blob = "x" * 1000
        started = time.perf_counter()
        for i in range(20000):  # ~20 MB of log while the reader reads nothing
            log.info("flood", i=i, blob=blob)
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the loop write what the socket takes
        elapsed = time.perf_counter() - started
        assert elapsed < 10, f"logging took {elapsed:.1f} s"
        assert fwd.buffered_bytes <= 64 << 10  # bounded
        # The reader finally reads: it gets the report and the newest lines.
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        seen_report = False
        last = -1
        async with asyncio.timeout(10):
            while last != 19999:
                rec = json.loads(await reader.readline())
                if rec["msg"] == "log lines dropped":
                    seen_report = True
                    assert rec["dropped"] > 0
                else:
                    assert rec["i"] > last
                    last = rec["i"]
        assert seen_report
        writer.close()
    finally:
        await fwd.close()


async def test_lines_from_other_threads_are_forwarded(logger, tmp_sock_dir):
    log, base = logger
    fwd, path = await _forwarder(base, tmp_sock_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        await asyncio.sleep(0.05)
        threads = [threading.Thread(target=lambda k=k: [log.info("thread", t=k, i=i) for i in range(50)])
                   for k in range(4)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        got = await _read_lines(reader, 200)
        for k in range(4):
            assert [r["i"] for r in got if r["t"] == k] == list(range(50))
        writer.close()
    finally:
        await fwd.close()


async def test_a_new_reader_replaces_the_old_and_a_gap_is_buffered(logger, tmp_sock_dir):
    log, base = logger
    fwd, path = await _forwarder(base, tmp_sock_dir)
    try:
        r1, w1 = await asyncio.open_unix_connection(path)
        log.info("one")
        assert (await _read_lines(r1, 1))[0]["msg"] == "one"
        r2, w2 = await asyncio.open_unix_connection(path)
        async with asyncio.timeout(5):
            assert await r1.read() == b""  # the old reader is closed
        log.info("two")
        assert (await _read_lines(r2, 1))[0]["msg"] == "two"
        w2.close()
        async with asyncio.timeout(5):
            while fwd.connected:
                await asyncio.sleep(0.01)
        log.info("while nobody listens")
        r3, w3 = await asyncio.open_unix_connection(path)
        assert (await _read_lines(r3, 1))[0]["msg"] == "while nobody listens"
        w1.close()
        w3.close()
    finally:
        await fwd.close()
    assert not os.path.exists(path)


async def test_close_flushes_what_is_buffered(logger, tmp_sock_dir):
    log, base = logger
    fwd, path = await _forwarder(base, tmp_sock_dir)
    reader, writer = await asyncio.open_unix_connection(path)
    await asyncio.sleep(0.05)
    for i in range(100):
        log.info("last words", i=i)
    await fwd.close()
    data = await asyncio.wait_for(reader.read(), 5)
    assert [json.loads(x)["i"] for x in data.splitlines()] == list(range(100))
    writer.close()


def test_log_call_without_a_loop_only_buffers(logger):
    log, base = logger
    fwd = LogForwarder(max_bytes=2048)
    fwd.install(base)
    for i in range(100):
        log.info("no loop yet", i=i)
    assert 0 < fwd.buffered_bytes <= 2048 and fwd.dropped > 0
    assert address_for(1025) == "vsock://-1:1025"
