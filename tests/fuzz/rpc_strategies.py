"""Request payloads for the RPC fuzzer: random bytes, random messages built from the
protobuf descriptors, and mutations of valid requests — then made safe for this host.

Every payload for a method listed in ``CONSTRAINED`` goes through its sanitizer
(whenever it decodes at all: random bytes can decode into a request too), which
keeps the RPC from acting on the machine outside the agent's sandbox.  Methods in
``EXCLUDED`` are not sent at all.  The reasons are in those two tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from kagent import devtools, oci, protocols

# --- random messages from descriptors ------------------------------------------------------------

STRINGS = [
    "", "fz", "fz-exec", "fz2", "nope", "a", "../../../etc", "..", "/", "//", "/proc/self/root",
    "/proc/1/root/etc", "/run/kata-containers/shared/containers/fz/x", "/run/fz/m", "/dev/null",
    "x" * 300, "\x00", "a\x00b", "ünïcødé", "\n", "-1", "0", "4294967296", "max", "1-3", "0,1",
    "CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_BOGUS", "RLIMIT_NOFILE", "RLIMIT_BOGUS", "pid", "network",
    "mount", "uts", "ipc", "user", "cgroup", "time", "bogusns", "bind", "rbind", "ro", "rw", "proc",
    "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2", "nosuid", "rshared", "rslave", "private",
    "mode=755", "size=1k", "eth0", "lo", "10.0.0.1", "10.0.0.0/8", "fe80::1", "::/0", "c", "b", "u",
    "p", "a", "rwm", "SCMP_ACT_ERRNO", "SCMP_ACT_ALLOW", "SCMP_ARCH_X86_64", "read", "ephemeral",
    "local", "blk", "virtio-fs", "9p", "overlayfs", "stdout", "stderr", "kata.sandbox",
    "io.kubernetes.cri.container-type", "sandbox", "container", "hostname", "kernel.shmmax",
    "net.ipv4.ip_forward", "fs.mqueue.msg_max", "root", "app", "1000", "slice:prefix:name",
    "system.slice:kagent:fz", "/kubepods/../../escape",
]
_EDGES = [0, 1, -1, 2, 7, 255, 256, 4096, 65535, 65536, 2**31 - 1, -2**31, 2**32 - 1, 2**32,
          2**63 - 1, -2**63, 2**64 - 1]


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.sampled_from([e for e in _EDGES if lo <= e <= hi]) | st.integers(lo, hi)


_RANGES = {
    FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1),
    FD.TYPE_SFIXED32: (-2**31, 2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-2**63, 2**63 - 1), FD.TYPE_SINT64: (-2**63, 2**63 - 1),
    FD.TYPE_SFIXED64: (-2**63, 2**63 - 1), FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
strings = st.sampled_from(STRINGS) | st.text(max_size=24)
blobs = st.binary(max_size=64) | strings.map(lambda s: s.encode("utf-8", "surrogatepass"))


def scalar(field: FD) -> st.SearchStrategy:
    t = field.type
    if t == FD.TYPE_STRING:
        return strings
    if t == FD.TYPE_BYTES:
        return blobs
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in _RANGES:
        return _ints(*_RANGES[t])
    if t == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FD.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.sampled_from(values) | st.integers(-3, 40)  # proto3 enums are open
    raise TypeError(f"no strategy for field type {t}")


@st.composite
def messages(draw, desc, depth: int = 0) -> Message:
    """A random message of type ``desc``: each field maybe set, lists of up to 3, depth up to 4."""
    msg = GetMessageClass(desc)()
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        is_msg = f.type == FD.TYPE_MESSAGE
        if is_msg and depth >= 4:
            continue
        if is_msg and f.message_type.GetOptions().map_entry:
            key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for k in draw(st.lists(scalar(key_f), max_size=3)):
                target = getattr(msg, f.name)
                if val_f.type == FD.TYPE_MESSAGE:
                    target[k].CopyFrom(draw(messages(val_f.message_type, depth + 1)))
                else:
                    target[k] = draw(scalar(val_f))
            continue
        if f.label == FD.LABEL_REPEATED:
            n = draw(st.integers(0, 3))
            target = getattr(msg, f.name)
            for _ in range(n):
                if is_msg:
                    target.add().CopyFrom(draw(messages(f.message_type, depth + 1)))
                else:
                    target.append(draw(scalar(f)))
            continue
        if is_msg:
            getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, depth + 1)))
        else:
            setattr(msg, f.name, draw(scalar(f)))
    return msg


# --- byte-level mutations -------------------------------------------------------------------------


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """``seed`` with 1..4 byte-level edits: flip, set, insert, delete, duplicate, truncate."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate"]))
        pos = draw(st.integers(0, max(len(data), 1) - 1)) if data else 0
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x0A, 0x12, 0x08]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "dup" and data:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


