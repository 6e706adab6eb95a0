"""Label and field selectors, parsed the way the API server reads ``?labelSelector=``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE = r"[-A-Za-z0-9_.]*"
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")
_EQUALITY = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^)]*)\)$")
FIELD_SELECTABLE = ("metadata.name", "metadata.namespace", "status.phase")


class SelectorError(ValueError):
    """A selector the server cannot parse; answered with 400 BadRequest."""


@dataclass(frozen=True)
class Requirement:
    """One term of a selector: ``key op values``."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a label set satisfies this term (same semantics as apimachinery)."""
        present = self.key in labels
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present


def _terms(text: str) -> list[str]:
    """Split on commas that are not inside ``in (...)`` value lists."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    terms.append(current.strip())
    return [t for t in terms if t]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse ``app=x,tier!=db,env in (a,b),!legacy`` into requirements."""
    requirements = []
    for term in _terms(text or ""):
        if m := _SET.match(term):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQUALITY.match(term):
            op = "!=" if m.group(2) == "!=" else "="
            requirements.append(Requirement(m.group(1), op, (m.group(3),)))
        elif m := _EXISTS.match(term):
            requirements.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
    return requirements


def matches_labels(requirements: list[Requirement], labels: dict[str, str] | None) -> bool:
    """Whether every requirement holds for the labels."""
    return all(r.matches(labels or {}) for r in requirements)


def label_selector_requirements(selector: dict[str, Any]) -> list[Requirement]:
    """Turn a structured ``LabelSelector`` (matchLabels/matchExpressions) into requirements."""
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}
    match_labels = selector.get("matchLabels") or {}
    requirements = [Requirement(k, "=", (v,)) for k, v in match_labels.items()]
    for expr in selector.get("matchExpressions") or []:
        op = ops.get(expr.get("operator", ""))
        if op is None:
            raise SelectorError(f"unknown selector operator {expr.get('operator')!r}")
        requirements.append(Requirement(expr["key"], op, tuple(expr.get("values") or ())))
    return requirements


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    """Parse ``metadata.name=x,status.phase!=Running`` into (field, op, value) triples."""
    result = []
    for term in _terms(text or ""):
        m = re.match(r"^([a-zA-Z.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise SelectorError(f"invalid field selector: {term!r}")
        if m.group(1) not in FIELD_SELECTABLE:
            raise SelectorError(
                f'"{m.group(1)}" is not a known field selector: only {", ".join(FIELD_SELECTABLE)}'
            )
        result.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return result


def matches_fields(terms: list[tuple[str, str, str]], obj: dict[str, Any]) -> bool:
    """Whether an object satisfies every field selector term."""
    for path, op, expected in terms:
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        actual = "" if node is None else str(node)
        if (actual == expected) != (op == "="):
            return False
    return True
