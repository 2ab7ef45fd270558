"""Fuzz target: CopyFile confinement.  Random sequences of requests (files, chunks,
directories, symlinks — including links that point out, made by CopyFile itself or
planted beforehand) with paths built from ``..``, ``.``, empty, absolute and linked
components.  Properties: only domain errors are raised (they become statuses), and
nothing outside the shared directory is created, changed or removed."""

from __future__ import annotations

import os
import stat

import reliability_harness as harness
from hypothesis import given
from hypothesis import strategies as st

from kagent.copyfile import CopyRequest, copy_file
from kagent.errors import AgentError

COMPONENTS = st.sampled_from(["..", ".", "", "ctr", "etc", "lnk", "up", "abs", "hosts", "x" * 256, "a\x00b",
                              "file.tmp", "outside", "...", " "])
KINDS = st.sampled_from([0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR])


def snapshot(path: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            body = open(p, "rb").read() if stat.S_ISREG(st_.st_mode) else b""
            out[p] = (st_.st_mode, st_.st_uid, st_.st_size, body)
    return out


@st.composite
def requests(draw, base: str, outside: str):
    parts = draw(st.lists(COMPONENTS, min_size=1, max_size=5))
    prefix = draw(st.sampled_from([base, base + "/", base + "//./", outside, "/", "", base + "/../containers"]))
    kind = draw(KINDS)
    data = draw(st.sampled_from([b"", b"x", outside.encode(), b"../../outside/target", b"/etc/passwd"])
                | st.binary(max_size=32))
    offset = draw(st.sampled_from([0, 0, 1, 2**40, -1]))
    size = draw(st.sampled_from([len(data), len(data) + offset, 0, -1, 2**40]))
    return CopyRequest(path=prefix.rstrip("/") + "/" + "/".join(parts), file_size=size,
                       file_mode=kind | draw(st.sampled_from([0o644, 0o4755, 0o777, 0o7777, 0])),
                       dir_mode=draw(st.sampled_from([0o755, 0o700, 0o7777])), uid=os.getuid(), gid=os.getgid(),
                       offset=offset, data=data)


@harness.fuzz_settings(200)
@given(data=st.data())
def test_nothing_outside_the_shared_directory_changes(tmp_path_factory, data):
    top = tmp_path_factory.mktemp("copy")
    base = str(top / "shared" / "containers")
    outside = str(top / "outside")
    os.makedirs(os.path.join(base, "ctr", "etc"))
    os.makedirs(outside)
    with open(os.path.join(outside, "target"), "w") as f:
        f.write("untouched\n")
    os.symlink(outside, os.path.join(base, "lnk"))  # planted links pointing out
    os.symlink("../../outside", os.path.join(base, "ctr", "up"))
    os.symlink("/", os.path.join(base, "ctr", "abs"))
    before = snapshot(outside)
    top_before = sorted(os.listdir(top))
    for req in data.draw(st.lists(requests(base, outside), min_size=1, max_size=6)):
        harness.record("copyfile.requests")
        try:
            copy_file(req, base)
        except AgentError:
            pass
        assert snapshot(outside) == before, req
        assert sorted(os.listdir(top)) == top_before, req
    for dirpath, _dirs, _files in os.walk(base):
        assert os.path.realpath(dirpath).startswith(os.path.realpath(base))