# --- seeds: valid requests ------------------------------------------------------------------------


@dataclass
class Env:
    """What sanitizers and seeds need to know about the sandbox."""

    rootfs: str
    workdir: str

    @property
    def binds(self) -> str:
        return os.path.join(self.workdir, "binds")

    @property
    def swapdir(self) -> str:
        return os.path.join(self.workdir, "swap")


SAFE_ARGS = [["/bin/true"], ["/bin/echo", "fuzz"], ["/bin/sleep", "0.2"], ["/bin/sh", "-c", "exit 3"]]


def spec_dict(env: Env, args: list[str] | None = None) -> dict:
    s = devtools.default_spec(env.rootfs, args or ["/bin/sleep", "0.2"])
    s["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 64}}
    return s


def seeds(env: Env, name: str) -> list[Message]:
    """Valid requests for method ``name`` (the default message is always one)."""
    m = protocols.find(name)
    out = [m.request()]
    proc = oci.process_from_dict({"args": ["/bin/echo", "hi"], "cwd": "/", "env": ["PATH=/bin"]})
    if name == "CreateContainer":
        out.append(m.request(container_id="fzc", exec_id="fzc", OCI=oci.spec_from_dict(spec_dict(env))))
    elif name == "ExecProcess":
        out.append(m.request(container_id="fz", exec_id="fze", process=proc))
    elif name in ("StartContainer", "RemoveContainer", "PauseContainer", "ResumeContainer",
                  "StatsContainer"):
        out.append(m.request(container_id="fz"))
    elif name in ("SignalProcess", "WaitProcess", "CloseStdin", "TtyWinResize"):
        out.append(m.request(container_id="fz", exec_id="fz"))
    elif name in ("ReadStdout", "ReadStderr"):
        out.append(m.request(container_id="fz", exec_id="fz", len=1024))
    elif name == "WriteStdin":
        out.append(m.request(container_id="fz", exec_id="fz", data=b"hello\n"))
    elif name == "UpdateContainer":
        out.append(m.request(container_id="fz", resources=oci.resources_from_dict(
            {"memory": {"limit": 32 << 20}, "cpu": {"shares": 512}, "pids": {"limit": 32}})))
    elif name == "CopyFile":
        out.append(m.request(path="/run/kata-containers/shared/containers/fz/etc/hosts", file_size=5,
                             file_mode=0o100644, dir_mode=0o755, data=b"hosts"))
    elif name == "UpdateInterface":
        from kagent.protocols import types_pb2
        out.append(m.request(interface=types_pb2.Interface(
            name="lo", mtu=65536, IPAddresses=[types_pb2.IPAddress(address="127.0.0.1", mask="8")])))
    elif name == "SetIPTables":
        out.append(m.request(data=b"*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"))
    elif name == "GetVolumeStats":
        out.append(m.request(volume_guest_path="/run/fz"))
    elif name == "SetGuestDateTime":
        out.append(m.request(Sec=int(time.time())))
    elif name == "ReseedRandomDev":
        out.append(m.request(data=b"\x01" * 64))
    elif name == "SetPolicy":
        out.append(m.request(policy="package agent_policy\ndefault CreateContainerRequest := true\n"))
    elif name == "GetDiagnosticData":
        out.append(m.request(log_type="termination-log", container_id="fz"))
    return out


# --- making requests safe for this host ------------------------------------------------------------


def _under(base: str, path: str) -> str:
    """``path`` made relative and put under ``base`` (``..`` kept: the agent must cope)."""
    return os.path.join(base, path.lstrip("/")) if path else ""


def _sanitize_storages(storages, env: Env) -> None:
    for s in storages:
        s.mount_point = _under("/run/fz/storage", s.mount_point)
        s.source = _under("/run/fz/src", s.source)


def _sanitize_spec(spec, env: Env) -> None:
    if spec.HasField("Root") and spec.Root.Path not in ("", env.rootfs):
        spec.Root.Path = env.rootfs  # a random root could be the host's /: never
    spec.ClearField("Hooks")  # hooks run host binaries with the spec's arguments
    if spec.HasField("Process") and spec.Process.Args:
        spec.Process.Args[:] = SAFE_ARGS[len(spec.Process.Args) % len(SAFE_ARGS)]
    for ns in spec.Linux.Namespaces:
        ns.Path = ""  # joining a namespace by path could join the host's
    for m in spec.Mounts:
        if m.type not in ("", "bind", "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"):
            m.type = "fzfs-" + m.type[:8]  # an unknown filesystem: ENODEV, never a host disk
        if m.type in ("", "bind") or "bind" in m.options or "rbind" in m.options:
            m.source = _under(env.binds, m.source) if m.source else env.binds


def sanitize_create_container(req, env: Env) -> None:
    if req.HasField("OCI"):
        _sanitize_spec(req.OCI, env)
    _sanitize_storages(req.storages, env)
    for d in req.devices:
        d.vm_path = _under("/run/fz/dev", d.vm_path)


def sanitize_exec(req, env: Env) -> None:
    if req.HasField("process") and req.process.Args:
        req.process.Args[:] = SAFE_ARGS[len(req.process.Args) % len(SAFE_ARGS)]


def sanitize_create_sandbox(req, env: Env) -> None:
    req.guest_hook_path = ""  # would run the hooks found there
    req.ClearField("kernel_modules")  # modprobe: CAP_SYS_MODULE is gone anyway
    _sanitize_storages(req.storages, env)


def sanitize_ephemeral(req, env: Env) -> None:
    _sanitize_storages(req.storages, env)


def sanitize_resize(req, env: Env) -> None:
    # a path on a block-device filesystem would have resize2fs run on the host's disk
    req.volume_guest_path = _under("/run/fz", req.volume_guest_path)


def sanitize_swap_path(req, env: Env) -> None:
    req.path = _under(env.swapdir, req.path)  # only files made here, none of them a swap area


def sanitize_datetime(req, env: Env) -> None:
    # CAP_SYS_TIME is out of the agent's bounding set (checked before fuzzing), so this
    # fails with EPERM; and if it ever did not, the clock would be set to now.
    req.Sec = int(time.time()) if req.Sec > 0 else req.Sec


CONSTRAINED: dict[str, tuple[Callable, str]] = {
    "CreateContainer": (sanitize_create_container, "root.path forced to the test rootfs, hooks dropped, "
                        "process args from a safe list, namespace paths dropped, bind sources and "
                        "storage/device paths under the sandbox, unknown fs types made unmountable"),
    "ExecProcess": (sanitize_exec, "process args from a safe list"),
    "CreateSandbox": (sanitize_create_sandbox, "no guest hooks, no kernel modules, storages under /run/fz"),
    "UpdateEphemeralMounts": (sanitize_ephemeral, "mount points under the sandbox's /run/fz"),
    "ResizeVolume": (sanitize_resize, "paths under a tmpfs: resize2fs must never see the host's disk"),
    "AddSwapPath": (sanitize_swap_path, "paths under the workdir, where no swap area exists"),
    "SetGuestDateTime": (sanitize_datetime, "CAP_SYS_TIME dropped (verified); Sec forced to now"),
}
EXCLUDED = {
    "AddSwap": "swapon(2) is machine-wide and CAP_SYS_ADMIN cannot be dropped; a random PCI path can "
               "resolve to a real disk of this host, and only the agent's own swap-signature check "
               "would stand between it and swapon — never rely on the code under test for host safety",
}


def sanitize(name: str, payload: bytes, env: Env) -> bytes:
    """The payload as sent: unchanged, or re-encoded after the method's sanitizer."""
    entry = CONSTRAINED.get(name)
    if entry is None:
        return payload
    req_type = protocols.find(name).request
    try:
        req = req_type.FromString(payload)
    except (DecodeError, RuntimeError, ValueError):
        return payload  # the agent cannot decode it either: INVALID_ARGUMENT, harmless
    before = req.SerializeToString()
    entry[0](req, env)
    after = req.SerializeToString()
    return payload if after == before else after


def _overlay(seed: Message, extra: Message) -> bytes:
    """A valid request with a few random fields laid over it (MergeFrom: lists grow, scalars change)."""
    out = type(seed)()
    out.CopyFrom(seed)
    out.MergeFrom(extra)
    return out.SerializeToString()


def payloads(name: str, env: Env) -> st.SearchStrategy[bytes]:
    req_desc = protocols.find(name).request.DESCRIPTOR
    seed_msgs = seeds(env, name)
    seed_bytes = [s.SerializeToString() for s in seed_msgs]
    return st.one_of(
        st.binary(max_size=256),
        messages(req_desc).map(lambda m: m.SerializeToString()),
        st.builds(_overlay, st.sampled_from(seed_msgs), messages(req_desc)),
        st.sampled_from(seed_bytes).flatmap(mutated),
        st.sampled_from(seed_bytes),
    ).map(lambda p: sanitize(name, p, env))
