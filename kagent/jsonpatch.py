"""JSON patch (RFC 6902): how a stateful policy's ``ops`` update its data."""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    pass


def _pointer(path: object) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"bad JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def _index(container: list, token: str, *, append: bool = False) -> int:
    if append and token == "-":
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise PatchError(f"bad array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not append):
        raise PatchError(f"array index {i} out of range")
    return i


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token)]
        else:
            raise PatchError(f"path /{'/'.join(tokens)} does not exist")
    return doc


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def apply_patch(doc: Any, ops: Any) -> Any:
    """``doc`` with the JSON patch ``ops`` applied (the original is left unchanged)."""
    if not isinstance(ops, list):
        raise PatchError("ops is not a list")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError(f"bad operation {op!r}")
        kind, tokens = op["op"], _pointer(op.get("path"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} without a value")
        if kind == "test":
            if not _same(_walk(doc, tokens), op["value"]):
                raise PatchError(f"test failed at {op['path']}")
            continue
        if kind in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = _walk(doc, source)
            if kind == "move":
                if tokens[:len(source)] == source and tokens != source:
                    raise PatchError("cannot move a value into itself")
                doc = _remove(doc, source)
            else:
                value = copy.deepcopy(value)
            doc = _add(doc, tokens, value)
        elif kind == "add":
            doc = _add(doc, tokens, op["value"])
        elif kind == "remove":
            doc = _remove(doc, tokens)
        elif kind == "replace":
            doc = _add(_remove(doc, tokens), tokens, op["value"]) if tokens else op["value"]
        else:
            raise PatchError(f"unknown operation {kind!r}")
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, tokens[-1], append=True), value)
    else:
        raise PatchError(f"cannot add below a {type(parent).__name__}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1])
    if isinstance(parent, dict) and tokens[-1] in parent:
        del parent[tokens[-1]]
    elif isinstance(parent, list):
        del parent[_index(parent, tokens[-1])]
    else:
        raise PatchError(f"path /{'/'.join(tokens)} does not exist")
    return doc
