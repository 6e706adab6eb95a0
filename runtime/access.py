"""The one access policy: who exists, and which on-call group each person belongs to.

The API maps bearer tokens to these names, the CLI takes the name from ``--as`` or
``ASTRA_OPS_USER``, and the approval gate asks this file (through an activity) who may approve.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError


class AccessPolicyError(Exception):
    """The policy file is missing or malformed."""


class Group(BaseModel):
    title: str = ""
    scope: str = ""
    members: list[str] = []


class AccessPolicy(BaseModel):
    groups: dict[str, Group] = {}
    users: list[str] = []

    def known(self, user: str) -> bool:
        return user in self.users or any(user in g.members for g in self.groups.values())

    def groups_of(self, user: str) -> list[str]:
        return sorted(name for name, g in self.groups.items() if user in g.members)

    def members(self, groups: list[str]) -> list[str]:
        return sorted({m for name in groups for m in self.groups.get(name, Group()).members})


def load_policy(path: Path) -> AccessPolicy:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AccessPolicyError(
            f"access policy {path} does not exist; set ASTRA_OPS_ACCESS_POLICY"
        ) from None
    except yaml.YAMLError as err:
        raise AccessPolicyError(f"access policy {path} is not valid YAML: {err}") from None
    try:
        return AccessPolicy.model_validate(raw or {})
    except ValidationError as err:
        raise AccessPolicyError(f"access policy {path} is malformed: {err}") from None
