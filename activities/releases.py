"""The release an upgrade rolls out, as files: its migrations, checked before any pod moves.

Each release keeps its files under ``ASTRA_OPS_RELEASES_ROOT/<tag>/``, named by its image tag:
``migrations/*.sql`` (every migration it ships, in apply order) and ``uses/*.sql`` (the queries
its binary runs). An upgrade from the running image to a new one checks the new release's
migrations that the running one does not have against the running binary's queries: the schema
must stay backward-compatible with the binary that keeps running during the rollout (the
operations wiki's upgrade plan).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def image_tag(image: str) -> str:
    """The tag of an image reference (``latest`` when it names none); a registry port is not a
    tag, and a digest is not a release name."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


class ReleaseMigrationsRequest(BaseModel):
    running_image: str
    new_image: str


class ReleaseMigrations(BaseModel):
    """What the check found; ``checked`` empty and ``skipped`` set when there was nothing to
    check, and why."""

    ok: bool
    checked: list[str] = []
    findings: list[str] = []
    skipped: str = ""

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        if self.ok:
            return f"{len(self.checked)} new migration(s) keep the running binary working"
        return f"{len(self.findings)} finding(s): " + "; ".join(self.findings)


class ReleaseActivities:
    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _release(self, tag: str) -> Path:
        assert self.root is not None
        if not TAG.match(tag):
            raise ApplicationError(
                f"image tag {tag!r} is not a release name (letters, digits, '.', '_', '-')",
                non_retryable=True,
            )
        return self.root / tag

    @activity.defn
    def check_release_migrations(self, req: ReleaseMigrationsRequest) -> ReleaseMigrations:
        """The new release's migrations that the running release does not have, checked against
        the running binary's queries (``runtime.migration_safety``)."""
        if self.root is None:
            return ReleaseMigrations(
                ok=True,
                skipped="not checked: ASTRA_OPS_RELEASES_ROOT is unset, so astra-ops has no "
                "release's migrations to read; set it to check them before upgrades",
            )
        running_tag, new_tag = image_tag(req.running_image), image_tag(req.new_image)
        new = self._release(new_tag) / "migrations"
        if not new.is_dir():
            return ReleaseMigrations(
                ok=True,
                skipped=f"release {new_tag} ships no migrations ({new} does not exist)",
            )
        running = self._release(running_tag)
        if not (running / "migrations").is_dir():
            raise ApplicationError(
                f"release {new_tag} ships migrations, but the running release {running_tag} has "
                f"none recorded under {running}/migrations, so astra-ops cannot tell which are "
                "applied; add the running release's files, or check by hand with "
                "`astra-ops check-migrations`",
                type="ReleaseUnknown",
                non_retryable=True,
            )
        # PostgreSQL's parser loads with this check only, not with every worker import.
        from runtime.migration_safety import (
            SqlFile,
            SqlInputError,
            check_migrations,
            read_migrations_dir,
        )

        try:
            applied_files = read_migrations_dir(running / "migrations")
            uses = sorted((running / "uses").glob("*.sql"))
            report = check_migrations(
                read_migrations_dir(new),
                [SqlFile.read(path) for path in uses] if uses else None,
                max(Path(f.name).name for f in applied_files),
            )
        except SqlInputError as err:
            raise ApplicationError(str(err), type="ReleaseUnreadable", non_retryable=True) from None
        return ReleaseMigrations(
            ok=report.ok,
            checked=report.checked,
            findings=[
                f"{Path(f.file).name}:{f.line}: {f.kind} {f.subject()} — instead: {f.instead}"
                for f in report.findings
            ],
        )
