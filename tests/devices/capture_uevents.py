"""Capture real uevents on this machine, printed in the fixtures/uevents.txt format.

    sudo .venv/bin/python tests/devices/capture_uevents.py

Everything it triggers is its own: a network namespace (with its own sysfs mount, in its
own mount namespace) holding a veth pair and the synthetic `add` of its `lo`, and a loop
device attached to a file it created and detached again.  The namespace goes away with
its holder process, which it kills by PID.  Not a test; the vectors it printed once are
the "captured" ones in the fixture file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devices_netns import NetnsHolder, uevent_socket_in  # noqa: E402


def drain(sock: socket.socket, label: str, out: list, settle: float = 0.3) -> None:
    time.sleep(settle)
    while True:
        try:
            data, _anc, _flags, addr = sock.recvmsg(65536)
        except BlockingIOError:
            return
        if addr[0] == 0:
            out.append((label, data))


def render(name: str, origin: str, data: bytes) -> str:
    parts = data.rstrip(b"\0").split(b"\0")
    lines = [p.decode("ascii", "backslashreplace") for p in parts]
    return f"== {name} ({origin})\n" + "\n".join(lines) + "\n"


def main() -> None:
    got: list[tuple[str, bytes]] = []
    with NetnsHolder() as ns:
        sock = uevent_socket_in(ns.pid)
        try:
            ns.run("ip", "link", "add", "kagv0", "type", "veth", "peer", "name", "kagv1")
            drain(sock, "veth-add", got)
            ns.run("sh", "-c", "echo add > /sys/class/net/lo/uevent")
            drain(sock, "lo-synthetic-add", got)
            ns.run("ip", "link", "del", "kagv0")
            drain(sock, "veth-del", got)
            with tempfile.NamedTemporaryFile(prefix="kagent-loop-") as img:
                img.truncate(1 << 20)
                img.flush()
                dev = subprocess.run(["losetup", "-f", "--show", img.name], check=True,
                                     capture_output=True, text=True).stdout.strip()
                try:
                    drain(sock, "loop-attach", got)
                finally:
                    subprocess.run(["losetup", "-d", dev], check=True)
                drain(sock, "loop-detach", got)
        finally:
            sock.close()
    # Untagged events of other processes (their loop devices, say) reach the namespace too.
    ours = (b"/net/kagv", b"/net/lo\0", b"/block/" + os.path.basename(dev).encode() + b"\0")
    for i, (label, data) in enumerate(got):
        if any(mark in data for mark in ours):
            print(render(f"{label}-{i}", "captured", data))


if __name__ == "__main__":
    main()
