"""The three patch formats the kubernetes client sends, applied to plain JSON objects.

Strategic merge patch is approximated by JSON merge patch (RFC 7386) plus the one strategic rule
runbooks actually lean on: lists of objects with a merge key merge item by item instead of being
replaced wholesale. The key is ``name`` (containers, env, volumes), except for ``ports``, which
merge on ``containerPort`` in a container and on ``port`` in a Service, as Kubernetes' own
patch strategies say.
"""

from __future__ import annotations

import copy
from typing import Any

JSON = Any


class PatchError(ValueError):
    """A patch document that cannot be applied; the server answers 422 with this message."""


_MERGE_KEYS: dict[str, tuple[str, ...]] = {"ports": ("containerPort", "port")}
"""Lists whose merge key is not ``name``, by field: the first key every item carries wins."""


def merge_patch(target: JSON, patch: JSON, *, strategic: bool = False, field: str = "") -> JSON:
    """Apply an RFC 7386 merge patch (``null`` deletes a key); returns a new object. ``field``
    is the name the patched value has in its parent, which picks a list's merge key."""
    if not isinstance(patch, dict):
        if strategic and isinstance(patch, list) and isinstance(target, list):
            merged = _merge_keyed_lists(target, patch, field)
            if merged is not None:
                return merged
        return copy.deepcopy(patch)
    result: dict[str, JSON] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic, field=key)
    return result


def _merge_keyed_lists(target: list[JSON], patch: list[JSON], field: str) -> list[JSON] | None:
    """Merge two lists of objects by their merge key, or None if they are not such lists."""
    items = [*target, *patch]
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    key = next((k for k in _MERGE_KEYS.get(field, ()) if all(k in i for i in items)), "name")
    if not all(isinstance(i.get(key), str | int) for i in items):
        return None
    result = copy.deepcopy(target)
    index = {item[key]: pos for pos, item in enumerate(result)}
    for item in patch:
        if item.get("$patch") == "delete":
            result = [r for r in result if r[key] != item[key]]
            index = {r[key]: pos for pos, r in enumerate(result)}
        elif item[key] in index:
            pos = index[item[key]]
            result[pos] = merge_patch(result[pos], item, strategic=True)
        else:
            index[item[key]] = len(result)
            result.append(copy.deepcopy(item))
    return result


def json_patch(target: JSON, operations: JSON) -> JSON:
    """Apply an RFC 6902 JSON patch (a list of operations); returns a new object."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for number, op in enumerate(operations):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"operation {number} needs 'op' and 'path': {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = _add(doc, path, _value(op))
        elif kind == "remove":
            doc, _ = _remove(doc, path)
        elif kind == "replace":
            doc, _ = _remove(doc, path)
            doc = _add(doc, path, _value(op))
        elif kind == "move":
            doc, moved = _remove(doc, _from(op))
            doc = _add(doc, path, moved)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, _from(op))))
        elif kind == "test":
            if _get(doc, path) != _value(op):
                raise PatchError(f"test operation failed: {path} is not {op['value']!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


def _value(op: dict[str, JSON]) -> JSON:
    if "value" not in op:
        raise PatchError(f"operation {op['op']!r} on {op['path']} needs a 'value'")
    return copy.deepcopy(op["value"])


def _from(op: dict[str, JSON]) -> str:
    source = op.get("from")
    if not isinstance(source, str):
        raise PatchError(f"operation {op['op']!r} needs a 'from' pointer")
    return source


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _parent(doc: JSON, pointer: str) -> tuple[JSON, str]:
    tokens = _tokens(pointer)
    if not tokens:
        raise PatchError("the root cannot be the target of this operation")
    node = doc
    for token in tokens[:-1]:
        node = _child(node, token, pointer)
    return node, tokens[-1]


def _child(node: JSON, token: str, pointer: str) -> JSON:
    if isinstance(node, dict) and token in node:
        return node[token]
    if isinstance(node, list) and token.isdigit() and int(token) < len(node):
        return node[int(token)]
    raise PatchError(f"path {pointer} does not exist")


def _get(doc: JSON, pointer: str) -> JSON:
    node = doc
    for token in _tokens(pointer):
        node = _child(node, token, pointer)
    return node


def _add(doc: JSON, pointer: str, value: JSON) -> JSON:
    if pointer == "":
        return value
    parent, token = _parent(doc, pointer)
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        if token == "-":
            parent.append(value)
        elif token.isdigit() and int(token) <= len(parent):
            parent.insert(int(token), value)
        else:
            raise PatchError(f"index {token} out of range in {pointer}")
    else:
        raise PatchError(f"path {pointer} does not point into an object or a list")
    return doc


def _remove(doc: JSON, pointer: str) -> tuple[JSON, JSON]:
    parent, token = _parent(doc, pointer)
    if isinstance(parent, dict) and token in parent:
        return doc, parent.pop(token)
    if isinstance(parent, list) and token.isdigit() and int(token) < len(parent):
        return doc, parent.pop(int(token))
    raise PatchError(f"path {pointer} does not exist")
