"""What every server of the data plane shares: a daemon found again through its pid file, so the
process that started it (the dev stack, a test session) and the ones that break it (the CLI's
faults, a runbook's activity) need not be the same.

Servers daemonize (PostgreSQL through ``pg_ctl``, Redis with ``daemonize yes``): a server outlives
a crash of whoever started it, and the next start finds it running and keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import BaseModel

LOG_LINES = 8


class ServerError(RuntimeError):
    """A server could not be started, found or stopped; the message says which and why."""


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks ports from, for outgoing connections and for port 0."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on now, chosen at random below the kernel's ephemeral
    range. The kernel's own pick (port 0) is no good for a server started a moment later: the
    port may go to an outgoing connection or to another process's port-0 pick meanwhile, as two
    test processes side by side showed. Below the range only other callers of this function
    compete, each drawing from thousands of ports."""
    low, _ = ephemeral_ports()
    chooser = random.SystemRandom()
    for _ in range(200):
        port = chooser.randrange(max(1024, low - 16384), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerError(f"no free loopback port below {low} after 200 tries")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (nothing may reap a daemon killed on purpose)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) is all there is to know
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``: PostgreSQL's backends, which each lead a process
    group of their own, so signalling the server's group would miss them."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.parent.name))
    return found


def tail(log: Path, lines: int = LOG_LINES) -> str:
    """The end of a log, for an error message; empty when there is none yet."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Daemon(BaseModel):
    """One server process of ours: its name, loopback port and folder."""

    name: str
    port: int
    dir: Path

    @property
    def log(self) -> Path:
        raise NotImplementedError

    @property
    def pid_file(self) -> Path:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def did_not_start(self, kind: str, said: str) -> ServerError:
        """The error for a server that did not come up: what its starter said, and its log."""
        return ServerError(
            f"{kind} {self.name} did not start on 127.0.0.1:{self.port} ({said}); its log "
            f"{self.log} ends:\n{tail(self.log)}"
        )

    def _signal(self, sig: signal.Signals) -> int | None:
        """Send ``sig`` to the server and the processes it forked; the pid, or None if it was
        not running."""
        pid = self.pid()
        if pid is None:
            return None
        for target in (pid, *children(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
        return pid

    async def kill(self, within: float = 10) -> int | None:
        """SIGKILL, as a crash or a lost machine: nothing is flushed or handed over. Returns
        once the server and what it forked are gone, so that what comes next (a check, a
        restart on the same data) finds it down rather than dying."""
        pid = self.pid()
        if pid is None:
            return None
        forked = [pid, *children(pid)]
        self._signal(signal.SIGKILL)
        await wait_until(
            lambda: not any(alive(p) for p in forked), within, f"{self.name} to die", self.log
        )
        return pid

    def freeze(self) -> int | None:
        """SIGSTOP: the server hangs, its connections open, as on a stalled disk or a long GC
        pause, until :meth:`thaw`."""
        return self._signal(signal.SIGSTOP)

    def thaw(self) -> int | None:
        return self._signal(signal.SIGCONT)

    async def blip(self, seconds: float) -> int | None:
        """Freeze the server for ``seconds``, then let it go on: clients see it hang, then answer
        again with nothing lost."""
        pid = self.freeze()
        if pid is None:
            return None
        try:
            await asyncio.sleep(seconds)
        finally:
            self.thaw()
        return pid

    async def stop(self, within: float = 30) -> None:
        """Stop the server cleanly (its data kept); killed past ``within`` seconds."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, self.stop_signal)  # the server itself: it ends what it forked
        self.thaw()  # a frozen server cannot act on the stop
        try:
            await wait_until(lambda: not alive(pid), within, f"{self.name} to stop", self.log)
        except ServerError:
            await self.kill()

    @property
    def stop_signal(self) -> signal.Signals:
        return signal.SIGTERM


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    within: float,
    what: str,
    log: Path,
    interval: float = 0.1,
) -> None:
    """Poll ``condition`` until it holds; past ``within`` seconds raise, naming the log to read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise ServerError(f"timed out after {within:g}s waiting for {what}; see {log}")
        await asyncio.sleep(interval)
