"""CopyFile: files (whole and chunked), directories and symlinks below the shared
directory, and every way out of it refused with nothing written outside."""

from __future__ import annotations

import os
import stat

import pytest

from kagent.copyfile import CopyRequest, components_below, copy_file
from kagent.errors import AgentError, InvalidArgument, PermissionDenied

UID, GID = 1000, 1001


@pytest.fixture
def base(tmp_path):
    return tmp_path / "shared" / "containers"


@pytest.fixture
def outside(tmp_path):
    """A directory beside the base that no request may touch."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "target").write_text("untouched")
    return d


def snapshot(path):
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else b""
            out[p] = (st.st_mode, st.st_uid, body)
    return out


def put(base, rel, data=b"", **kw):
    kw.setdefault("file_size", len(data))
    kw.setdefault("uid", os.getuid())  # chown to oneself works without root
    kw.setdefault("gid", os.getgid())
    return copy_file(CopyRequest(path=f"{base}/{rel}", data=data, **kw), str(base))


# --- files ---------------------------------------------------------------------------------


@pytest.mark.root
def test_whole_file_with_parents_modes_and_owner(base):
    assert put(base, "ctr/etc/hosts", b"127.0.0.1 localhost\n", file_mode=0o640, dir_mode=0o750,
               uid=UID, gid=GID) == "file"
    f = base / "ctr/etc/hosts"
    st = f.stat()
    assert f.read_bytes() == b"127.0.0.1 localhost\n"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, UID, GID)
    for d in (base / "ctr", base / "ctr/etc"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750
    # as upstream, the immediate parent belongs to the file's owner; the others stay root's
    assert (base / "ctr/etc").stat().st_uid == UID and (base / "ctr").stat().st_uid == 0
    assert not (base / "ctr/etc/hosts.tmp").exists()


def test_chunked_write_renamed_when_complete(base):
    data = os.urandom(3000)
    assert put(base, "c/big", data[:1000], file_size=3000) == "chunk"
    assert not (base / "c/big").exists() and (base / "c/big.tmp").exists()
    assert put(base, "c/big", data[1000:2000], file_size=3000, offset=1000) == "chunk"
    assert put(base, "c/big", data[2000:], file_size=3000, offset=2000) == "file"
    assert (base / "c/big").read_bytes() == data
    assert not (base / "c/big.tmp").exists()


def test_offset_zero_restarts_an_upload(base):
    # Completion is by size, as upstream: the host sends chunks in order, and a chunk at
    # offset 0 starts over.
    assert put(base, "f", b"abc", file_size=6) == "chunk"
    assert put(base, "f", b"xyz", file_size=6) == "chunk"
    assert put(base, "f", b"def", file_size=6, offset=3) == "file"
    assert (base / "f").read_bytes() == b"xyzdef"


def test_new_upload_replaces_file_and_stale_temp(base):
    put(base, "f", b"old contents")
    (base / "f.tmp").write_bytes(b"stale temp from a dead upload")
    assert put(base, "f", b"new") == "file"
    assert (base / "f").read_bytes() == b"new"


def test_empty_file(base):
    assert put(base, "empty", b"", file_mode=0o600) == "file"
    assert (base / "empty").read_bytes() == b""


@pytest.mark.root
def test_setuid_bit_survives_the_chown(base):
    put(base, "bin/tool", b"#!/bin/sh\n", file_mode=0o4755, uid=UID, gid=GID)
    st = (base / "bin/tool").stat()
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == UID


def test_chunk_past_file_size_is_invalid(base):
    with pytest.raises(InvalidArgument, match="past file_size"):
        put(base, "f", b"12345", file_size=3)
    with pytest.raises(InvalidArgument, match="negative"):
        put(base, "f", b"", file_size=0, offset=-1)


def test_unsupported_file_type(base):
    with pytest.raises(InvalidArgument, match="unsupported file type"):
        put(base, "fifo", b"", file_mode=stat.S_IFIFO | 0o644)


# --- directories and symlinks ---------------------------------------------------------------


@pytest.mark.root
def test_directory_created_with_mode_and_owner(base):
    assert put(base, "ctr/tmp", file_mode=stat.S_IFDIR | 0o1777, uid=UID, gid=GID) == "dir"
    st = (base / "ctr/tmp").stat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1777 and st.st_uid == UID


def test_existing_directory_kept_and_file_in_the_way_replaced(base):
    put(base, "d/keep", b"kept")
    put(base, "d", file_mode=stat.S_IFDIR | 0o700)
    assert (base / "d/keep").read_bytes() == b"kept" and stat.S_IMODE((base / "d").stat().st_mode) == 0o700
    put(base, "x", b"a file")
    put(base, "x", file_mode=stat.S_IFDIR | 0o755)
    assert (base / "x").is_dir()


@pytest.mark.root
def test_symlink_created_and_owned(base):
    put(base, "ctr/old", b"a file where the link goes")
    assert put(base, "ctr/old", b"../target", file_mode=stat.S_IFLNK | 0o777, uid=UID, gid=GID) == "symlink"
    link = base / "ctr/old"
    assert os.readlink(link) == "../target" and os.lstat(link).st_uid == UID


def test_symlink_needs_a_target(base):
    with pytest.raises(InvalidArgument, match="needs a target"):
        put(base, "l", b"", file_mode=stat.S_IFLNK | 0o777)
    with pytest.raises(InvalidArgument):
        put(base, "l", b"a\0b", file_mode=stat.S_IFLNK | 0o777)


def test_file_replaces_a_directory_tree(base):
    put(base, "t/sub/deep", b"x")
    put(base, "t", b"now a file")
    assert (base / "t").read_bytes() == b"now a file"


# --- ways out, each refused -----------------------------------------------------------------


@pytest.mark.parametrize("make_path,error", [
    (lambda b: "/etc/passwd", PermissionDenied),
    (lambda b: f"{b}/../escape", PermissionDenied),
    (lambda b: f"{b}/a/../../escape", PermissionDenied),
    (lambda b: f"{b}/a/..", PermissionDenied),
    (lambda b: f"{b}", PermissionDenied),
    (lambda b: f"{b}/", PermissionDenied),
    (lambda b: f"{b}x/file", PermissionDenied),
    (lambda b: f"{os.path.dirname(b)}/file", PermissionDenied),
    (lambda b: "relative/path", InvalidArgument),
    (lambda b: "", InvalidArgument),
    (lambda b: f"{b}/a\0b", InvalidArgument),
])
def test_lexical_escapes_refused(base, outside, make_path, error):
    before = snapshot(outside.parent)
    with pytest.raises(error):
        copy_file(CopyRequest(path=make_path(base), data=b"pwned", file_size=5), str(base))
    after = snapshot(outside.parent)
    assert after == before


def test_redundant_slashes_and_dots_are_fine(base):
    assert components_below(str(base), f"/{base}//./ctr/./f") == ["ctr", "f"]
    put(base, ".//ctr/./f", b"ok")
    assert (base / "ctr/f").read_bytes() == b"ok"


def test_symlink_component_pointing_out_refused(base, outside):
    base.mkdir(parents=True)
    (base / "out").symlink_to(outside)
    before = snapshot(outside)
    for rel, mode in (("out/evil", 0o644), ("out/sub/evil", 0o644), ("out/dir", stat.S_IFDIR | 0o777),
                      ("out/link", stat.S_IFLNK | 0o777)):
        with pytest.raises(PermissionDenied, match="'out' is a symlink"):
            put(base, rel, b"pwned", file_mode=mode)
    assert snapshot(outside) == before


def test_symlink_component_pointing_inside_also_refused(base):
    (base / "real").mkdir(parents=True)
    (base / "alias").symlink_to(base / "real")
    with pytest.raises(PermissionDenied, match="symlink"):
        put(base, "alias/f", b"data")
    assert list((base / "real").iterdir()) == []


def test_link_made_by_copyfile_is_not_followed_later(base, outside):
    put(base, "ctr/data", str(outside).encode(), file_mode=stat.S_IFLNK | 0o777)
    with pytest.raises(PermissionDenied):
        put(base, "ctr/data/target", b"pwned")
    assert (outside / "target").read_text() == "untouched"


def test_symlink_at_the_final_name_is_replaced_not_followed(base, outside):
    base.mkdir(parents=True)
    (base / "victim").symlink_to(outside / "target")
    put(base, "victim", b"mine")
    assert not (base / "victim").is_symlink() and (base / "victim").read_bytes() == b"mine"
    assert (outside / "target").read_text() == "untouched"


@pytest.mark.root
def test_directory_over_a_symlink_replaces_the_link(base, outside):
    base.mkdir(parents=True)
    (base / "d").symlink_to(outside)
    mode = stat.S_IMODE(outside.stat().st_mode)
    put(base, "d", file_mode=stat.S_IFDIR | 0o777, uid=UID)
    assert (base / "d").is_dir() and not (base / "d").is_symlink()
    assert stat.S_IMODE(outside.stat().st_mode) == mode and outside.stat().st_uid == 0


def test_planted_temp_symlink_is_not_written_through(base, outside):
    base.mkdir(parents=True)
    (base / "f.tmp").symlink_to(outside / "target")
    with pytest.raises(PermissionDenied):  # a later chunk: O_NOFOLLOW refuses the link
        put(base, "f", b"pwned", file_size=10, offset=5)
    assert (outside / "target").read_text() == "untouched"
    assert put(base, "f", b"0123456789") == "file"  # a new upload removes the planted link first
    assert (outside / "target").read_text() == "untouched"


def test_file_as_a_path_component(base):
    put(base, "plain", b"x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        put(base, "plain/child", b"y")


def test_oserror_becomes_a_domain_error(base):
    put(base, "d", file_mode=stat.S_IFDIR | 0o755)
    with pytest.raises(AgentError) as exc:
        put(base, "d/" + "n" * 300, b"name too long")
    assert isinstance(exc.value, InvalidArgument)
