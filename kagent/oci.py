"""OCI specs as the host sends them (grpc.Spec) → runtime-spec JSON dicts.

The Kata host runtime converts the runtime-spec into oci.proto messages whose
field names keep Go's casing (``Process``, ``UIDMappings``, ``errnoret``).
The container runtime (kagent.runtime) works on the standard JSON form, as
written in config.json, so the two meet here and only here.

proto3 cannot tell "unset" from zero for scalars.  Inside resource limits a
zero means unset (as upstream treats it), so zeros are dropped there; in the
messages listed in ``_KEEP_ZEROS`` a zero is a real value (uid 0, a seccomp
argument 0, major 0) and is kept.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from kagent.protocols import oci_pb2

# Field names whose JSON spelling the generic rule (lower the first letter) gets wrong.
_NAMES = {
    "UID": "uid",
    "GID": "gid",
    "OOMScoreAdj": "oomScoreAdj",
    "UIDMappings": "uidMappings",
    "GIDMappings": "gidMappings",
    "CPU": "cpu",
    "errnoret": "errnoRet",
    "Pagesize": "pageSize",
}

_KEEP_ZEROS = {
    "User", "LinuxSeccompArg", "LinuxIDMapping", "LinuxDevice", "Box", "POSIXRlimit",
    "LinuxDeviceCgroup", "LinuxWeightDevice", "LinuxThrottleDevice", "LinuxInterfacePriority",
    "LinuxHugepageLimit",
}

_DROP = {"Solaris", "Windows"}  # never meaningful inside a Linux guest


def _json_name(message: str, field: str) -> str:
    if message == "Spec" and field == "Version":
        return "ociVersion"
    named = _NAMES.get(field)
    if named is not None:
        return named
    return field[:1].lower() + field[1:]


def _convert(msg: Message) -> dict[str, Any]:
    desc = msg.DESCRIPTOR
    keep_zeros = desc.name in _KEEP_ZEROS
    out: dict[str, Any] = {}
    for fd in desc.fields:
        if fd.name in _DROP:
            continue
        value = getattr(msg, fd.name)
        key = _json_name(desc.name, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if value:
                out[key] = dict(value)
        elif fd.label == FieldDescriptor.LABEL_REPEATED:
            if value:
                is_msg = fd.type == FieldDescriptor.TYPE_MESSAGE
                out[key] = [_convert(v) if is_msg else v for v in value]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if msg.HasField(fd.name):
                out[key] = _convert(value)
        elif fd.containing_oneof is not None:
            if msg.HasField(fd.name):
                out[key] = value
        elif value or (keep_zeros and not isinstance(value, str)):
            out[key] = value
    return out


def spec_to_dict(spec: oci_pb2.Spec) -> dict[str, Any]:
    """The runtime-spec JSON form of a grpc.Spec."""
    return _convert(spec)


def process_to_dict(process: oci_pb2.Process) -> dict[str, Any]:
    """The runtime-spec JSON form of a grpc.Process (ExecProcess)."""
    return _convert(process)


def resources_to_dict(resources: oci_pb2.LinuxResources) -> dict[str, Any]:
    """The runtime-spec JSON form of grpc.LinuxResources (UpdateContainer)."""
    return _convert(resources)


def _fill(msg: Message, data: dict[str, Any]) -> Message:
    desc = msg.DESCRIPTOR
    known = {}
    for fd in desc.fields:
        if fd.name not in _DROP:
            known[_json_name(desc.name, fd.name)] = fd
    for key, value in data.items():
        fd = known.get(key)
        if fd is None:
            raise ValueError(f"{desc.name}: unknown field {key!r}")
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            getattr(msg, fd.name).update({str(k): str(v) for k, v in value.items()})
        elif fd.label == FieldDescriptor.LABEL_REPEATED:
            target = getattr(msg, fd.name)
            for item in value:
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(getattr(msg, fd.name), value)
        else:
            setattr(msg, fd.name, value)
    return msg


def spec_from_dict(data: dict[str, Any]) -> oci_pb2.Spec:
    """A grpc.Spec from runtime-spec JSON (what a host runtime sends; tests and tools)."""
    return _fill(oci_pb2.Spec(), data)  # type: ignore[return-value]


def process_from_dict(data: dict[str, Any]) -> oci_pb2.Process:
    return _fill(oci_pb2.Process(), data)  # type: ignore[return-value]


def resources_from_dict(data: dict[str, Any]) -> oci_pb2.LinuxResources:
    return _fill(oci_pb2.LinuxResources(), data)  # type: ignore[return-value]
