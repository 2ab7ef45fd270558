"""The uevent golden vectors (fixtures/uevents.txt) and their expected parses."""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VECTORS_FILE = os.path.join(FIXTURES, "uevents.txt")
EXPECTED_FILE = os.path.join(FIXTURES, "uevents.expected.json")

_HEAD = re.compile(r"== (\S+) \((captured|constructed)\)( \[no-trailing-nul\])?")


@dataclass(frozen=True)
class Vector:
    name: str
    origin: str
    data: bytes


def load_vectors(path: str = VECTORS_FILE) -> list[Vector]:
    vectors: list[Vector] = []
    current: tuple[str, str, bool] | None = None
    lines: list[str] = []

    def flush() -> None:
        if current is None:
            return
        while lines and lines[-1] == "":
            lines.pop()
        parts = [codecs.escape_decode(line.encode("utf-8"))[0] for line in lines]
        data = b"\0".join(parts) + (b"" if current[2] else b"\0")
        vectors.append(Vector(current[0], current[1], data))

    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            m = _HEAD.fullmatch(line)
            if m:
                flush()
                current, lines = (m.group(1), m.group(2), bool(m.group(3))), []
            elif current is not None and not line.startswith("#"):
                lines.append(line)
    flush()
    names = [v.name for v in vectors]
    assert len(names) == len(set(names)), "duplicate vector names"
    return vectors


def load_expected(path: str = EXPECTED_FILE) -> dict[str, dict | None]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def as_json(uev) -> dict | None:
    """A parse result in the expected file's shape (surrogate escapes kept as \\udcXX)."""
    if uev is None:
        return None
    return {
        "action": uev.action, "devpath": uev.devpath, "subsystem": uev.subsystem,
        "devname": uev.devname, "seqnum": uev.seqnum, "interface": uev.interface,
        "env": uev.env,
    }


def make_uevent(action: str, devpath: str, **props: str):
    """A parsed uevent built from its wire form, so tests go through the real parser."""
    from kagent.devices.uevent import py_parse

    fields = [f"ACTION={action}", f"DEVPATH={devpath}"] + [f"{k}={v}" for k, v in props.items()]
    uev = py_parse(f"{action}@{devpath}\0".encode() + "\0".join(fields).encode() + b"\0")
    assert uev is not None
    return uev
