"""Parse /proc/<pid>/mountinfo (proc(5)): who is mounted where, with what options."""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(s: str) -> str:
    # the kernel escapes space, tab, newline and backslash as \ooo
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), s)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str
    super_options: str


def parse(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=fields[5],
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
            )
        )
    return mounts


def read(pid: int | str = "self") -> list[Mount]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return parse(f.read())


def root_fstype(mounts: list[Mount]) -> str | None:
    """The filesystem type of the visible "/" (the last mount on it wins)."""
    fstype = None
    for m in mounts:
        if m.mount_point == "/":
            fstype = m.fstype
    return fstype
