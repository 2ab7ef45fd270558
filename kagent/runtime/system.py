"""Kernel settings that belong to the container's namespaces: hostname, domainname, sysctl.

Each is refused unless the container has the namespace it lives in, so a spec
can never change the guest's own hostname or network settings.  sysctls are
written through the container's /proc/sys after pivot_root.
"""

from __future__ import annotations

from . import syscalls
from .errors import BAD_VALUE, NO_SUCH_PATH, InvalidSpec, step
from .namespaces import Plan

#: sysctl prefixes → the namespace they belong to (what the kernel namespaces)
_NAMESPACED = (
    ("kernel.msgmax", "ipc"),
    ("kernel.msgmnb", "ipc"),
    ("kernel.msgmni", "ipc"),
    ("kernel.sem", "ipc"),
    ("kernel.shmall", "ipc"),
    ("kernel.shmmax", "ipc"),
    ("kernel.shmmni", "ipc"),
    ("kernel.shm_rmid_forced", "ipc"),
    ("fs.mqueue.", "ipc"),
    ("net.", "network"),
    ("kernel.hostname", "uts"),
    ("kernel.domainname", "uts"),
)


def set_names(spec: dict, plan: Plan) -> None:
    for key, call in (("hostname", syscalls.sethostname), ("domainname", syscalls.setdomainname)):
        value = spec.get(key)
        if not value:
            continue
        if not plan.has("uts"):
            raise InvalidSpec(
                f"set {key}", f"set {key}: the container has no UTS namespace of its own"
            )
        with step(f"set {key} {value!r}", invalid=BAD_VALUE):
            call(value)


def namespace_of(key: str) -> str | None:
    for prefix, ns in _NAMESPACED:
        if key == prefix or (
            key.startswith(prefix) and (prefix.endswith(".") or key[len(prefix) :][:1] in ("", "."))
        ):
            return ns
    return None


def check_sysctl(spec: dict, plan: Plan) -> None:
    """Refuse, before any fork, a sysctl that would change the guest's own kernel."""
    for key in (spec.get("linux") or {}).get("sysctl") or {}:
        if "/" in key or not all(key.split(".")):
            raise InvalidSpec("sysctl", f"sysctl {key!r}: not a sysctl name")
        ns = namespace_of(key)
        if ns is None:
            raise InvalidSpec(
                "sysctl", f"sysctl {key}: not namespaced, it would change the guest kernel"
            )
        if not plan.has(ns):
            raise InvalidSpec(
                "sysctl", f"sysctl {key}: the container has no {ns} namespace of its own"
            )


def apply_sysctl(spec: dict) -> None:
    for key, value in ((spec.get("linux") or {}).get("sysctl") or {}).items():
        path = "/proc/sys/" + key.replace(".", "/")
        with step(f"sysctl {key}={value}", path, invalid=NO_SUCH_PATH | BAD_VALUE), open(path, "w") as f:
            f.write(str(value))
