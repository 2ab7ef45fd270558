"""Boot a guest under QEMU (TCG) with kagent as its init, and drive it from the host.

    vm = GuestVM(image, workdir, append="agent.log=debug").start()
    async with vm.agent() as calls:              # kagent's client over the virtio-serial socket
        await calls.Check()
    vm.qmp.execute("device_add", driver="virtio-blk-pci", id="vd1", drive="d1")
    vm.stop()                                    # QMP quit, then kill by PID

QEMU's host side (reference/vm-boot.md):
- the agent's port is a virtserialport named agent.channel.0 on a unix socket
  chardev (the agent listens on ``serial://agent.channel.0``);
- the serial console (ttyS0) is a second unix socket chardev whose output is
  also logged to ``console.log``: the agent's logs, and the debug console;
- QMP on a third socket, for hot-plug;
- ``-device pvpanic -action panic=exit-failure``: a guest kernel panic exits QEMU
  with status 1, a clean power-off with 0.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator

from kagent import protocols
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

QEMU = "qemu-system-x86_64"
BASE_APPEND = "console=ttyS0 panic=-1 quiet agent.server_addr=serial://agent.channel.0"
BOOT_TIMEOUT = float(os.environ.get("KAGENT_VM_BOOT_TIMEOUT", "90"))


def qemu_path() -> str | None:
    return shutil.which(QEMU)


class QMPError(RuntimeError):
    pass


class QMP:
    """A minimal synchronous QMP client (greeting, capabilities, commands; events kept)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        self.events: list[dict] = []
        self._ids = itertools.count(1)
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QMPError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg_id = next(self._ids)
        msg: dict = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


class Calls:
    """RPCs by name on one client: ``await calls.CreateContainer(container_id=..., ...)``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str):
        method = protocols.find(name)

        async def call(timeout: float | None = 60, **fields):
            return await self.client.call(method.service, method.name, method.request(**fields),
                                          method.response, timeout=timeout)

        return call


class GuestVM:
    def __init__(self, kernel: str, initrd: str, workdir: str, append: str = "",
                 smp: str = "1,maxcpus=2", memory: str = "512M", extra_args: tuple[str, ...] = ()) -> None:
        self.kernel = kernel
        self.initrd = initrd
        self.workdir = workdir
        self.append = f"{BASE_APPEND} {append}".strip()
        self.smp = smp
        self.memory = memory
        self.extra_args = extra_args
        self.agent_sock = os.path.join(workdir, "agent.sock")
        self.serial_sock = os.path.join(workdir, "serial.sock")
        self.qmp_sock = os.path.join(workdir, "qmp.sock")
        self.console_log = os.path.join(workdir, "console.log")
        self.qemu_log = os.path.join(workdir, "qemu.log")
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.started_at = 0.0
        self.boot_seconds: float | None = None  # QEMU start → first Check answered
        self.lost_probes = 0  # Checks unanswered on a fresh connection (agent())

    def argv(self) -> list[str]:
        return [
            qemu_path() or QEMU, "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
            "-machine", "pc", "-m", self.memory, "-smp", self.smp,
            "-kernel", self.kernel, "-initrd", self.initrd, "-append", self.append,
            "-chardev", f"socket,id=ser0,path={self.serial_sock},server=on,wait=off,logfile={self.console_log}",
            "-serial", "chardev:ser0",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=ch0,path={self.agent_sock},server=on,wait=off",
            "-device", "virtserialport,chardev=ch0,name=agent.channel.0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-device", "pvpanic", "-action", "panic=exit-failure",
            *self.extra_args,
        ]

    def start(self) -> GuestVM:
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.qemu_log, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.qmp_sock) and os.path.exists(self.agent_sock)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start (rc {self.proc.poll()}): {self.qemu_output()}")
            time.sleep(0.02)
        self.qmp = QMP(self.qmp_sock)
        return self

    # -- the agent --------------------------------------------------------------------------

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Block until the agent answers Check; the seconds since QEMU started."""
        import asyncio

        async def check() -> None:
            client = await Client.connect("unix://" + self.agent_sock, timeout=10)
            try:
                await Calls(client).Check(timeout=timeout)
            finally:
                await client.close()

        try:
            asyncio.run(check())
        except Exception as exc:
            raise RuntimeError(f"the agent did not answer Check within {timeout:g}s ({exc}); "
                               f"QEMU {'exited ' + str(self.proc.poll()) if self.proc.poll() is not None else 'runs'}; "
                               f"console:\n{self.console()[-6000:]}") from None
        self.boot_seconds = time.monotonic() - self.started_at
        return self.boot_seconds

    @contextlib.asynccontextmanager
    async def agent(self, probe_timeout: float = 10.0) -> AsyncIterator[Calls]:
        """A client on the agent's port (one at a time: the chardev takes one connection).

        Each new connection is first probed with Check.  A probe that gets no answer is
        counted in ``lost_probes`` and the connection is made again, so that a request lost
        across a host reconnect (see test_serial_reconnects) does not fail unrelated tests."""
        for attempt in range(3):
            client = await Client.connect("unix://" + self.agent_sock, timeout=10)
            try:
                await Calls(client).Check(timeout=probe_timeout)
                break
            except RpcError as exc:
                await client.close()
                if exc.code != Code.DEADLINE_EXCEEDED or attempt == 2:
                    raise
                self.lost_probes += 1
                print(f"warning: Check got no answer on a new connection ({exc}); connecting again")
        try:
            yield Calls(client)
        finally:
            await client.close()

    # -- the console --------------------------------------------------------------------------

    def console(self) -> str:
        try:
            with open(self.console_log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def console_records(self) -> list[dict]:
        """The agent's JSON log lines on the console."""
        out = []
        for line in self.console().splitlines():
            start = line.find('{"time"')
            if start >= 0:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line[start:]))
        return out

    def qemu_output(self) -> str:
        try:
            with open(self.qemu_log, errors="replace") as f:
                return f.read()[-2000:]
        except FileNotFoundError:
            return ""

    def serial(self) -> SerialConsole:
        return SerialConsole(self.serial_sock)

    # -- the end -------------------------------------------------------------------------------

    def wait(self, timeout: float) -> int | None:
        """QEMU's exit status, or None if it still runs after ``timeout`` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        if self.qmp is not None:
            with contextlib.suppress(OSError, QMPError):
                if self.proc is not None and self.proc.poll() is None:
                    self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        if self.proc is None:
            return None
        if self.wait(10) is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # our own QEMU, by PID
            self.proc.wait()
        return self.proc.returncode


def boot(image, workdir: str, append: str, **kw) -> GuestVM:
    """Start a guest from a vm.build_initrd.Image and wait until the agent answers."""
    vm = GuestVM(str(image.kernel.vmlinux), str(image.initrd), workdir, append=append, **kw).start()
    try:
        print(f"guest booted: Check answered {vm.wait_ready():.1f}s after QEMU started")
    except BaseException:
        vm.stop()
        raise
    return vm


def dump_on_failure(vm: GuestVM, request) -> None:
    """Print the guest console when a test of the session failed (pytest shows it)."""
    if getattr(request.session, "testsfailed", 0) or os.environ.get("KAGENT_VM_SHOW_CONSOLE"):
        print(f"--- guest console ({vm.console_log}) ---\n{vm.console()[-20000:]}")
        print(f"--- qemu ---\n{vm.qemu_output()}")


class SerialConsole:
    """The guest's ttyS0 (its output is in console.log as well)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.seen = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def expect(self, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        want = marker.encode()
        while want not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            if not chunk:
                return False
            self.seen += chunk
        return True

    def close(self) -> None:
        self.sock.close()


