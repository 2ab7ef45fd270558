"""``Storage.fs_group``: give a volume to the pod's fsGroup, as kubelet does on the host.

Every file and directory below the mount point (symlinks excepted: changing one would
change what it points to) gets the group, and its mode ORed with rw for owner and group
(r only for a read-only volume); directories also get x and setgid, so that new files
inherit the group.  With the ``OnRootMismatch`` policy the walk is skipped when the root
already has the group, those bits and setgid — the cheap check kubelet makes so that a
large volume is not walked at every container start.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from kagent.log import get_logger

log = get_logger("storage")

# types.FSGroupChangePolicy
ALWAYS = 0
ON_ROOT_MISMATCH = 1

RW_MASK = 0o660
RO_MASK = 0o440
EXEC_MASK = 0o110
SETGID = stat.S_ISGID


class FsGroup(NamedTuple):
    gid: int
    policy: int = ALWAYS


def root_matches(path: str, gid: int, read_only: bool) -> bool:
    """Whether the root already looks done (the OnRootMismatch test)."""
    st = os.stat(path)
    mask = (RO_MASK if read_only else RW_MASK) | EXEC_MASK
    return st.st_gid == gid and st.st_mode & mask == mask and bool(st.st_mode & SETGID)


def set_ownership(path: str, group: FsGroup, *, read_only: bool) -> bool:
    """Apply ``group`` below ``path``; False when the policy let it skip the walk."""
    if group.policy == ON_ROOT_MISMATCH and root_matches(path, group.gid, read_only):
        log.info("fs_group already applied, skipping the walk", mount_point=path, fs_group=group.gid)
        return False
    log.info("applying fs_group", mount_point=path, fs_group=group.gid,
             policy="OnRootMismatch" if group.policy == ON_ROOT_MISMATCH else "Always")
    change_tree(path, group.gid, read_only=read_only)
    return True


def change_tree(root: str, gid: int, *, read_only: bool) -> None:
    """chgrp + chmod every entry below ``root``, children before their directory.

    Iterative, so a deep tree cannot exhaust the interpreter's recursion limit.
    """
    base = RO_MASK if read_only else RW_MASK
    stack: list[tuple[str, bool]] = [(root, False)]
    while stack:
        path, children_done = stack.pop()
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and not children_done:
            stack.append((path, True))
            with os.scandir(path) as entries:
                stack.extend((e.path, False) for e in entries)
            continue
        os.chown(path, -1, gid, follow_symlinks=False)
        # chown may clear setuid/setgid: read the mode again, as it is now
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        os.chmod(path, mode | base | ((EXEC_MASK | SETGID) if is_dir else 0))
