"""Who the container process runs as: uid, gid, supplementary groups and home.

Numbers come from ``process.user`` (OCI).  Names, from ``process.user.username``
or from Kata's ``string_user`` (``{"uid": "app", "gid": "app",
"additionalGids": [...]}``, carried in the process dict as ``stringUser``),
are looked up in the container's own /etc/passwd and /etc/group: the lookup
runs after pivot_root, so "/" is the container's root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InvalidSpec, check_range, step

# (uid_t)-1 is "leave unchanged" to setresuid/setresgid: as an id it would keep us root.
ID_MAX = 2**32 - 2


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def parse_passwd(text: str) -> list[PasswdEntry]:
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) < 7 or line.startswith("#"):
            continue
        try:
            entry = PasswdEntry(f[0], int(f[2]), int(f[3]), f[5])
        except ValueError:
            continue  # a malformed line must not stop the container
        if 0 <= entry.uid <= ID_MAX and 0 <= entry.gid <= ID_MAX:
            out.append(entry)
    return out


def parse_group(text: str) -> list[GroupEntry]:
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) < 4 or line.startswith("#"):
            continue
        try:
            entry = GroupEntry(f[0], int(f[2]), tuple(m for m in f[3].split(",") if m))
        except ValueError:
            continue
        if 0 <= entry.gid <= ID_MAX:
            out.append(entry)
    return out


def _read(root: str, name: str) -> str:
    try:
        with open(os.path.join(root, "etc", name)) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return ""


class _Db:
    """/etc/passwd and /etc/group, read once and only if a name needs them."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._passwd: list[PasswdEntry] | None = None
        self._group: list[GroupEntry] | None = None

    @property
    def passwd(self) -> list[PasswdEntry]:
        if self._passwd is None:
            self._passwd = parse_passwd(_read(self.root, "passwd"))
        return self._passwd

    @property
    def group(self) -> list[GroupEntry]:
        if self._group is None:
            self._group = parse_group(_read(self.root, "group"))
        return self._group

    def user(self, name: str) -> PasswdEntry:
        for e in self.passwd:
            if e.name == name:
                return e
        # INVALID_ARGUMENT, not NOT_FOUND: the request names a user this image lacks, while
        # the host reads NOT_FOUND as "no such container or process".
        raise InvalidSpec("user", f"user: no user {name!r} in the container's /etc/passwd")

    def gid(self, name: str, field: str) -> int:
        if name.isascii() and name.isdigit():  # isdigit() alone also passes "²"
            return check_range(field, int(name), 0, ID_MAX)
        for e in self.group:
            if e.name == name:
                return e.gid
        raise InvalidSpec("user", f"user: no group {name!r} in the container's /etc/group")

    def home(self, uid: int) -> str:
        return next((e.home for e in self.passwd if e.uid == uid), "/")


def resolve(user: dict | None, string_user: dict | None = None, root: str = "/") -> Identity:
    user = user or {}
    db = _Db(root)
    uid = int(user.get("uid", 0))
    gid = int(user.get("gid", 0))
    groups = [int(g) for g in user.get("additionalGids") or []]
    su = dict(string_user or {})
    if not su.get("uid") and user.get("username"):
        su["uid"] = user["username"]
    if su.get("uid"):
        name = str(su["uid"])
        if name.isascii() and name.isdigit():
            uid = check_range("string_user.uid", int(name), 0, ID_MAX)
        else:
            entry = db.user(name)
            uid = entry.uid
            if not su.get("gid"):
                gid = entry.gid
    if su.get("gid"):
        gid = db.gid(str(su["gid"]), "string_user.gid")
    if su.get("additionalGids"):
        groups = [db.gid(str(g), "string_user.additionalGids") for g in su["additionalGids"]]
    return Identity(uid, gid, tuple(dict.fromkeys(groups)), db.home(uid))


def switch(ident: Identity) -> None:
    """setgroups, setgid, setuid — in that order, while we still may."""
    with step(f"set supplementary groups {list(ident.groups)}"):
        try:
            os.setgroups(list(ident.groups))
        except PermissionError:
            # a user namespace with setgroups "deny": fine as long as none were asked for
            if ident.groups:
                raise
    with step(f"set gid {ident.gid}"):
        os.setresgid(ident.gid, ident.gid, ident.gid)
    with step(f"set uid {ident.uid}"):
        os.setresuid(ident.uid, ident.uid, ident.uid)
