"""secure_join: a path inside a rootfs never resolves outside it, whatever the links say."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kagent.runtime.errors import InvalidSpec
from kagent.runtime.securejoin import create_file, mkdir_all, secure_join
from kagent.ttrpc.codes import Code


@pytest.fixture(scope="module")
def tree():
    """root/{etc/evil -> /, etc/up -> ../../.., abs -> /etc, a/b/, rel -> a/b, loop -> loop, chain -> rel/../abs}"""
    top = tempfile.mkdtemp(prefix="kagent-sj-")
    root = os.path.join(top, "root")
    os.makedirs(os.path.join(root, "etc"))
    os.makedirs(os.path.join(root, "a", "b"))
    os.symlink("/", os.path.join(root, "etc", "evil"))
    os.symlink("../../..", os.path.join(root, "etc", "up"))
    os.symlink("/etc", os.path.join(root, "abs"))
    os.symlink("a/b", os.path.join(root, "rel"))
    os.symlink("loop", os.path.join(root, "loop"))
    os.symlink("rel/../abs", os.path.join(root, "chain"))
    with open(os.path.join(root, "a", "file"), "w"):
        pass
    yield root
    shutil.rmtree(top)
    assert not os.path.exists(top)


@pytest.mark.parametrize(
    "unsafe, expected",
    [
        ("/", ""),
        ("/etc", "/etc"),
        ("/etc/evil", ""),
        ("/etc/evil/escape", "/escape"),
        ("/etc/up/x", "/x"),
        ("/../../../x", "/x"),
        ("abs/passwd", "/etc/passwd"),  # /etc inside the root, not the host's
        ("/rel/c", "/a/b/c"),
        ("/chain/x", "/a/abs/x"),  # rel/.. is a/b/.. = a, like the kernel (not lexical)
        ("/missing/../a", "/a"),
        ("/a/./b/", "/a/b"),
    ],
)
def test_cases(tree, unsafe, expected):
    assert secure_join(tree, unsafe) == tree + expected


def test_loop_is_the_specs_error(tree):
    with pytest.raises(InvalidSpec) as info:
        secure_join(tree, "/loop/x")
    assert info.value.errno == errno.ELOOP and info.value.path == "/loop/x"
    assert info.value.code == Code.INVALID_ARGUMENT


def test_a_name_over_name_max_is_the_specs_error(tree):
    """ENAMETOOLONG from a mount destination or device path was INTERNAL (make fuzz)."""
    with pytest.raises(InvalidSpec) as info:
        secure_join(tree, "/a/" + "n" * 300)
    assert info.value.errno == errno.ENAMETOOLONG and "File name too long" in str(info.value)


def test_component_through_a_file_is_kept_lexically(tree):
    assert secure_join(tree, "/a/file/x") == tree + "/a/file/x"


def test_mkdir_and_create_stay_inside(tree):
    d = mkdir_all(tree, "/etc/evil/made/here")
    assert d == tree + "/made/here" and os.path.isdir(d)
    f = create_file(tree, "/etc/up/newfile")
    assert f == tree + "/newfile" and os.path.isfile(f)
    shutil.rmtree(tree + "/made")
    os.unlink(f)


_parts = st.sampled_from(
    ["a", "b", "..", ".", "etc", "evil", "up", "abs", "rel", "chain", "x", "file", ""]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_parts, max_size=12))
def test_never_escapes(tree, parts):
    result = secure_join(tree, "/".join(parts))
    assert result == tree or result.startswith(tree + "/")
    assert ".." not in result[len(tree) :].split("/")
    # every existing prefix of the result is a real directory or file, never a link out
    probe = tree
    for comp in result[len(tree) :].split("/")[1:]:
        probe = os.path.join(probe, comp)
        if not os.path.lexists(probe):
            break
        assert not os.path.islink(probe)
