"""What `vault-setup` may read is bounded by the worker's settings, never by the request."""

from __future__ import annotations

from pathlib import Path

import pytest

from activities.secret_sources import SecretSource, SourceError, read_source


def read(text: str, root: Path | None, prefix: str | None = None, **environ: str) -> dict[str, str]:
    return read_source(SecretSource.parse(text), root, prefix, environ)


def test_a_file_of_key_value_lines_and_a_directory_of_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "astra.env").write_text("# comment\n\nexport A=1\nB='two words'\n")
    (tmp_path / "mounted").mkdir()
    (tmp_path / "mounted" / "TOKEN").write_text("abc\n")
    (tmp_path / "mounted" / "..data").mkdir()  # a Secret volume's bookkeeping
    assert read("file:astra.env", tmp_path) == {"A": "1", "B": "two words"}
    assert read("directory:mounted", tmp_path) == {"TOKEN": "abc"}


def test_nothing_outside_the_source_root_is_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "worker.env").write_text("ASTRA_OPS_VAULT_TOKEN=root-token\n")
    (root / "link").symlink_to(tmp_path / "worker.env")
    (root / "dir").mkdir()
    (root / "dir" / "KEY").symlink_to(tmp_path / "worker.env")
    for text in ("file:../worker.env", f"file:{tmp_path}/worker.env", "file:link"):
        with pytest.raises(SourceError, match="outside ASTRA_OPS_VAULT_SOURCE_ROOT"):
            read(text, root)
    with pytest.raises(SourceError, match="links outside ASTRA_OPS_VAULT_SOURCE_ROOT"):
        read("directory:dir", root)
    with pytest.raises(SourceError, match="ASTRA_OPS_VAULT_SOURCE_ROOT is not set"):
        read("file:x", None)


def test_environment_sources_must_use_the_settings_prefix() -> None:
    env = {"ASTRA_SECRET_DB": "pw", "ASTRA_OPS_VAULT_TOKEN": "root-token"}
    assert read("env:ASTRA_SECRET_", None, "ASTRA_SECRET_", **env) == {"DB": "pw"}
    with pytest.raises(SourceError, match="does not start with ASTRA_OPS_VAULT_SOURCE_ENV_PREFIX"):
        read("env:ASTRA_OPS_", None, "ASTRA_SECRET_", **env)
    with pytest.raises(SourceError, match="ASTRA_OPS_VAULT_SOURCE_ENV_PREFIX is not set"):
        read("env:ASTRA_SECRET_", None, None, **env)


def test_errors_name_the_line_never_the_value(tmp_path: Path) -> None:
    (tmp_path / "bad.env").write_text("GOOD=1\nhunter2-no-equals-sign\n")
    (tmp_path / "empty.env").write_text("# nothing\n")
    with pytest.raises(SourceError) as bad:
        read("file:bad.env", tmp_path)
    assert str(bad.value) == "bad.env line 2 is not KEY=value"
    with pytest.raises(SourceError, match="holds no secrets"):
        read("file:empty.env", tmp_path)
    with pytest.raises(SourceError, match="is not a source"):
        SecretSource.parse("vault:secret/astra")
