"""write_batch / read_batch: the compiled module and the pure twin on the same cases.

The fake tree is plain files in a temp dir; the last cases use a real cgroup
file, whose kernel refusals are what the error text must name.
"""

from __future__ import annotations

import errno
import os
import pickle

import pytest
from cgroup_support import NO_EXTENSIONS, read

from kagent import _fast
from kagent.cgroups import fswrite
from kagent.cgroups.errors import CgroupWriteError, to_domain
from kagent.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.mark.skipif(NO_EXTENSIONS, reason="KAGENT_NO_EXTENSIONS=1")
def test_compiled_module_loaded():
    """Guard: the compiled twin must load when extensions are on (no silent fallback)."""
    mod = _fast.load("cgroupwrite")
    assert mod is not None, f"compiled cgroupwrite did not load: {_fast.failures().get('cgroupwrite')}"
    assert fswrite.COMPILED is mod
    assert fswrite.IMPLEMENTATION == "compiled"


def _tree(tmp_path, names):
    for n in names:
        (tmp_path / n).write_text("old\n")
    return tmp_path


def test_writes_each_value_whole(writer, tmp_path):
    t = _tree(tmp_path, ["cpu.shares", "memory.limit_in_bytes", "devices.allow"])
    n = fswrite.write_batch([
        (str(t / "cpu.shares"), 512),
        (str(t / "memory.limit_in_bytes"), "67108864"),
        (os.fsencode(t / "devices.allow"), b"c 1:3 rwm"),
    ])
    assert n == 3
    # no O_TRUNC on cgroup files; a plain file keeps the tail of a longer old value
    assert (t / "cpu.shares").read_text() == "512\n"
    assert (t / "memory.limit_in_bytes").read_text() == "67108864"
    assert (t / "devices.allow").read_text() == "c 1:3 rwm"


def test_empty_batch(writer):
    assert fswrite.write_batch([]) == 0
    assert fswrite.write_batch(iter(())) == 0


def test_missing_file_is_an_error_naming_file_value_and_progress(writer, tmp_path):
    t = _tree(tmp_path, ["a"])
    with pytest.raises(CgroupWriteError) as info:
        fswrite.write_batch([(str(t / "a"), "1"), (str(t / "nope"), "42")])
    exc = info.value
    assert exc.errno == errno.ENOENT and isinstance(exc, OSError)
    assert exc.path == str(t / "nope") and exc.value == "42" and exc.done == 1
    assert str(exc) == f"[Errno 2] cannot write '42' to {t / 'nope'}: No such file or directory"
    assert not (t / "nope").exists()  # never created


def test_directory_refused(writer, tmp_path):
    with pytest.raises(CgroupWriteError) as info:
        fswrite.write_batch([(str(tmp_path), "1")])
    assert info.value.errno == errno.EISDIR and info.value.done == 0


def test_bad_value_type(writer, tmp_path):
    t = _tree(tmp_path, ["a"])
    for bad in (1.5, None, True):
        with pytest.raises(TypeError, match="str, int or bytes"):
            fswrite.write_batch([(str(t / "a"), bad)])


def test_error_pickles_with_its_fields():
    exc = CgroupWriteError(errno.EINVAL, "/x/cpu.shares", "abc", 2)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.errno, back.path, back.value, back.done, str(back)) == (exc.errno, exc.path, exc.value, exc.done, str(exc))


def test_to_domain_maps_errno_once():
    assert isinstance(to_domain(CgroupWriteError(errno.EINVAL, "/f", "v")), InvalidArgument)
    assert isinstance(to_domain(CgroupWriteError(errno.EBUSY, "/f", "v")), FailedPrecondition)
    err = to_domain(CgroupWriteError(errno.ENOENT, "/f", "v"), "set resources")
    assert isinstance(err, NotFound) and err.message == "set resources: [Errno 2] cannot write 'v' to /f: No such file or directory"


def test_read_batch(writer, tmp_path):
    (tmp_path / "a").write_bytes(b"1 2 3\n")
    (tmp_path / "empty").write_bytes(b"")
    big = bytes(range(256)) * 1024 * 3  # 768 KiB: several reads, grown buffer
    (tmp_path / "big").write_bytes(big)
    out = fswrite.read_batch([str(tmp_path / "a"), str(tmp_path / "missing"), str(tmp_path / "empty"),
                              os.fsencode(tmp_path / "big")])
    assert out == [b"1 2 3\n", None, b"", big]


def test_read_batch_caps_at_one_mib(writer, tmp_path):
    (tmp_path / "huge").write_bytes(b"x" * ((1 << 20) + 5000))
    assert len(fswrite.read_batch([str(tmp_path / "huge")])[0]) == 1 << 20


def test_read_batch_other_errors_raise(writer, tmp_path):
    with pytest.raises(IsADirectoryError):
        fswrite.read_batch([str(tmp_path)])


@pytest.mark.root
def test_real_cgroup_refusal_names_file_and_value(writer, test_parent):
    d = os.path.join("/sys/fs/cgroup/cpuset", test_parent)
    if not os.path.isdir("/sys/fs/cgroup/cpuset"):
        pytest.skip("no v1 cpuset hierarchy")
    os.mkdir(d)
    with pytest.raises(CgroupWriteError) as info:
        fswrite.write_batch([(os.path.join(d, "cpuset.mems"), "0"), (os.path.join(d, "cpuset.cpus"), "abc")])
    assert info.value.errno == errno.EINVAL and info.value.done == 1
    assert f"cannot write 'abc' to {d}/cpuset.cpus: Invalid argument" in str(info.value)
    assert read(os.path.join(d, "cpuset.mems")) == "0"  # the first write stayed applied
    assert fswrite.read_batch([os.path.join(d, "cpuset.mems"), os.path.join(d, "no.such")]) == [b"0\n", None]
