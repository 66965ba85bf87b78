"""Start, wait for and stop a CPU SGLang server (``evict.testing.cpu_server``) from Python.

Tests and scripts need the same three things: a free port, a readiness wait that fails fast with
the server's own log when start-up dies, and a stop that always takes the whole process group
down (SGLang runs a launcher, a scheduler and a detokenizer process; killing only the launcher
leaves the scheduler holding CPU and memory). ``CpuServer`` does those and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evict.testing.cpu_server import cpu_env

__all__ = ["CpuServer", "GpuServer", "ServerStartError", "free_port", "started_together"]


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def started_together(
    servers: Mapping[str, CpuServer], timeout: float
) -> Iterator[dict[str, CpuServer | ServerStartError]]:
    """Start every server at once (their model loads overlap), then wait for each; yield name ->
    the ready server, or its :class:`ServerStartError` so that one server that failed fails only
    the tests that use it. All are stopped on exit, in parallel (each stop waits for SGLang's own
    shutdown, several seconds)."""
    out: dict[str, CpuServer | ServerStartError] = {}
    try:
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            try:
                out[name] = server.wait_ready(timeout)
            except ServerStartError as exc:
                server.stop()
                out[name] = exc
        yield out
    finally:
        with ThreadPoolExecutor(max(len(servers), 1)) as pool:
            list(pool.map(CpuServer.stop, servers.values()))


class CpuServer:
    """One ``python -m evict.testing.cpu_server`` process group, logging to ``log_path``.

    ``args`` are ``sglang.launch_server`` arguments (the CPU flags, the testbed target and
    ``--port`` are added when missing); ``env`` entries are added to the launcher's environment
    (``evict.testing.cpu_server.cpu_env``), and ``None`` values remove a variable.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        name: str = "server",
    ) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port(host)
        self.args = [*args, "--host", host, "--port", str(self.port)]
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else Path(f"{name}.{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    launcher = "evict.testing.cpu_server"

    def base_env(self) -> dict[str, str]:
        """The launcher's environment before ``env`` is applied."""
        return cpu_env()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> CpuServer:
        """Start the process group (returns at once; see ``wait_ready``)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        env = self.base_env()
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.launcher, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() kills every worker
            )
        return self

    def log(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def _rebind(self) -> None:
        """Restart on a new port: the chosen one was taken before the server bound it."""
        self.stop()
        old = self.port
        self.port = free_port(self.host)
        i = len(self.args) - 1 - self.args[::-1].index("--port")
        self.args[i + 1] = str(self.port)
        self.log_path.write_text(
            f"(port {old} was taken before the server bound it; restarted on {self.port})\n"
        )
        self.start()

    def wait_ready(self, timeout: float = 300.0, rebinds: int = 2) -> CpuServer:
        """Block until ``/health`` and ``/v1/models`` answer 200; raise with the log tail if not.

        The port is chosen free before start-up, but another server starting beside this one may
        take it first (SGLang's workers bind ports of their own): uvicorn then logs a bind error and
        hangs. Up to ``rebinds`` times the server is restarted on a fresh port.
        """
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rebinds > 0 and "error while attempting to bind on address" in self.log_tail(2000):
                rebinds -= 1
                self._rebind()
                deadline = time.monotonic() + timeout
                continue
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {self.proc.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.get_json("/v1/models")
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                pass
            time.sleep(1.0)
        raise ServerStartError(
            f"{self.name} not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``timeout`` s. Idempotent."""
        if self.paused:  # a stopped group would not act on SIGTERM until continued
            self.resume()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the launcher leads its own group
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end and _group_alive(pgid):
                if proc.poll() is None:
                    try:
                        proc.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(0.2)
            if not _group_alive(pgid):
                break
        if proc.poll() is None:
            proc.wait(timeout=5)

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` stopped the process group (and :meth:`resume` has not yet continued it)."""
        return self._paused

    def pause(self) -> None:
        """SIGSTOP the whole process group (launcher, scheduler, detokenizer).

        Why: an idle SGLang CPU scheduler busy-polls at 100% of a core, so servers that wait side by
        side on a small machine slow the one being measured. A stopped group uses no CPU and keeps
        its state (model, KV pool, sockets); :meth:`resume` continues it. Requests sent meanwhile
        wait in the kernel's socket buffers. A no-op when not started.
        """
        if self.proc is None or self.paused:
            return
        self._signal_group(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the process group stopped by :meth:`pause`. A no-op when not paused."""
        if self.proc is None or not self.paused:
            return
        self._signal_group(signal.SIGCONT)
        self._paused = False

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session: the launcher leads its own group
        except ProcessLookupError:
            pass

    def __enter__(self) -> CpuServer:
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GpuServer(CpuServer):
    """The same process-group handling for ``python -m evict.testing.gpu_server`` (SGLang on CUDA)."""

    launcher = "evict.testing.gpu_server"

    def base_env(self) -> dict[str, str]:
        from evict.testing.gpu_server import gpu_env

        return gpu_env()
