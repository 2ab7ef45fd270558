"""The input of a policy decision: a request as upstream's serde JSON.

Upstream serializes its rust-protobuf messages with serde: every field present under its
proto name (``OCI``, ``Process``, ``container_id``), defaults included, an unset message
is ``null``, 64-bit integers are numbers, enums their numbers, bytes arrays of numbers,
Rust keywords get a trailing ``_`` (``type_``), a oneof is ``{"Variant": value}``.
CopyFileRequest gets upstream's reduced input (no data; a symlink's target as a string).
Policies written for upstream (genpolicy's rules) read exactly this shape.
"""

from __future__ import annotations

import stat
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kagent.errors import InvalidArgument
from kagent.protocols import agent_pb2

_RUST_KEYWORDS = frozenset(
    "as async await break const continue crate dyn else enum extern false fn for if impl in let "
    "loop match mod move mut pub ref return self static struct super trait true type unsafe use "
    "where while abstract become box do final macro override priv typeof unsized virtual yield "
    "try".split())

# how a field becomes JSON (see _plan)
(_SCALAR, _SCALARS, _MESSAGE, _MESSAGES, _MAP, _MESSAGE_MAP, _BYTES, _BYTES_LIST,
 _OPTIONAL, _ONEOF) = range(10)
_plans: dict[str, list[tuple]] = {}


def _plan(desc: Descriptor) -> list[tuple]:
    """(attribute, JSON key, kind, detail) for each field of a message type, computed once."""
    plan = _plans.get(desc.full_name)
    if plan is not None:
        return plan
    plan = _plans[desc.full_name] = []  # registered first: message types may recurse
    oneofs_done: set[str] = set()
    for fd in desc.fields:
        key = fd.name + "_" if fd.name in _RUST_KEYWORDS else fd.name
        oneof = fd.containing_oneof
        if oneof is not None and not (oneof.name == "_" + fd.name and len(oneof.fields) == 1):
            # a real oneof is one Rust field holding an enum: {"Variant": value} or null
            if oneof.name not in oneofs_done:
                oneofs_done.add(oneof.name)
                variants = {f.name: "".join(p[:1].upper() + p[1:] for p in f.name.split("_"))
                            for f in oneof.fields}
                plan.append((oneof.name, oneof.name, _ONEOF, variants))
            continue
        repeated = fd.label == FieldDescriptor.LABEL_REPEATED
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                value = fd.message_type.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_MESSAGE:
                    plan.append((fd.name, key, _MESSAGE_MAP, _plan(value.message_type)))
                else:
                    plan.append((fd.name, key, _MAP, None))
            else:
                plan.append((fd.name, key, _MESSAGES if repeated else _MESSAGE, _plan(fd.message_type)))
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            plan.append((fd.name, key, _BYTES_LIST if repeated else _BYTES, None))
        elif oneof is not None:  # proto3 optional: the value or null
            plan.append((fd.name, key, _OPTIONAL, None))
        else:
            plan.append((fd.name, key, _SCALARS if repeated else _SCALAR, None))
    return plan


def _to_json(msg: Message, plan: list[tuple]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, key, kind, detail in plan:
        if kind == _SCALAR:
            out[key] = getattr(msg, name)
        elif kind == _MESSAGE:
            out[key] = _to_json(getattr(msg, name), detail) if msg.HasField(name) else None
        elif kind == _SCALARS or kind == _BYTES:
            out[key] = list(getattr(msg, name))
        elif kind == _MESSAGES:
            out[key] = [_to_json(m, detail) for m in getattr(msg, name)]
        elif kind == _MAP:
            out[key] = {str(k): v for k, v in getattr(msg, name).items()}
        elif kind == _MESSAGE_MAP:
            out[key] = {str(k): _to_json(v, detail) for k, v in getattr(msg, name).items()}
        elif kind == _BYTES_LIST:
            out[key] = [list(b) for b in getattr(msg, name)]
        elif kind == _OPTIONAL:
            out[key] = getattr(msg, name) if msg.HasField(name) else None
        else:  # _ONEOF
            which = msg.WhichOneof(name)
            out[key] = None if which is None else {detail[which]: getattr(msg, which)}
    return out


_FILE_TYPES = {stat.S_IFREG: "Regular", stat.S_IFDIR: "Directory", stat.S_IFLNK: "Symlink"}


def _copy_file_input(req: agent_pb2.CopyFileRequest) -> dict[str, Any]:
    """Upstream's PolicyCopyFileRequest: the file data never reaches the policy."""
    file_type = _FILE_TYPES.get(stat.S_IFMT(req.file_mode), "Unknown")
    target = None
    if file_type == "Symlink":
        try:
            target = req.data.decode()
        except UnicodeDecodeError:
            raise InvalidArgument(f"CopyFile {req.path}: the symlink target is not valid UTF-8") from None
    return {"path": req.path, "file_type": file_type, "symlink_target": target,
            "file_size": req.file_size, "file_mode": req.file_mode, "dir_mode": req.dir_mode,
            "uid": req.uid, "gid": req.gid, "offset": req.offset}


def request_input(request: Message) -> dict[str, Any]:
    """The policy input for a request, as upstream serializes it."""
    if isinstance(request, agent_pb2.CopyFileRequest):
        return _copy_file_input(request)
    return _to_json(request, _plan(request.DESCRIPTOR))
