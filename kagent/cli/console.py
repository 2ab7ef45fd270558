"""kagent-ctl console: an interactive session on the agent's debug console, from the host.

  kagent-ctl console --addr hvsock:///run/vc/firecracker/<id>/root/kata.hvsock:1026
  kagent-ctl console --addr vsock://<guest CID>:1026
  kagent-ctl console --addr /tmp/console.sock          (a unix socket: tests, developers)

The terminal is put in raw mode (restored on exit); the session ends when the shell exits,
when the agent closes the connection, or when the escape character (default Ctrl-]) is typed.

Window size: a kagent agent starts the session with a HELLO string (see kagent.console); only
then does this client send the terminal's size, at once and on every SIGWINCH.  Against an
upstream agent (no HELLO) the session is the plain byte stream that socat would give.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import sys
import termios
import time
import tty

from kagent.console.protocol import HELLO, encode_winsize

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONNECT = 3
HELLO_WAIT = 1.0  # how long to wait for the rest of a HELLO that started arriving
OPTIONS_WITH_VALUES = frozenset({"--addr", "-a", "--timeout", "-t", "--connect-timeout", "--repeat",
                                 "-n", "--escape"})


def wants(argv: list[str]) -> bool:
    """True when the first word of a kagent-ctl command line that is not an option is
    "console" (``kagent-ctl console --addr A`` or ``kagent-ctl --addr A console``)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in OPTIONS_WITH_VALUES:
            skip = True
            continue
        if word.startswith("-"):
            continue
        return word == "console"
    return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kagent-ctl console",
                                description="Open an interactive session on the agent's debug console.")
    p.add_argument("command", choices=["console"], help=argparse.SUPPRESS)
    p.add_argument("--addr", "-a", default=os.environ.get("KAGENT_CONSOLE_ADDR"),
                   help="hvsock://PATH:PORT, vsock://CID:PORT, unix:///path or a socket path "
                        "(default $KAGENT_CONSOLE_ADDR)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to retry connecting")
    p.add_argument("--escape", default="^]",
                   help="character that ends the session: ^X notation, or 'none' (default ^])")
    p.add_argument("--no-winsize", action="store_true", help="never send the window size")
    return p


