"""Agent addresses: parse the URIs the agent listens on and clients dial.

  unix:///path            a unix socket file
  unix://@name            an abstract unix socket
  vsock://CID:PORT        AF_VSOCK; CID -1 (or empty) means any
  hvsock://PATH:PORT      hybrid vsock (client only): unix socket + "CONNECT PORT"
  serial:///dev/vportNpM  a virtio-serial character device
  serial://NAME           a virtio-serial port by name (/sys/class/virtio-ports/*/name)
  mock:///path            the Go runtime's name for a plain unix socket (client only)
"""

from __future__ import annotations

import glob
import os
import re
import socket
from dataclasses import dataclass

VMADDR_CID_ANY = 0xFFFFFFFF
MAX_VSOCK_PORT = 0xFFFFFFFE  # ports are u32; 0xFFFFFFFF is VMADDR_PORT_ANY
MAX_SUN_PATH = 107  # sizeof(sun_path) - 1
VIRTIO_PORTS = "/sys/class/virtio-ports"
LISTEN_SCHEMES = ("unix", "vsock", "serial")  # hvsock is the host's side of a vsock
_SERIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_NUMBER = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class Address:
    scheme: str  # unix | vsock | hvsock | serial
    path: str = ""  # unix path ("\0name" for abstract), hvsock socket, serial device or name
    cid: int = 0
    port: int = 0

    @property
    def abstract(self) -> bool:
        return self.scheme == "unix" and self.path.startswith("\0")

    def __str__(self) -> str:
        if self.scheme == "unix":
            return "unix://@" + self.path[1:] if self.abstract else "unix://" + self.path
        if self.scheme == "vsock":
            cid = -1 if self.cid == VMADDR_CID_ANY else self.cid
            return f"vsock://{cid}:{self.port}"
        if self.scheme == "hvsock":
            return f"hvsock://{self.path}:{self.port}"
        return f"serial://{self.path}"


def _port(text: str, uri: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"invalid port {text!r} in {uri!r}")
    port = int(text)
    if not 0 < port <= MAX_VSOCK_PORT:
        raise ValueError(f"port {port} out of range 1..{MAX_VSOCK_PORT} in {uri!r}")
    return port


def parse(uri: str) -> Address:
    """Parse an address URI; ValueError with a readable message when invalid."""
    if "\0" in uri:
        raise ValueError("address contains a NUL byte")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        if uri.startswith("remote:"):  # the Go runtime's remote:<path>
            scheme, rest = "unix", uri[len("remote:"):]
        else:
            raise ValueError(f"address {uri!r} has no scheme (unix://, vsock://, hvsock://, serial://)")
    if scheme in ("unix", "mock"):
        if rest.startswith("@"):
            if len(rest) < 2:
                raise ValueError(f"empty abstract socket name in {uri!r}")
            return Address("unix", "\0" + rest[1:])
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"expected unix:///absolute/path or unix://@abstract-name, not {uri!r}")
        if len(rest.encode("utf-8", "surrogateescape")) > MAX_SUN_PATH:
            raise ValueError(f"unix socket path longer than {MAX_SUN_PATH} bytes in {uri!r}")
        return Address("unix", rest)
    if scheme == "vsock":
        cid_text, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ValueError(f"vsock address needs CID:PORT in {uri!r}")
        if cid_text in ("", "-1"):
            cid = VMADDR_CID_ANY
        else:
            if not _NUMBER.fullmatch(cid_text):
                raise ValueError(f"invalid vsock CID {cid_text!r} in {uri!r}")
            cid = int(cid_text)
            if cid > 0xFFFFFFFF:
                raise ValueError(f"vsock CID {cid} out of range in {uri!r}")
        return Address("vsock", cid=cid, port=_port(port_text, uri))
    if scheme == "hvsock":
        path, sep, port_text = rest.rpartition(":")
        if not sep or not path.startswith("/"):
            raise ValueError(f"hvsock address needs /PATH:PORT in {uri!r}")
        return Address("hvsock", path, port=_port(port_text, uri))
    if scheme == "serial":
        ok = (rest.startswith("/") and not rest.endswith("/")) or _SERIAL_NAME.fullmatch(rest)
        if not ok:
            raise ValueError(f"expected serial:///dev/<port> or serial://<port name>, not {uri!r}")
        return Address("serial", rest)
    raise ValueError(f"unsupported address scheme {scheme!r} in {uri!r}")


def resolve_serial(name_or_path: str, ports_dir: str = VIRTIO_PORTS) -> str:
    """A virtio-serial port's device path, from a path or from its port name."""
    if name_or_path.startswith("/"):
        return name_or_path
    for name_file in sorted(glob.glob(os.path.join(ports_dir, "*", "name"))):
        try:
            with open(name_file) as f:
                if f.read().strip() == name_or_path:
                    return os.path.join("/dev", os.path.basename(os.path.dirname(name_file)))
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name_or_path!r} under {ports_dir}")


def socket_family(addr: Address) -> int:
    return socket.AF_VSOCK if addr.scheme == "vsock" else socket.AF_UNIX
