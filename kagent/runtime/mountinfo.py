"""Parse /proc/<pid>/mountinfo (proc(5)): who is mounted where, with what options.

The kernel escapes only space, tab, newline and backslash (as ``\\ooo``) in the path
fields, so a line is split on "\\n" and its fields on " " and nothing else: str.split()
and str.splitlines() also break at characters a path may hold (U+0085, U+3000,
\\x1c-\\x1f, \\r, ...).  An empty field (a mount whose source is "") stays a field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(s: str) -> str:
    """A path field as it was before the kernel escaped it."""
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
    devno: str = ""  # "major:minor" of the filesystem


def parse(text: str) -> list[Mount]:
    """The mounts of a mountinfo text; a line that is not one (no " - ", ids not numbers) is skipped."""
    mounts = []
    for line in text.split("\n"):
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        mounts.append(
            Mount(
                mount_id=mount_id,
                parent_id=parent_id,
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=fields[5],
                fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]),
                super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                devno=fields[2],
            )
        )
    return mounts


def read_file(path: str) -> list[Mount]:
    """The mounts listed in ``path``.  Names are bytes to the kernel: undecodable ones are kept
    (surrogate escapes), as os.* functions take them back."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return parse(f.read())


def read(pid: int | str = "self") -> list[Mount]:
    return read_file(f"/proc/{pid}/mountinfo")


def root_fstype(mounts: list[Mount]) -> str | None:
    """The filesystem type of the visible "/" (the last mount on it wins)."""
    fstype = None
    for m in mounts:
        if m.mount_point == "/":
            fstype = m.fstype
    return fstype