def parse_escape(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if len(text) == 2 and text[0] == "^":
        return ord(text[1].upper()) ^ 0x40
    if len(text) == 1:
        return ord(text)
    raise ValueError(f"escape character {text!r}: use ^X, one character, or none")


def _connect_once(addr: str) -> socket.socket:
    from kagent.ttrpc.addresses import parse

    a = parse(addr if "://" in addr else "unix://" + addr)
    if a.scheme == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target: object = (a.cid, a.port)
    elif a.scheme in ("unix", "hvsock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target = a.path
    else:
        raise ValueError(f"cannot open a console on {addr!r}")
    try:
        sock.settimeout(10)
        sock.connect(target)
        if a.scheme == "hvsock":
            _hybrid_handshake(sock, a.port)
    except BaseException:
        sock.close()
        raise
    return sock


def _hybrid_handshake(sock: socket.socket, port: int) -> None:
    """Firecracker/Cloud Hypervisor hybrid vsock: "CONNECT port\\n" → "OK ...\\n"."""
    sock.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n") and len(line) < 512:
        chunk = sock.recv(1)  # byte by byte: what follows the line is the console's
        if not chunk:
            break
        line += chunk
    if not line.startswith(b"OK"):
        raise ConnectionError(f"hybrid vsock: CONNECT {port} refused: {line.strip()!r}")


def connect(addr: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _connect_once(addr)
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _winsize(fd: int) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        import struct

        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        if rows and cols:
            return rows, cols
    return None


class Session:
    """The copy loop: stdin → socket, socket → stdout, SIGWINCH → window size."""

    def __init__(self, sock: socket.socket, stdin: int, stdout: int, escape: int | None,
                 winsize: bool) -> None:
        self.sock = sock
        self.stdin = stdin
        self.stdout = stdout
        self.escape = escape
        self.allow_winsize = winsize
        self.winsize_on = False
        self.hello_buf: bytes | None = b""  # None once decided
        self.hello_deadline = 0.0
        self.out = bytearray()  # bytes for the socket

    def _decide_hello(self, data: bytes) -> bytes:
        """Strip HELLO from the start of the stream; returns the bytes for the terminal."""
        assert self.hello_buf is not None
        buf = self.hello_buf + data
        if buf.startswith(HELLO):
            self.hello_buf = None
            if self.allow_winsize:
                self.winsize_on = True
                self._queue_winsize()
            return buf[len(HELLO):]
        if HELLO.startswith(buf):
            self.hello_buf = buf
            if not self.hello_deadline:
                self.hello_deadline = time.monotonic() + HELLO_WAIT
            return b""
        self.hello_buf = None  # not a kagent console: a plain stream
        return buf

    def _queue_winsize(self) -> None:
        size = _winsize(self.stdin) or _winsize(self.stdout)
        if self.winsize_on and size:
            self.out += encode_winsize(*size)

    def _write_out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.stdout, view)
            except BlockingIOError:
                select.select([], [self.stdout], [])
                continue
            view = view[n:]

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: None)
        self.sock.setblocking(False)
        stdin_open = True
        try:
            while True:
                rlist = [self.sock, wake_r] + ([self.stdin] if stdin_open else [])
                wlist = [self.sock] if self.out else []
                timeout = None
                if self.hello_buf is not None and self.hello_deadline:
                    timeout = max(0.0, self.hello_deadline - time.monotonic())
                readable, writable, _ = select.select(rlist, wlist, [], timeout)
                if self.hello_buf is not None and self.hello_deadline and time.monotonic() >= self.hello_deadline:
                    held, self.hello_buf = self.hello_buf, None  # a partial HELLO was plain output
                    self._write_out(held)
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                    self._queue_winsize()
                if self.sock in readable:
                    try:
                        data = self.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except ConnectionResetError:
                        data = b""
                    if data == b"":
                        if self.hello_buf:
                            self._write_out(self.hello_buf)
                        return EXIT_OK  # the agent closed the session (the shell exited)
                    if data:
                        if self.hello_buf is not None:
                            data = self._decide_hello(data)
                        if data:
                            self._write_out(data)
                if stdin_open and self.stdin in readable:
                    data = os.read(self.stdin, 65536)
                    if not data:
                        stdin_open = False  # piped input done: keep showing output
                    elif self.escape is not None and self.escape in data:
                        self.out += data[:data.index(self.escape)]
                        self._flush_socket(final=True)
                        return EXIT_OK
                    else:
                        self.out += data
                if self.out and (self.sock in writable or not wlist):
                    self._flush_socket()
        finally:
            signal.signal(signal.SIGWINCH, old_winch)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)

    def _flush_socket(self, final: bool = False) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                if not final:
                    return
                select.select([], [self.sock], [], 1.0)
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.out.clear()
                return
            del self.out[:n]


@contextlib.contextmanager
def raw_terminal(fd: int):
    """Raw mode for the session, the terminal as it was afterwards (even on errors)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.addr:
        print("kagent-ctl console: --addr is required (or set KAGENT_CONSOLE_ADDR)", file=sys.stderr)
        return EXIT_USAGE
    try:
        escape = parse_escape(args.escape)
    except ValueError as exc:
        print(f"kagent-ctl console: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sock = connect(args.addr, args.connect_timeout)
    except (OSError, ValueError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"kagent-ctl console: cannot connect to {args.addr}: {text}", file=sys.stderr)
        return EXIT_CONNECT
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    if interactive and escape is not None:
        shown = args.escape if args.escape.startswith("^") else repr(args.escape)
        print(f"Connected to {args.addr}. Escape character is '{shown}'.", file=sys.stderr)
    session = Session(sock, stdin, stdout, escape if interactive else None, not args.no_winsize)
    try:
        with raw_terminal(stdin):
            rc = session.run()
    except KeyboardInterrupt:  # only reachable when stdin is not a raw terminal
        rc = 130
    except OSError as exc:
        if exc.errno not in (errno.EIO, errno.EPIPE):
            raise
        rc = EXIT_OK
    finally:
        sock.close()
    if interactive:
        print("\r\nkagent-ctl console: session closed.", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(["console", *sys.argv[1:]] if sys.argv[1:2] != ["console"] else sys.argv[1:]))
