"""``serve --workers N``: a small supervisor process and N worker processes.

Each worker is an ordinary ``signing-proxy serve`` (one event loop, both listeners) bound with
SO_REUSEPORT, so the kernel spreads connections over the workers. Metrics are aggregated with
prometheus-client's multiprocess mode: every worker writes its samples to a shared directory and
any worker's /metrics reads them all. The supervisor forwards SIGTERM/SIGINT (so every worker
drains), restarts a worker that dies unexpectedly, and stops on a crash loop.

The supervisor imports nothing heavy: it is a process manager, not a proxy.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType
from typing import Final

from .config import ListenAddress
from .errors import ConfigError

__all__ = ["WORKER_ENV", "check_bindable", "supervise"]

log = logging.getLogger(__name__)

WORKER_ENV: Final = "SIGNING_PROXY_WORKER_INDEX"
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_CRASH_WINDOW: Final = 30.0  # seconds
_MAX_CRASHES: Final = 5


def _mark_dead(pid: int, directory: str) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def check_bindable(addresses: Sequence[ListenAddress]) -> None:
    """ConfigError naming the field unless each address can be bound now (workers would not)."""
    for field, address in zip(("listen", "admin_listen"), addresses, strict=False):
        if address.port == 0:
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
                sock.bind((address.host, address.port))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason += "; is another signing-proxy running?"
            raise ConfigError(f"{field}: cannot listen on {address} ({reason})") from None


def supervise(workers: int, worker_argv: Sequence[str], stop_timeout: float) -> int:
    """Run ``worker_argv`` (a full command line) ``workers`` times until signalled; exit code."""
    own_dir = MULTIPROC_ENV not in os.environ
    directory = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="signing-proxy-metrics-")
    for name in os.listdir(directory):  # stale files from an earlier run would be summed in
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))

    def spawn(index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, MULTIPROC_ENV: directory, WORKER_ENV: str(index)}
        return subprocess.Popen(list(worker_argv), env=env)  # noqa: S603 - our own interpreter and argv

    stopping: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        if not stopping:
            stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = {i: spawn(i) for i in range(workers)}
    log.info(
        "workers started",
        extra={"fields": {"workers": workers, "pids": [p.pid for p in procs.values()]}},
    )
    crashes: list[float] = []
    code = 0
    try:
        while not stopping:
            time.sleep(0.1)
            for index, proc in list(procs.items()):
                if proc.poll() is None or stopping:
                    continue
                _mark_dead(proc.pid, directory)
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < _CRASH_WINDOW] + [now]
                log.error(
                    "worker exited unexpectedly; restarting it",
                    extra={
                        "fields": {"worker": index, "pid": proc.pid, "exit_code": proc.returncode}
                    },
                )
                if len(crashes) >= _MAX_CRASHES:
                    log.error(
                        "workers keep crashing; stopping",
                        extra={"fields": {"crashes": len(crashes)}},
                    )
                    stopping.append(signal.SIGTERM)
                    code = 1
                    break
                procs[index] = spawn(index)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(stopping[0])
        deadline = time.monotonic() + stop_timeout
        for proc in procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker did not stop in time; killing it", extra={"fields": {"pid": proc.pid}}
                )
                proc.kill()
                proc.wait()
            # A worker still starting (importing) when the signal came had no handler for it yet
            # and died of it: it was serving nothing, so that is a clean stop too.
            if proc.returncode not in (0, -stopping[0]):
                code = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    log.info("stopped", extra={"fields": {"exit_code": code}})
    return code


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line for one worker: this program's serve arguments with --workers 1."""
    return [sys.executable, "-m", "signing_proxy", *argv, "--workers", "1"]
