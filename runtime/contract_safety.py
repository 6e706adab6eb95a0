"""Is a new version of a message schema still compatible with the one that is running?

During an upgrade old and new code exchange messages both ways (an old producer's message reaches
a new consumer, a workflow input stored in a history is decoded by the new worker), so a release
may only *widen* a message: add optional fields, accept more. This compares two versions of a
JSON Schema (or of a pydantic model's) and reports what narrows: removed fields, new required
fields, and types that accept less (a type gone from a union, number -> integer, enum values
removed, tighter bounds or lengths, null no longer allowed), recursively through
``properties``, ``items``, unions and ``$ref``/``$defs``.

Pure (schemas in, a report out): the CLI's ``check-contracts`` and the canary's pre-check are thin
adapters over :func:`check_contracts`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


class ContractInputError(Exception):
    """A schema could not be loaded: says which and why."""


class Contract(BaseModel):
    """One version of a message schema, and where it came from."""

    source: str
    schema_: Schema
    retired: list[str] = []
    """Top-level fields the model declares retired (``RunbookRequest.retired``): messages that
    still carry them decode, the field set aside."""


class ContractFinding(BaseModel):
    path: str
    """Where in the message: ``$.statement.act``, ``$.tags[]``."""
    kind: str
    """removed-field, new-required-field, type-removed, number-to-integer, no-longer-nullable,
    enum-values-removed, tighter-bound, new-pattern, closed-to-extra-fields."""
    detail: str
    why: str


class ContractReport(BaseModel):
    old: str
    new: str
    findings: list[ContractFinding]

    @property
    def ok(self) -> bool:
        return not self.findings


def load_contract(spec: str) -> Contract:
    """A JSON Schema file, or ``module:Model`` (a pydantic model, imported as ``python -m`` would
    from the current directory, whose validation JSON Schema is taken)."""
    if Path(spec).is_file() or ":" not in spec:
        try:
            schema = json.loads(Path(spec).read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise ContractInputError(f"{spec}: cannot read it: {err}") from err
        except json.JSONDecodeError as err:
            raise ContractInputError(f"{spec}:{err.lineno}: not JSON: {err.msg}") from err
        if not isinstance(schema, dict):
            raise ContractInputError(f"{spec}: a JSON Schema is an object, not {type(schema)}")
        return Contract(source=spec, schema_=schema)
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        model = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ContractInputError(
            f"{spec}: cannot import it ({err}); give a JSON Schema file or module:Model"
        ) from err
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ContractInputError(f"{spec} is not a pydantic model class")
    retired = sorted(getattr(model, "retired", ()))
    return Contract(source=spec, schema_=model.model_json_schema(), retired=retired)


class _Comparison:
    def __init__(self, old: Contract, new: Contract) -> None:
        self.old_root, self.new_root = old.schema_, new.schema_
        self.retired = set(new.retired)
        self.findings: list[ContractFinding] = []
        self.seen: set[tuple[str, str]] = set()

    def flag(self, path: str, kind: str, detail: str, why: str) -> None:
        self.findings.append(ContractFinding(path=path, kind=kind, detail=detail, why=why))

    def resolve(self, schema: Schema, root: Schema) -> Schema:
        while "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith("#/"):
                raise ContractInputError(f"only local $ref are followed, not {ref!r}")
            target: Any = root
            for part in ref[2:].split("/"):
                target = target[part]
            extra = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **extra}
        return schema

    def branches(self, schema: Schema, root: Schema) -> list[Schema]:
        """The alternatives a schema accepts: its anyOf/oneOf members, or one per listed type."""
        schema = self.resolve(schema, root)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                shared = {k: v for k, v in schema.items() if k not in (key, "default", "title")}
                return [
                    b
                    for member in schema[key]
                    for b in self.branches({**shared, **member} if shared else member, root)
                ]
        kinds = schema.get("type")
        if isinstance(kinds, list):
            return [{**schema, "type": kind} for kind in kinds]
        return [schema]

    def compare(self, old: Schema, new: Schema, path: str) -> None:
        if "$ref" in old and "$ref" in new:
            pair = (old["$ref"], new["$ref"])
            if pair in self.seen:
                return  # a recursive model: each pair of definitions is compared once
            self.seen.add(pair)
        new_branches = self.branches(new, self.new_root)
        if any("type" not in b and "enum" not in b and "properties" not in b for b in new_branches):
            return  # the new schema accepts anything here
        for branch in self.branches(old, self.old_root):
            match = self.match(branch, new_branches)
            if match is None:
                self.missing(branch, new_branches, path)
            else:
                self.compare_branch(branch, match, path)

    def match(self, old: Schema, candidates: list[Schema]) -> Schema | None:
        kind = old.get("type")
        same = [b for b in candidates if b.get("type") == kind]
        if kind == "integer":
            same += [b for b in candidates if b.get("type") == "number"]
        titled = [b for b in same if b.get("title") == old.get("title")]
        return next(iter(titled + same), None)

    def missing(self, old: Schema, new: list[Schema], path: str) -> None:
        kind = old.get("type", "any value")
        kinds = [b.get("type") for b in new]
        if kind == "null":
            self.flag(
                path,
                "no-longer-nullable",
                "null is no longer accepted",
                "messages that carry null here (every old one that left it unset) are refused",
            )
        elif kind == "number" and "integer" in kinds:
            self.flag(
                path,
                "number-to-integer",
                "number became integer",
                "old messages with a fractional value here are refused",
            )
        else:
            self.flag(
                path,
                "type-removed",
                f"{kind} is no longer accepted (now: {', '.join(map(str, kinds))})",
                f"old messages with a {kind} here are refused",
            )

    def compare_branch(self, old: Schema, new: Schema, path: str) -> None:
        old_values, new_values = values(old), values(new)
        if new_values is not None:
            gone = [v for v in old_values or [] if v not in new_values]
            if old_values is None:
                self.flag(path, "enum-values-removed", f"now only {new_values}", REFUSED)
            elif gone:
                self.flag(path, "enum-values-removed", f"{gone} no longer accepted", REFUSED)
        for bound in LOWER_BOUNDS:
            if bound in new and (bound not in old or new[bound] > old[bound]):
                self.tighter(path, bound, old.get(bound), new[bound])
        for bound in UPPER_BOUNDS:
            if bound in new and (bound not in old or new[bound] < old[bound]):
                self.tighter(path, bound, old.get(bound), new[bound])
        if "pattern" in new and new["pattern"] != old.get("pattern"):
            self.flag(path, "new-pattern", f"must match {new['pattern']!r}", REFUSED)
        if old.get("type") == "object" or "properties" in old:
            self.compare_object(old, new, path)
        if "items" in old and isinstance(old["items"], dict) and isinstance(new.get("items"), dict):
            self.compare(old["items"], new["items"], f"{path}[]")

    def tighter(self, path: str, bound: str, old: Any, new: Any) -> None:
        was = f"was {old}" if old is not None else "was unbounded"
        self.flag(path, "tighter-bound", f"{bound} {new} ({was})", REFUSED)

    def compare_object(self, old: Schema, new: Schema, path: str) -> None:
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
        top = path == "$"
        for name in old_props:
            if name in new_props:
                self.compare(old_props[name], new_props[name], f"{path}.{name}")
            elif top and name in self.retired and name not in old_required:
                continue  # still decoded and set aside; old readers never needed it
            else:
                self.flag(
                    f"{path}.{name}",
                    "removed-field",
                    "field removed",
                    "readers of the old version that still run miss it, and old messages that "
                    "carry it are refused where extra fields are forbidden"
                    + ("; list it in the model's `retired` to keep decoding them" if top else ""),
                )
        for name in sorted(new_required - old_required):
            was = "optional before" if name in old_props else "new"
            self.flag(
                f"{path}.{name}",
                "new-required-field",
                f"required ({was})",
                "old messages (in flight, or stored in a running workflow's history) lack it "
                "and are refused; add it with a default instead",
            )
        if (
            new.get("additionalProperties") is False
            and old.get("additionalProperties") is not False
        ):
            self.flag(
                path,
                "closed-to-extra-fields",
                "additional properties are no longer allowed",
                "old messages with fields this version does not declare are refused",
            )


def values(schema: Schema) -> list[Any] | None:
    """The values an enum (or a const, as pydantic writes a one-value Literal) allows."""
    if "enum" in schema:
        return list(schema["enum"])
    return [schema["const"]] if "const" in schema else None


REFUSED = "old messages with values the new version does not accept are refused"


def check_contracts(old: Contract, new: Contract) -> ContractReport:
    comparison = _Comparison(old, new)
    comparison.compare(old.schema_, new.schema_, "$")
    return ContractReport(old=old.source, new=new.source, findings=comparison.findings)