# --- containers in the guest ----------------------------------------------------------------

GUEST_ROOTFS = "/usr/share/kagent/rootfs"  # vm.build_initrd.ROOTFS, inside the guest


def guest_spec(script: str, *, namespaces: tuple[str, ...] = ("pid", "network", "ipc", "uts", "mount"),
               mounts: list[dict] | None = None, resources: dict | None = None,
               caps: tuple[str, ...] = ()) -> dict:
    """A busybox container on the image's rootfs running ``sh -c script``."""
    from kagent import devtools

    spec = devtools.default_spec(GUEST_ROOTFS, ["/bin/sh", "-c", script])
    spec["linux"]["namespaces"] = [{"type": t} for t in namespaces]
    if "uts" not in namespaces:
        del spec["hostname"]  # the guest's (the sandbox's) hostname is shared
    spec["mounts"] += mounts or []
    if resources:
        spec["linux"]["resources"] = resources
    for kind in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][kind] += list(caps)
    return spec


def bind(source: str, destination: str, *options: str) -> dict:
    return {"destination": destination, "type": "bind", "source": source, "options": ["rbind", *options]}


def xfail_if_unimplemented(exc: BaseException, rpc: str) -> None:
    """An RPC another part of kagent does not implement yet: xfail naming it, never a skip."""
    import pytest

    from kagent.ttrpc.codes import Code
    from kagent.ttrpc.status import RpcError

    if isinstance(exc, RpcError) and exc.code == Code.UNIMPLEMENTED:
        pytest.xfail(f"{rpc}: UNIMPLEMENTED: {exc.message}")


async def read_all(calls: Calls, cid: str, exec_id: str, stream: str = "stdout") -> bytes:
    read = calls.ReadStdout if stream == "stdout" else calls.ReadStderr
    chunks = []
    while True:
        r = await read(container_id=cid, exec_id=exec_id, len=65536, timeout=None)
        if not r.data:
            return b"".join(chunks)
        chunks.append(r.data)


async def create(calls: Calls, cid: str, spec: dict, **kw) -> None:
    from kagent import oci

    await calls.CreateContainer(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec), **kw)


async def run(calls: Calls, cid: str, spec: dict) -> tuple[int, bytes, bytes]:
    """create, start, both streams, wait, remove."""
    import asyncio

    await create(calls, cid, spec)
    await calls.StartContainer(container_id=cid)
    out, err, status = await asyncio.gather(
        read_all(calls, cid, cid), read_all(calls, cid, cid, "stderr"),
        calls.WaitProcess(container_id=cid, exec_id=cid, timeout=None))
    await calls.RemoveContainer(container_id=cid)
    return status.status, out, err
