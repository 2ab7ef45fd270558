"""Spec → kernel values, without forking: mount options, mountinfo, namespaces, sysctls,
capabilities, seccomp profiles, users, errors and the set-up channel."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from kagent.runtime import capabilities, mountinfo, mounts, namespaces, seccomp, system, users
from kagent.runtime import syscalls as sc
from kagent.runtime.channel import Channel, _Abandoned
from kagent.runtime.errors import SetupError, step

# --- mount options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, flags, propagation, data",
    [
        ([], 0, [], None),
        (
            ["ro", "nosuid", "nodev", "noexec"],
            sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
            [],
            None,
        ),
        (["rbind", "ro"], sc.MS_BIND | sc.MS_REC | sc.MS_RDONLY, [], None),
        (["ro", "rw"], 0, [], None),  # later wins
        (["bind", "rslave"], sc.MS_BIND, [sc.MS_SLAVE | sc.MS_REC], None),
        (
            ["newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            0,
            [],
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        (
            ["nosuid", "strictatime", "mode=755", "size=65536k"],
            sc.MS_NOSUID | sc.MS_STRICTATIME,
            [],
            "mode=755,size=65536k",
        ),
        (["relatime", "private", "shared"], sc.MS_RELATIME, [sc.MS_PRIVATE, sc.MS_SHARED], None),
        (["defaults", "X-mount.mkdir", "nofail", "tmpcopyup"], 0, [], None),
    ],
)
def test_parse_options(options, flags, propagation, data):
    o = mounts.parse_options(options)
    assert (o.flags, o.propagation, o.data_str) == (flags, propagation, data)


def test_ignored_options_are_listed():
    assert mounts.parse_options(["tmpcopyup", "ro", "x-foo"]).ignored == ["tmpcopyup", "x-foo"]


# --- mountinfo -----------------------------------------------------------------------------

MOUNTINFO = """\
1 1 0:2 / / rw - rootfs rootfs rw
22 1 0:21 / /proc rw,relatime - proc proc rw
30 1 0:25 / /mnt/with\\040space rw,nosuid shared:5 master:1 - tmpfs my\\040tmp rw,size=1k
31 1 0:26 / / rw - ext4 /dev/vda rw
"""


def test_mountinfo_parse():
    ms = mountinfo.parse(MOUNTINFO)
    assert [m.mount_point for m in ms] == ["/", "/proc", "/mnt/with space", "/"]
    tmp = ms[2]
    assert (tmp.fstype, tmp.source, tmp.super_options, tmp.options) == (
        "tmpfs",
        "my tmp",
        "rw,size=1k",
        "rw,nosuid",
    )
    assert mountinfo.root_fstype(ms) == "ext4"  # the last mount on / is what is visible
    assert mountinfo.root_fstype(ms[:2]) == "rootfs"  # an initramfs guest: MS_MOVE + chroot


def test_mountinfo_of_this_process():
    assert any(m.mount_point == "/proc" and m.fstype == "proc" for m in mountinfo.read())


# --- namespaces ----------------------------------------------------------------------------


def _spec(*namespaces_, **linux):
    return {"linux": {"namespaces": list(namespaces_), **linux}}


def test_plan_new_and_joined():
    p = namespaces.plan(
        _spec({"type": "pid"}, {"type": "network", "path": "/run/netns/x"}, {"type": "mount"})
    )
    assert p.new == {"pid", "mount"} and p.joined == {"network": "/run/netns/x"}
    assert p.has("network") and not p.has("user") and not p.child_makes_pidns
    assert namespaces.plan(_spec({"type": "pid"}, {"type": "user"})).child_makes_pidns


@pytest.mark.parametrize(
    "bad", [[{"type": "time"}], [{"type": "pid"}, {"type": "pid", "path": "/x"}]]
)
def test_plan_refuses(bad):
    with pytest.raises(SetupError) as info:
        namespaces.plan(_spec(*bad))
    assert info.value.step == "namespaces"


def test_maps_root():
    full = {"containerID": 0, "hostID": 1000, "size": 10}
    assert namespaces.maps_root({"linux": {"uidMappings": [full], "gidMappings": [full]}})
    assert not namespaces.maps_root(
        {"linux": {"uidMappings": [{**full, "containerID": 1}], "gidMappings": [full]}}
    )


# --- sysctl and names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, ns",
    [
        ("net.ipv4.ip_forward", "network"),
        ("kernel.shmmax", "ipc"),
        ("kernel.shm_rmid_forced", "ipc"),
        ("fs.mqueue.msg_max", "ipc"),
        ("kernel.hostname", "uts"),
        ("kernel.pid_max", None),
        ("kernel.shmmaxx", None),
        ("vm.swappiness", None),
    ],
)
def test_sysctl_namespaces(key, ns):
    assert system.namespace_of(key) == ns


@pytest.mark.parametrize(
    "key, match",
    [
        ("kernel.pid_max", "not namespaced"),
        ("net.core.somaxconn", "no network"),
        ("net.a/../../x", "not a sysctl name"),
        ("net..x", "not a sysctl name"),
    ],
)
def test_check_sysctl_refuses(key, match):
    spec = _spec({"type": "ipc"}, sysctl={key: "1"})
    with pytest.raises(SetupError, match=match):
        system.check_sysctl(spec, namespaces.plan(spec))


def test_hostname_needs_uts_namespace():
    spec = {"hostname": "x", **_spec({"type": "mount"})}
    with pytest.raises(SetupError, match="no UTS namespace"):
        system.set_names(spec, namespaces.plan(spec))


# --- capabilities --------------------------------------------------------------------------


def test_capability_names():
    warnings = []
    bits = capabilities.mask(
        ["CAP_NET_RAW", "net_admin", "CAP_BOGUS", "CAP_CHOWN"], warnings.append, last=40
    )
    assert bits == (1 << 13) | (1 << 12) | 1
    assert warnings == ["capability 'CAP_BOGUS' is not known to this kernel: ignored"]
    assert capabilities.mask(["CAP_CHECKPOINT_RESTORE"], warnings.append, last=39) == 0
    assert capabilities.names_of((1 << 13) | (1 << 21)) == ["CAP_NET_RAW", "CAP_SYS_ADMIN"]
    assert capabilities.NUMBERS["CAP_CHECKPOINT_RESTORE"] == 40


def test_from_spec_drops_what_is_not_held(monkeypatch):
    monkeypatch.setattr(sc, "capget", lambda: (0b111, 0b011, 0))
    monkeypatch.setattr(capabilities, "last_cap", lambda: 40)
    warnings = []
    sets = capabilities.from_spec(
        {
            "bounding": ["CAP_CHOWN", "CAP_DAC_READ_SEARCH"],
            "permitted": ["CAP_CHOWN"],
            "ambient": ["CAP_CHOWN"],
        },
        warnings.append,
    )
    assert (sets.bounding, sets.permitted, sets.ambient) == (1, 1, 0)
    assert "CAP_DAC_READ_SEARCH" in warnings[0] and "ambient" in warnings[1]
    assert capabilities.from_spec(None, warnings.append) is None


# --- seccomp -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, ret, value",
    [
        ("SCMP_ACT_ALLOW", None, 0x7FFF0000),
        ("SCMP_ACT_ERRNO", None, 0x00050000 | errno.EPERM),
        ("SCMP_ACT_ERRNO", 38, 0x00050026),
        ("SCMP_ACT_KILL", None, 0),
        ("SCMP_ACT_KILL_PROCESS", None, 0x80000000),
        ("SCMP_ACT_TRAP", None, 0x00030000),
        ("SCMP_ACT_LOG", None, 0x7FFC0000),
        ("SCMP_ACT_TRACE", 1, 0x7FF00001),
    ],
)
def test_seccomp_actions(name, ret, value):
    assert seccomp.action(name, ret) == value


def test_seccomp_compile_without_loading():
    warnings = []
    flt = seccomp.compile(
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_NOPE"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"],
            "syscalls": [
                {"names": ["read", "write", "not_a_syscall"], "action": "SCMP_ACT_ALLOW"},
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [
                        {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                        {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                    ],
                },
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},
            ],
        },  # same as default: skipped
        warnings.append,
    )
    assert flt is not None
    flt.release()
    assert any("SCMP_ARCH_NOPE" in w for w in warnings)
    assert any("WAIT_KILLABLE_RECV" in w for w in warnings)
    assert seccomp.compile(None, warnings.append) is None


@pytest.mark.parametrize(
    "profile, match",
    [
        ({"defaultAction": "SCMP_ACT_BOGUS"}, "unsupported action"),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_XX"}],
                    }
                ],
            },
            "unknown operator",
        ),
        ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock"}, "not supported"),
    ],
)
def test_seccomp_refuses(profile, match):
    with pytest.raises(SetupError, match=match):
        seccomp.compile(profile, lambda _m: None)


# --- users ---------------------------------------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/sh\n# comment\nbroken:x:nope:0::/:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\nwheel:x:10:app,other\napps:x:1001:\n"


@pytest.fixture
def etc(scratch):
    (scratch / "etc").mkdir()
    (scratch / "etc" / "passwd").write_text(PASSWD)
    (scratch / "etc" / "group").write_text(GROUP)
    return str(scratch)


def test_parse_passwd_and_group():
    assert [(e.name, e.uid, e.gid, e.home) for e in users.parse_passwd(PASSWD)] == [
        ("root", 0, 0, "/root"),
        ("app", 1000, 1001, "/home/app"),
    ]
    assert users.parse_group(GROUP)[1].members == ("app", "other")


@pytest.mark.parametrize(
    "user, string_user, expected",
    [
        (
            {"uid": 1000, "gid": 5, "additionalGids": [7, 7, 8]},
            None,
            users.Identity(1000, 5, (7, 8), "/home/app"),
        ),
        ({}, None, users.Identity(0, 0, (), "/root")),
        ({}, {"uid": "app"}, users.Identity(1000, 1001, (), "/home/app")),
        (
            {},
            {"uid": "app", "gid": "wheel", "additionalGids": ["apps", "3"]},
            users.Identity(1000, 10, (1001, 3), "/home/app"),
        ),
        ({"uid": 5}, {"uid": "42", "gid": "43"}, users.Identity(42, 43, (), "/")),
        ({"username": "app"}, None, users.Identity(1000, 1001, (), "/home/app")),
    ],
)
def test_resolve(etc, user, string_user, expected):
    assert users.resolve(user, string_user, root=etc) == expected


@pytest.mark.parametrize(
    "string_user, match",
    [({"uid": "ghost"}, "no user 'ghost'"), ({"uid": "app", "gid": "ghosts"}, "no group 'ghosts'")],
)
def test_resolve_unknown_names(etc, string_user, match):
    with pytest.raises(SetupError, match=match):
        users.resolve({}, string_user, root=etc)


def test_resolve_without_etc(scratch):
    assert users.resolve({"uid": 3}, None, root=str(scratch)) == users.Identity(3, 0, (), "/")


# --- errors and the channel ----------------------------------------------------------------


def test_setup_error_from_oserror_and_pickle():
    with pytest.raises(SetupError) as info, step("mount proc at /r/proc", "/r/proc"):
        raise PermissionError(
            errno.EPERM, "mount('proc', '/r/proc', 'proc', 0xe): Operation not permitted"
        )
    err = info.value
    assert str(err) == "mount proc at /r/proc: [Errno 1] Operation not permitted"
    assert (err.step, err.path, err.errno) == ("mount proc at /r/proc", "/r/proc", errno.EPERM)
    assert err.detail.startswith("[Errno 1] mount('proc'")
    again = pickle.loads(pickle.dumps(err))
    assert (again.step, again.path, again.errno, str(again)) == (
        err.step,
        err.path,
        err.errno,
        str(err),
    )
    assert SetupError.from_dict(err.to_dict()).to_dict() == err.to_dict()


def test_channel_round_trip_and_eof():
    a, b = Channel.pair()
    try:
        a.send("hooks", pid=5)
        assert b.recv() == {"type": "hooks", "pid": 5}
        assert not os.get_inheritable(a.fileno()) and not os.get_inheritable(b.fileno())
        a.send("other")
        with pytest.raises(_Abandoned):
            b.expect("go")
        a.close()
        assert b.recv() is None
    finally:
        b.close()
