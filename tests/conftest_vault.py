"""OpenBao for the tests: one dev server per pytest process (on a free port, so the two xdist
processes each have their own), and a sealed one for the tests that need it.

Each test keeps to a KV path, policy and namespace of its own, so tests share the dev server.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import hvac
import pytest

from sandbox.servers import scratch_dir
from sandbox.servers.openbao import OpenBaoServer, running_openbao


@pytest.fixture(scope="session")
async def openbao() -> AsyncIterator[OpenBaoServer]:
    directory = scratch_dir("astra-test-openbao-")
    try:
        async with running_openbao(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def vault_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source root holding ``directory:astra``, as a worker's ASTRA_OPS_VAULT_SOURCE_ROOT."""
    root = tmp_path_factory.mktemp("vault-sources")
    (root / "astra").mkdir()
    (root / "astra" / "DB_PASSWORD").write_text("sandbox-db-password\n")
    (root / "astra" / "OPENAI_API_KEY").write_text("sandbox-openai-key\n")
    return root


@pytest.fixture
async def sealed_openbao(tmp_path: Path) -> AsyncIterator[tuple[OpenBaoServer, Path]]:
    """An initialised, sealed OpenBao, its root token in its ``token_file`` and its unseal key
    in the file returned beside it."""
    async with running_openbao(tmp_path, "sealed", dev=False) as server:
        init = hvac.Client(url=server.address).sys.initialize(secret_shares=1, secret_threshold=1)
        server.token_file.write_text(init["root_token"] + "\n")
        keys = tmp_path / "unseal.keys"
        keys.write_text("\n".join(init["keys_base64"]) + "\n")
        yield server, keys
