"""local: a directory in the guest (emptyDir on the guest's disk); nothing is mounted.

``mode=OOO`` (octal) sets its mode; ``fsgid=N`` gives it to group N, and, with a mode,
adds setgid — upstream's exact rule (without ``mode=`` no setgid is added).
"""

from __future__ import annotations

import asyncio
import os

from kagent.errors import InvalidArgument
from kagent.storage.common import Device, StorageSpec, make_dirs, option_value, storage_error
from kagent.storage.context import Context

LOCAL = "local"


def _make_local(spec: StorageSpec) -> Device:
    mp = spec.mount_point
    gid_text = option_value(spec.options, "fsgid")
    mode_text = option_value(spec.options, "mode")
    if gid_text is not None and not (gid_text.isascii() and gid_text.isdigit()):
        raise InvalidArgument(f"local storage {mp}: fsgid={gid_text!r} is not a group id")
    if mode_text is not None and (not mode_text or any(c not in "01234567" for c in mode_text)
                                  or int(mode_text, 8) > 0o7777):
        raise InvalidArgument(f"local storage {mp}: mode={mode_text!r} is not an octal mode")
    dev = Device(LOCAL, mp, sandbox_lifetime=True)  # emptyDir data: see ephemeral
    try:
        dev.created = make_dirs(mp)
        if gid_text is not None:
            os.chown(mp, -1, int(gid_text))
        if mode_text is not None:
            os.chmod(mp, int(mode_text, 8) | (0o2000 if gid_text is not None else 0))
    except OSError as exc:
        dev.release_sync()
        raise storage_error(exc, f"local storage {mp}") from None
    return dev


class LocalHandler:
    drivers = (LOCAL,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        return await asyncio.to_thread(_make_local, spec)
