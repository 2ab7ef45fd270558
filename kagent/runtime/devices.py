"""/dev in the container: the default device nodes, ``linux.devices`` and the usual links.

Nodes are made with mknod; where that is not allowed (a user namespace) the
host's node is bind-mounted onto an empty file instead, as runc does.
"""

from __future__ import annotations

import os
import stat

from . import securejoin, syscalls
from .errors import InvalidSpec, step

#: the devices every container gets (OCI runtime-spec "Default Devices")
DEFAULT_DEVICES = [
    {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666},
    {"path": "/dev/zero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o666},
    {"path": "/dev/full", "type": "c", "major": 1, "minor": 7, "fileMode": 0o666},
    {"path": "/dev/random", "type": "c", "major": 1, "minor": 8, "fileMode": 0o666},
    {"path": "/dev/urandom", "type": "c", "major": 1, "minor": 9, "fileMode": 0o666},
    {"path": "/dev/tty", "type": "c", "major": 5, "minor": 0, "fileMode": 0o666},
]

_LINKS = [
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
]

_TYPES = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def needs_dev_setup(spec: dict) -> bool:
    """False when /dev is bind-mounted from elsewhere (the nodes are already there)."""
    for m in spec.get("mounts") or []:
        if os.path.normpath(m.get("destination") or "") == "/dev":
            opts = m.get("options") or []
            if m.get("type") == "bind" or "bind" in opts or "rbind" in opts:
                return False
    return True


def devices_for(spec: dict) -> list[dict]:
    """Default devices plus ``linux.devices``; a spec entry overrides a default at the same path."""
    extra = list((spec.get("linux") or {}).get("devices") or [])
    paths = {os.path.normpath(d.get("path", "")) for d in extra}
    return [d for d in DEFAULT_DEVICES if d["path"] not in paths] + extra


def create_devices(rootfs: str, spec: dict) -> None:
    old = os.umask(0)  # fileMode is exact
    try:
        for dev in devices_for(spec):
            _create(rootfs, dev)
    finally:
        os.umask(old)


def _create(rootfs: str, dev: dict) -> None:
    path = dev.get("path") or ""
    kind = dev.get("type")
    if not path.startswith("/dev/") or kind not in _TYPES:
        raise InvalidSpec(
            "device",
            f"device: invalid entry {dev!r} (needs /dev/... and type c, b, u or p)",
            path=path,
        )
    dest = securejoin.secure_join(rootfs, path)
    mode = int(dev.get("fileMode", 0o666)) & 0o7777
    with step(f"create device {path}", dest):
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        try:
            os.mknod(
                dest,
                mode | _TYPES[kind],
                os.makedev(int(dev.get("major", 0)), int(dev.get("minor", 0))),
            )
        except FileExistsError:
            return
        except PermissionError:
            _bind_host_node(path, dest)
            return
        uid, gid = dev.get("uid"), dev.get("gid")
        if uid is not None or gid is not None:
            os.chown(dest, -1 if uid is None else int(uid), -1 if gid is None else int(gid))


def _bind_host_node(path: str, dest: str) -> None:
    if not os.path.lexists(dest):
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
    syscalls.mount(path, dest, None, syscalls.MS_BIND)


def create_links(rootfs: str, spec: dict) -> None:
    """/dev/fd, stdin, stdout, stderr, core and ptmx (→ pts/ptmx when devpts is mounted)."""
    links = list(_LINKS)
    if os.path.exists("/proc/kcore"):
        links.append(("/proc/kcore", "/dev/core"))
    for target, name in links:
        dest = securejoin.secure_join(rootfs, name)
        with step(f"create link {name}", dest):
            try:
                os.symlink(target, dest)
            except FileExistsError:
                pass
    if any(
        os.path.normpath(m.get("destination") or "") == "/dev/pts" for m in spec.get("mounts") or []
    ):
        dest = securejoin.secure_join(rootfs, "/dev/ptmx")
        with step("create link /dev/ptmx", dest):
            if os.path.lexists(dest):
                os.unlink(dest)
            os.symlink("pts/ptmx", dest)
