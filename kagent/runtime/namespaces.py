"""Linux namespaces from an OCI spec: which are new, which are joined, and in what order.

Where each kind of namespace is entered, and why:

- pid: unshare(CLONE_NEWPID) and setns(CLONE_NEWPID) change only the caller's
  *children*, so the worker arranges its pid_for_children just around the fork
  of the container's init (one fork instead of runc's two) and restores it
  right after: hooks and anything else the worker forks later must stay in the
  worker's own pid namespace, and a fork into a pid namespace whose init died
  fails with ENOMEM.  exec_process does the same around each exec fork.
  Exception: a new pid namespace in a container with a user namespace must be
  *owned* by that user namespace (else the container cannot mount /proc), so
  there the child creates it after its user namespace and forks the init.
- user: entered first (joined, or unshared and then mapped by the parent), so
  that the other namespaces are owned by it.
- the others: joined by path first (mnt last: setns(mnt) changes root and cwd),
  then the new ones unshared in one call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import syscalls
from .errors import BAD_NAMESPACE, InvalidSpec, step

#: OCI namespace type → (clone flag, name under /proc/<pid>/ns)
KINDS: dict[str, tuple[int, str]] = {
    "pid": (syscalls.CLONE_NEWPID, "pid"),
    "network": (syscalls.CLONE_NEWNET, "net"),
    "mount": (syscalls.CLONE_NEWNS, "mnt"),
    "ipc": (syscalls.CLONE_NEWIPC, "ipc"),
    "uts": (syscalls.CLONE_NEWUTS, "uts"),
    "user": (syscalls.CLONE_NEWUSER, "user"),
    "cgroup": (syscalls.CLONE_NEWCGROUP, "cgroup"),
}

#: the order in which namespaces are joined (pid is the worker's business)
JOIN_ORDER = ("user", "ipc", "uts", "network", "cgroup", "mount")


@dataclass
class Plan:
    new: set[str] = field(default_factory=set)
    joined: dict[str, str] = field(default_factory=dict)

    def has(self, kind: str) -> bool:
        return kind in self.new or kind in self.joined

    @property
    def child_makes_pidns(self) -> bool:
        """New pid ns owned by the container's user ns: the child must fork the init."""
        return "pid" in self.new and self.has("user")


def plan(spec: dict) -> Plan:
    """Read ``linux.namespaces``; reject unknown or repeated types."""
    result = Plan()
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        kind = ns.get("type")
        if kind not in KINDS:
            raise InvalidSpec("namespaces", f"namespaces: unsupported namespace type {kind!r}")
        if result.has(kind):
            raise InvalidSpec("namespaces", f"namespaces: {kind} namespace listed twice")
        path = ns.get("path")
        if path:
            result.joined[kind] = path
        else:
            result.new.add(kind)
    return result


@contextlib.contextmanager
def pid_for_children(target: str | None, new: bool = False) -> Iterator[None]:
    """Make the worker's next fork land in a pid namespace, then restore it.

    ``target`` is a /proc/<pid>/ns/pid-like path to join; ``new`` creates one.
    """
    if target is None and not new:
        yield
        return
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if target is not None:
            _setns_path(target, "pid")
        else:
            with step("unshare pid namespace"):
                syscalls.unshare(syscalls.CLONE_NEWPID)
        try:
            yield
        finally:
            # Always possible: our own (active) pid namespace is an ancestor of any we entered.
            syscalls.setns(own, syscalls.CLONE_NEWPID)
    finally:
        os.close(own)


def _setns_path(path: str, kind: str) -> None:
    """Join the namespace at a path the spec gave."""
    with step(f"join {kind} namespace {path}", path, invalid=BAD_NAMESPACE):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, KINDS[kind][0])
        finally:
            os.close(fd)


def join(p: Plan) -> None:
    """In the child: setns into the joined namespaces except pid, in JOIN_ORDER."""
    for kind in JOIN_ORDER:
        if kind in p.joined:
            _setns_path(p.joined[kind], kind)


def unshare_new(p: Plan, kinds: set[str]) -> None:
    """In the child: create the new namespaces among ``kinds`` in one call."""
    flags = 0
    for kind in kinds & p.new:
        flags |= KINDS[kind][0]
    if flags:
        names = ",".join(sorted(kinds & p.new))
        with step(f"unshare namespaces {names}"):
            syscalls.unshare(flags)


def write_id_maps(pid: int, spec: dict) -> None:
    """In the parent: write the user namespace's uid and gid maps for ``pid``."""
    linux = spec.get("linux") or {}
    for name, key in (("uid_map", "uidMappings"), ("gid_map", "gidMappings")):
        lines = "".join(
            f"{int(m['containerID'])} {int(m['hostID'])} {int(m['size'])}\n"
            for m in linux.get(key) or []
        )
        if not lines:
            continue
        path = f"/proc/{pid}/{name}"
        with step(f"write {name}", path):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, lines.encode())  # the kernel wants the whole map in one write
            finally:
                os.close(fd)


def maps_root(spec: dict) -> bool:
    """Whether both maps give the container a root (uid 0 and gid 0)."""
    linux = spec.get("linux") or {}

    def covers(key: str) -> bool:
        return any(
            int(m["containerID"]) <= 0 < int(m["containerID"]) + int(m["size"])
            for m in linux.get(key) or []
        )

    return covers("uidMappings") and covers("gidMappings")


def enter_container(init_pid: int) -> None:
    """In an exec child: join the init's namespaces (pid excluded), user first, mnt last.

    Only the namespaces that differ from ours: setns into one's own user
    namespace fails, and into one's own mount namespace would reset the root.
    """
    for kind in JOIN_ORDER:
        proc_name = KINDS[kind][1]
        target = f"/proc/{init_pid}/ns/{proc_name}"
        with step(f"join {kind} namespace of pid {init_pid}", target):
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_ino == os.stat(f"/proc/self/ns/{proc_name}").st_ino:
                    continue
                syscalls.setns(fd, KINDS[kind][0])
            finally:
                os.close(fd)


def same_pid_ns(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
