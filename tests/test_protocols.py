"""Wire-compatibility checks of kagent/protocols against upstream kata-containers.

The expected names and numbers below were taken from upstream's .proto files
(src/libs/protocols/protos) and the kata-agent API reference; they are written
out by hand here on purpose, so that a careless edit of a .proto file fails.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.empty_pb2 import Empty

from kagent import protocols
from kagent.protocols import agent_pb2, csi_pb2, health_pb2, oci_pb2, ttrpc_pb2, types_pb2

# ---------------------------------------------------------------------------
# Method registry
# ---------------------------------------------------------------------------

# (method, request type, response type) for all 42 AgentService RPCs.
AGENT_RPCS = [
    ("CreateContainer", "grpc.CreateContainerRequest", "google.protobuf.Empty"),
    ("StartContainer", "grpc.StartContainerRequest", "google.protobuf.Empty"),
    ("RemoveContainer", "grpc.RemoveContainerRequest", "google.protobuf.Empty"),
    ("ExecProcess", "grpc.ExecProcessRequest", "google.protobuf.Empty"),
    ("SignalProcess", "grpc.SignalProcessRequest", "google.protobuf.Empty"),
    ("WaitProcess", "grpc.WaitProcessRequest", "grpc.WaitProcessResponse"),
    ("UpdateContainer", "grpc.UpdateContainerRequest", "google.protobuf.Empty"),
    ("UpdateEphemeralMounts", "grpc.UpdateEphemeralMountsRequest", "google.protobuf.Empty"),
    ("StatsContainer", "grpc.StatsContainerRequest", "grpc.StatsContainerResponse"),
    ("PauseContainer", "grpc.PauseContainerRequest", "google.protobuf.Empty"),
    ("ResumeContainer", "grpc.ResumeContainerRequest", "google.protobuf.Empty"),
    (
        "RemoveStaleVirtiofsShareMounts",
        "grpc.RemoveStaleVirtiofsShareMountsRequest",
        "google.protobuf.Empty",
    ),
    ("GetDiagnosticData", "grpc.GetDiagnosticDataRequest", "grpc.GetDiagnosticDataResponse"),
    ("WriteStdin", "grpc.WriteStreamRequest", "grpc.WriteStreamResponse"),
    ("ReadStdout", "grpc.ReadStreamRequest", "grpc.ReadStreamResponse"),
    ("ReadStderr", "grpc.ReadStreamRequest", "grpc.ReadStreamResponse"),
    ("CloseStdin", "grpc.CloseStdinRequest", "google.protobuf.Empty"),
    ("TtyWinResize", "grpc.TtyWinResizeRequest", "google.protobuf.Empty"),
    ("UpdateInterface", "grpc.UpdateInterfaceRequest", "types.Interface"),
    ("UpdateRoutes", "grpc.UpdateRoutesRequest", "grpc.Routes"),
    ("ListInterfaces", "grpc.ListInterfacesRequest", "grpc.Interfaces"),
    ("ListRoutes", "grpc.ListRoutesRequest", "grpc.Routes"),
    ("AddARPNeighbors", "grpc.AddARPNeighborsRequest", "google.protobuf.Empty"),
    ("GetIPTables", "grpc.GetIPTablesRequest", "grpc.GetIPTablesResponse"),
    ("SetIPTables", "grpc.SetIPTablesRequest", "grpc.SetIPTablesResponse"),
    ("GetMetrics", "grpc.GetMetricsRequest", "grpc.Metrics"),
    ("MemAgentMemcgSet", "grpc.MemAgentMemcgConfig", "google.protobuf.Empty"),
    ("MemAgentCompactSet", "grpc.MemAgentCompactConfig", "google.protobuf.Empty"),
    ("CreateSandbox", "grpc.CreateSandboxRequest", "google.protobuf.Empty"),
    ("DestroySandbox", "grpc.DestroySandboxRequest", "google.protobuf.Empty"),
    ("OnlineCPUMem", "grpc.OnlineCPUMemRequest", "google.protobuf.Empty"),
    ("ReseedRandomDev", "grpc.ReseedRandomDevRequest", "google.protobuf.Empty"),
    ("GetGuestDetails", "grpc.GuestDetailsRequest", "grpc.GuestDetailsResponse"),
    ("MemHotplugByProbe", "grpc.MemHotplugByProbeRequest", "google.protobuf.Empty"),
    ("SetGuestDateTime", "grpc.SetGuestDateTimeRequest", "google.protobuf.Empty"),
    ("CopyFile", "grpc.CopyFileRequest", "google.protobuf.Empty"),
    ("GetOOMEvent", "grpc.GetOOMEventRequest", "grpc.OOMEvent"),
    ("AddSwap", "grpc.AddSwapRequest", "google.protobuf.Empty"),
    ("AddSwapPath", "grpc.AddSwapPathRequest", "google.protobuf.Empty"),
    ("GetVolumeStats", "grpc.VolumeStatsRequest", "grpc.VolumeStatsResponse"),
    ("ResizeVolume", "grpc.ResizeVolumeRequest", "google.protobuf.Empty"),
    ("SetPolicy", "grpc.SetPolicyRequest", "google.protobuf.Empty"),
]

HEALTH_RPCS = [
    ("Check", "grpc.CheckRequest", "grpc.HealthCheckResponse"),
    ("Version", "grpc.CheckRequest", "grpc.VersionCheckResponse"),
]


def test_agent_rpc_table_is_complete():
    assert len(AGENT_RPCS) == 42
    assert len({name for name, _, _ in AGENT_RPCS}) == 42


def test_registry_covers_exactly_the_two_services():
    table = protocols.methods()
    expected = {("grpc.AgentService", n) for n, _, _ in AGENT_RPCS} | {
        ("grpc.Health", n) for n, _, _ in HEALTH_RPCS
    }
    assert set(table) == expected
    assert len(table) == 44
    assert protocols.SERVICES == ("grpc.AgentService", "grpc.Health")


@pytest.mark.parametrize(
    "service, name, req, resp",
    [("grpc.AgentService", *row) for row in AGENT_RPCS]
    + [("grpc.Health", *row) for row in HEALTH_RPCS],
)
def test_method_types(service, name, req, resp):
    method = protocols.methods()[(service, name)]
    assert method == protocols.find(name)
    assert method.service == service
    assert method.name == name
    assert method.request.DESCRIPTOR.full_name == req
    assert method.response.DESCRIPTOR.full_name == resp
    # The classes are usable message classes that round-trip an empty message.
    assert method.request.FromString(method.request().SerializeToString()) == method.request()


def test_registry_classes_are_the_generated_ones():
    assert protocols.find("CreateContainer").request is agent_pb2.CreateContainerRequest
    assert protocols.find("CreateContainer").response is Empty
    assert protocols.find("UpdateInterface").response is types_pb2.Interface
    assert protocols.find("GetVolumeStats").response is csi_pb2.VolumeStatsResponse
    assert protocols.find("Check").request is health_pb2.CheckRequest


def test_find_unknown_raises_keyerror():
    with pytest.raises(KeyError):
        protocols.find("NoSuchMethod")
    with pytest.raises(KeyError):
        protocols.find("grpc.AgentService/CreateContainer")


def test_methods_returns_a_copy():
    table = protocols.methods()
    table.clear()
    assert len(protocols.methods()) == 44


# ---------------------------------------------------------------------------
# Packages, message counts and spot-checked field numbers
# ---------------------------------------------------------------------------


def _messages(fd):
    def walk(d):
        for m in d.values():
            if m.GetOptions().map_entry:
                continue
            yield m
            yield from walk(m.nested_types_by_name)

    return list(walk(fd.message_types_by_name))


@pytest.mark.parametrize(
    "module, package, n_messages, n_fields",
    [
        (agent_pb2, "grpc", 72, 194),
        (oci_pb2, "grpc", 31, 139),
        (types_pb2, "types", 4, 24),
        (csi_pb2, "grpc", 3, 8),
        (health_pb2, "grpc", 3, 4),
        (ttrpc_pb2, "ttrpc", 5, 13),
    ],
)
def test_file_shapes(module, package, n_messages, n_fields):
    fd = module.DESCRIPTOR
    assert fd.package == package
    msgs = _messages(fd)
    assert len(msgs) == n_messages
    assert sum(len(m.fields) for m in msgs) == n_fields


def test_agent_imports_plain_file_names():
    deps = {d.name for d in agent_pb2.DESCRIPTOR.dependencies}
    assert deps == {"oci.proto", "types.proto", "csi.proto", "google/protobuf/empty.proto"}


_T = FieldDescriptor

# (message full name, field name, number, type, label)
FIELDS = [
    ("grpc.CreateContainerRequest", "container_id", 1, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.CreateContainerRequest", "string_user", 3, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.CreateContainerRequest", "devices", 4, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.CreateContainerRequest", "storages", 5, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.CreateContainerRequest", "OCI", 6, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.CreateContainerRequest", "sandbox_pidns", 7, _T.TYPE_BOOL, _T.LABEL_OPTIONAL),
    ("grpc.CreateContainerRequest", "shared_mounts", 8, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.CreateContainerRequest", "stderr_port", 11, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.ExecProcessRequest", "process", 4, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.ExecProcessRequest", "stdin_port", 5, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.RemoveContainerRequest", "timeout", 2, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.SignalProcessRequest", "signal", 3, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.WaitProcessResponse", "status", 1, _T.TYPE_INT32, _T.LABEL_OPTIONAL),
    ("grpc.ReadStreamRequest", "len", 3, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.WriteStreamRequest", "data", 3, _T.TYPE_BYTES, _T.LABEL_OPTIONAL),
    ("grpc.ReseedRandomDevRequest", "data", 2, _T.TYPE_BYTES, _T.LABEL_OPTIONAL),
    ("grpc.FSGroup", "group_id", 2, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.FSGroup", "group_change_policy", 3, _T.TYPE_ENUM, _T.LABEL_OPTIONAL),
    ("grpc.Storage", "fs_group", 7, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Storage", "shared", 8, _T.TYPE_BOOL, _T.LABEL_OPTIONAL),
    ("grpc.SetGuestDateTimeRequest", "Sec", 1, _T.TYPE_INT64, _T.LABEL_OPTIONAL),
    ("grpc.SetGuestDateTimeRequest", "Usec", 2, _T.TYPE_INT64, _T.LABEL_OPTIONAL),
    ("grpc.MemHotplugByProbeRequest", "memHotplugProbeAddr", 1, _T.TYPE_UINT64, _T.LABEL_REPEATED),
    ("grpc.AddSwapRequest", "PCIPath", 1, _T.TYPE_UINT32, _T.LABEL_REPEATED),
    ("grpc.StringUser", "additionalGids", 3, _T.TYPE_STRING, _T.LABEL_REPEATED),
    ("grpc.CopyFileRequest", "file_size", 2, _T.TYPE_INT64, _T.LABEL_OPTIONAL),
    ("grpc.CopyFileRequest", "uid", 5, _T.TYPE_INT32, _T.LABEL_OPTIONAL),
    ("grpc.CopyFileRequest", "data", 8, _T.TYPE_BYTES, _T.LABEL_OPTIONAL),
    ("grpc.AgentDetails", "extra_features", 6, _T.TYPE_STRING, _T.LABEL_REPEATED),
    ("grpc.GuestDetailsResponse", "support_mem_hotplug_probe", 3, _T.TYPE_BOOL, _T.LABEL_OPTIONAL),
    ("grpc.Interfaces", "Interfaces", 1, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.Routes", "Routes", 1, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.ARPNeighbors", "ARPNeighbors", 1, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.GetDiagnosticDataRequest", "container_id", 2, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.MemAgentCompactConfig", "compact_sec_max", 5, _T.TYPE_INT64, _T.LABEL_OPTIONAL),
    ("grpc.MemAgentCompactConfig", "compact_force_times", 8, _T.TYPE_UINT64, _T.LABEL_OPTIONAL),
    # types.proto
    ("types.Interface", "IPAddresses", 3, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("types.Interface", "mtu", 4, _T.TYPE_UINT64, _T.LABEL_OPTIONAL),
    ("types.Interface", "hwAddr", 5, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("types.Interface", "devicePath", 6, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("types.Interface", "type", 7, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("types.Interface", "raw_flags", 8, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("types.Route", "family", 6, _T.TYPE_ENUM, _T.LABEL_OPTIONAL),
    ("types.Route", "flags", 7, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("types.Route", "mtu", 8, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("types.ARPNeighbor", "toIPAddress", 1, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("types.ARPNeighbor", "state", 4, _T.TYPE_INT32, _T.LABEL_OPTIONAL),
    # oci.proto: Spec 1..10 and a few deeper ones
    ("grpc.Spec", "Version", 1, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Process", 2, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Root", 3, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Hostname", 4, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Mounts", 5, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.Spec", "Hooks", 6, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Annotations", 7, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.Spec", "Linux", 8, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Solaris", 9, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Spec", "Windows", 10, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.Process", "OOMScoreAdj", 11, _T.TYPE_INT64, _T.LABEL_OPTIONAL),
    ("grpc.Process", "SelinuxLabel", 12, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.User", "AdditionalGids", 3, _T.TYPE_UINT32, _T.LABEL_REPEATED),
    ("grpc.Mount", "destination", 1, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.Mount", "options", 4, _T.TYPE_STRING, _T.LABEL_REPEATED),
    ("grpc.Hooks", "StartContainer", 6, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.Linux", "IntelRdt", 13, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.LinuxResources", "Network", 7, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.LinuxMemory", "DisableOOMKiller", 7, _T.TYPE_BOOL, _T.LABEL_OPTIONAL),
    ("grpc.LinuxCPU", "Mems", 7, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("grpc.LinuxBlockIO", "ThrottleWriteIOPSDevice", 7, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("grpc.LinuxSyscall", "errnoret", 3, _T.TYPE_UINT32, _T.LABEL_OPTIONAL),
    ("grpc.LinuxSyscall", "Args", 4, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    # csi.proto and health.proto
    ("grpc.VolumeStatsResponse", "volume_condition", 2, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("grpc.VolumeUsage", "unit", 4, _T.TYPE_ENUM, _T.LABEL_OPTIONAL),
    ("grpc.HealthCheckResponse", "status", 1, _T.TYPE_ENUM, _T.LABEL_OPTIONAL),
    ("grpc.VersionCheckResponse", "agent_version", 2, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    # ttrpc envelope
    ("ttrpc.Request", "service", 1, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("ttrpc.Request", "method", 2, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("ttrpc.Request", "payload", 3, _T.TYPE_BYTES, _T.LABEL_OPTIONAL),
    ("ttrpc.Request", "timeout_nano", 4, _T.TYPE_INT64, _T.LABEL_OPTIONAL),
    ("ttrpc.Request", "metadata", 5, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("ttrpc.KeyValue", "key", 1, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("ttrpc.KeyValue", "value", 2, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("ttrpc.Response", "status", 1, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL),
    ("ttrpc.Response", "payload", 2, _T.TYPE_BYTES, _T.LABEL_OPTIONAL),
    ("ttrpc.Status", "code", 1, _T.TYPE_INT32, _T.LABEL_OPTIONAL),
    ("ttrpc.Status", "message", 2, _T.TYPE_STRING, _T.LABEL_OPTIONAL),
    ("ttrpc.Status", "details", 3, _T.TYPE_MESSAGE, _T.LABEL_REPEATED),
    ("ttrpc.StringList", "list", 1, _T.TYPE_STRING, _T.LABEL_REPEATED),
]

_ALL_MODULES = (agent_pb2, oci_pb2, types_pb2, csi_pb2, health_pb2, ttrpc_pb2)


def _message_descriptor(full_name):
    pool = agent_pb2.DESCRIPTOR.pool
    return pool.FindMessageTypeByName(full_name)


@pytest.mark.parametrize("msg, field, number, ftype, label", FIELDS)
def test_field(msg, field, number, ftype, label):
    fd = _message_descriptor(msg).fields_by_name[field]
    assert fd.number == number
    assert fd.type == ftype
    assert fd.label == label


def test_reseed_has_no_field_1_and_fsgroup_no_field_1():
    assert 1 not in _message_descriptor("grpc.ReseedRandomDevRequest").fields_by_number
    assert 1 not in _message_descriptor("grpc.FSGroup").fields_by_number


def test_ttrpc_status_details_is_any_and_no_google_rpc():
    details = _message_descriptor("ttrpc.Status").fields_by_name["details"]
    assert details.message_type.full_name == "google.protobuf.Any"
    for module in _ALL_MODULES:
        for m in _messages(module.DESCRIPTOR):
            assert not m.full_name.startswith("google.rpc")


@pytest.mark.parametrize(
    "cls, names",
    [
        (
            agent_pb2.MemAgentMemcgConfig,
            [
                "disabled",
                "swap",
                "swappiness_max",
                "period_secs",
                "period_psi_percent_limit",
                "eviction_psi_percent_limit",
                "eviction_run_aging_count_min",
            ],
        ),
        (
            agent_pb2.MemAgentCompactConfig,
            [
                "disabled",
                "period_secs",
                "period_psi_percent_limit",
                "compact_psi_percent_limit",
                "compact_sec_max",
                "compact_order",
                "compact_threshold",
                "compact_force_times",
            ],
        ),
    ],
)
def test_mem_agent_configs_have_presence(cls, names):
    assert [f.name for f in cls.DESCRIPTOR.fields] == names
    assert [f.number for f in cls.DESCRIPTOR.fields] == list(range(1, len(names) + 1))
    for f in cls.DESCRIPTOR.fields:
        assert f.has_presence, f.name
    msg = cls()
    assert not msg.HasField("disabled")
    msg.disabled = False  # an explicit false is still "set"
    assert msg.HasField("disabled")
    assert msg.SerializeToString() == b"\x08\x00"
    assert not cls.FromString(b"").HasField("disabled")
    assert cls.FromString(b"\x08\x00").HasField("disabled")


def test_plain_proto3_fields_have_no_presence():
    assert not agent_pb2.OnlineCPUMemRequest.DESCRIPTOR.fields_by_name["wait"].has_presence


def test_enums():
    assert types_pb2.IPFamily.Value("v4") == 0
    assert types_pb2.IPFamily.Value("v6") == 1
    assert types_pb2.FSGroupChangePolicy.Value("Always") == 0
    assert types_pb2.FSGroupChangePolicy.Value("OnRootMismatch") == 1
    assert dict(health_pb2.HealthCheckResponse.ServingStatus.items()) == {
        "UNKNOWN": 0,
        "SERVING": 1,
        "NOT_SERVING": 2,
    }
    assert dict(csi_pb2.VolumeUsage.Unit.items()) == {"UNKNOWN": 0, "BYTES": 1, "INODES": 2}


# ---------------------------------------------------------------------------
# Wire round trips against hand-encoded bytes
# ---------------------------------------------------------------------------

VARINT, LEN = 0, 2  # the only wire types these schemas use


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int32/int64 negatives are 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def f_varint(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def f_len(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return key(field, LEN) + varint(len(data)) + data


def test_varint_helper():
    assert varint(0) == b"\x00"
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"


def _spec_bytes() -> bytes:
    user = f_varint(1, 1000) + f_varint(2, 1000) + f_len(4, "app")
    process = (
        f_varint(1, 1)  # Terminal
        + f_len(3, user)  # User
        + f_len(4, "sh")  # Args
        + f_len(4, "-c")
        + f_len(5, "PATH=/bin")  # Env
        + f_len(6, "/")  # Cwd
        + f_varint(11, -999)  # OOMScoreAdj (int64, negative)
    )
    root = f_len(1, "/run/kata-containers/c1/rootfs") + f_varint(2, 1)
    mount = f_len(1, "/proc") + f_len(2, "proc") + f_len(3, "proc") + f_len(4, "nosuid")
    annotation = f_len(1, "io.katacontainers.pkg.oci.container_type") + f_len(2, "pod_container")
    memory = f_varint(1, 256 << 20)  # Limit
    cpu = f_varint(1, 1024) + f_varint(2, -1) + f_len(6, "0-1")
    resources = f_len(2, memory) + f_len(3, cpu)
    namespace = f_len(1, "pid")
    linux = f_len(4, resources) + f_len(5, "/kubepods/c1") + f_len(6, namespace)
    return (
        f_len(1, "1.0.2")
        + f_len(2, process)
        + f_len(3, root)
        + f_len(4, "c1-host")
        + f_len(5, mount)
        + f_len(7, annotation)
        + f_len(8, linux)
    )


def test_create_container_request_from_hand_encoded_bytes():
    storage = (
        f_len(1, "virtio-fs")
        + f_len(3, "kataShared")
        + f_len(4, "virtiofs")
        + f_len(5, "ro")
        + f_len(6, "/run/kata-containers/shared/containers/")
        + f_len(7, f_varint(2, 1000) + f_varint(3, 1))  # FSGroup{group_id=2, policy=3}
        + f_varint(8, 1)  # shared
    )
    device = f_len(1, "0000:00:02.0") + f_len(2, "blk") + f_len(4, "/dev/vda")
    raw = (
        f_len(1, "c1")
        + f_len(2, "e1")
        + f_len(3, f_len(1, "0") + f_len(2, "0") + f_len(3, "10"))  # StringUser
        + f_len(4, device)
        + f_len(5, storage)
        + f_len(6, _spec_bytes())  # OCI
        + f_varint(7, 1)
        + f_varint(11, 1027)
    )
    req = agent_pb2.CreateContainerRequest.FromString(raw)

    assert req.container_id == "c1"
    assert req.exec_id == "e1"
    assert list(req.string_user.additionalGids) == ["10"]
    assert req.devices[0].id == "0000:00:02.0"
    assert req.devices[0].container_path == "/dev/vda"
    st = req.storages[0]
    assert (st.driver, st.source, st.fstype, list(st.options)) == (
        "virtio-fs",
        "kataShared",
        "virtiofs",
        ["ro"],
    )
    assert st.mount_point == "/run/kata-containers/shared/containers/"
    assert st.fs_group.group_id == 1000
    assert st.fs_group.group_change_policy == types_pb2.OnRootMismatch
    assert st.shared is True
    assert req.sandbox_pidns is True
    assert req.stderr_port == 1027 and req.stdin_port == 0

    spec = req.OCI
    assert spec.Version == "1.0.2"
    assert spec.Hostname == "c1-host"
    assert spec.Process.Terminal is True
    assert spec.Process.User.UID == 1000 and spec.Process.User.Username == "app"
    assert list(spec.Process.Args) == ["sh", "-c"]
    assert list(spec.Process.Env) == ["PATH=/bin"]
    assert spec.Process.OOMScoreAdj == -999
    assert spec.Root.Path == "/run/kata-containers/c1/rootfs" and spec.Root.Readonly
    assert [(m.destination, m.source, m.type) for m in spec.Mounts] == [("/proc", "proc", "proc")]
    assert dict(spec.Annotations) == {"io.katacontainers.pkg.oci.container_type": "pod_container"}
    assert spec.Linux.Resources.Memory.Limit == 256 << 20
    assert spec.Linux.Resources.CPU.Shares == 1024
    assert spec.Linux.Resources.CPU.Quota == -1
    assert spec.Linux.Resources.CPU.Cpus == "0-1"
    assert spec.Linux.CgroupsPath == "/kubepods/c1"
    assert spec.Linux.Namespaces[0].Type == "pid"

    # Re-encoding gives the same bytes: fields are emitted in number order, as
    # hand-encoded above (map entries encode as key=1, value=2).
    assert req.SerializeToString() == raw


def test_ttrpc_request_from_hand_encoded_bytes():
    payload = agent_pb2.WaitProcessRequest(container_id="c1", exec_id="c1").SerializeToString()
    assert payload == f_len(1, "c1") + f_len(2, "c1")
    raw = (
        f_len(1, "grpc.AgentService")
        + f_len(2, "WaitProcess")
        + f_len(3, payload)
        + f_varint(4, 60_000_000_000)
        + f_len(5, f_len(1, "traceparent") + f_len(2, "00-abc-def-01"))
    )
    req = ttrpc_pb2.Request.FromString(raw)
    assert req.service == "grpc.AgentService"
    assert req.method == "WaitProcess"
    assert req.timeout_nano == 60_000_000_000
    assert [(kv.key, kv.value) for kv in req.metadata] == [("traceparent", "00-abc-def-01")]
    method = protocols.methods()[(req.service, req.method)]
    inner = method.request.FromString(req.payload)
    assert (inner.container_id, inner.exec_id) == ("c1", "c1")
    assert req.SerializeToString() == raw


def test_ttrpc_response_from_hand_encoded_bytes():
    # Success as the Rust server sends it: an explicit, empty status sub-message.
    ok = f_len(1, b"") + f_len(2, f_varint(1, 137))
    resp = ttrpc_pb2.Response.FromString(ok)
    assert resp.HasField("status") and resp.status.code == 0
    assert agent_pb2.WaitProcessResponse.FromString(resp.payload).status == 137

    # Error: code + message, with one Any detail; no payload.
    any_detail = f_len(1, "type.googleapis.com/google.protobuf.Empty") + f_len(2, b"")
    status = f_varint(1, 5) + f_len(2, "invalid exec id") + f_len(3, any_detail)
    err = ttrpc_pb2.Response.FromString(f_len(1, status))
    assert err.status.code == 5
    assert err.status.message == "invalid exec id"
    assert err.status.details[0].type_url == "type.googleapis.com/google.protobuf.Empty"
    assert err.payload == b""

    # A response without any status decodes as code 0 (treated as OK).
    assert ttrpc_pb2.Response.FromString(f_len(2, b"x")).status.code == 0

    # And we encode the same layout.
    built = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=0), payload=f_varint(1, 137))
    assert built.SerializeToString() == ok


def test_negative_int32_and_set_guest_date_time():
    raw = f_varint(1, -1)
    assert agent_pb2.WaitProcessResponse.FromString(raw).status == -1
    raw = f_varint(1, 1_700_000_000) + f_varint(2, 250_000)
    t = agent_pb2.SetGuestDateTimeRequest.FromString(raw)
    assert (t.Sec, t.Usec) == (1_700_000_000, 250_000)


def test_reseed_data_is_field_2():
    req = agent_pb2.ReseedRandomDevRequest(data=b"\x01\x02")
    assert req.SerializeToString() == f_len(2, b"\x01\x02")
    # A field-1 payload is an unknown field, not data.
    assert agent_pb2.ReseedRandomDevRequest.FromString(f_len(1, b"\x01")).data == b""


def test_update_interface_and_routes_wire():
    addr = f_varint(1, 1) + f_len(2, "fd00::2") + f_len(3, "64")
    iface_raw = (
        f_len(1, "eth0")
        + f_len(2, "eth0")
        + f_len(3, addr)
        + f_varint(4, 1500)
        + f_len(5, "02:00:00:00:00:01")
        + f_len(6, "02/00")
        + f_len(7, "veth")
        + f_varint(8, 0x80)
    )
    req = agent_pb2.UpdateInterfaceRequest.FromString(f_len(1, iface_raw))
    iface = req.interface
    assert iface.IPAddresses[0].family == types_pb2.v6
    assert iface.IPAddresses[0].mask == "64"
    assert (iface.mtu, iface.hwAddr, iface.devicePath, iface.type, iface.raw_flags) == (
        1500,
        "02:00:00:00:00:01",
        "02/00",
        "veth",
        0x80,
    )
    route = f_len(1, "10.0.0.0/24") + f_len(3, "eth0") + f_varint(5, 253) + f_varint(8, 1400)
    routes = agent_pb2.UpdateRoutesRequest.FromString(f_len(1, f_len(1, route)))
    r = routes.routes.Routes[0]
    assert (r.dest, r.device, r.scope, r.mtu) == ("10.0.0.0/24", "eth0", 253, 1400)


def test_no_fixed_width_or_zigzag_fields():
    # No field in these files uses a fixed-width wire type; a stray fixed32/64
    # or float/double would be a transcription error.
    fixed = {
        _T.TYPE_FIXED32,
        _T.TYPE_FIXED64,
        _T.TYPE_SFIXED32,
        _T.TYPE_SFIXED64,
        _T.TYPE_FLOAT,
        _T.TYPE_DOUBLE,
        _T.TYPE_SINT32,
        _T.TYPE_SINT64,
    }
    for module in _ALL_MODULES:
        for m in _messages(module.DESCRIPTOR):
            for f in m.fields:
                assert f.type not in fixed, f"{m.full_name}.{f.name}"
