"""Run `signing-proxy` as a real process: for memory figures, signals, and the CLI as users run it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


class ProxyProcess:
    """`python -m signing_proxy serve -c CONFIG` on free ports; stderr kept for assertions."""

    def __init__(self, config: Path, *extra: str, env: dict[str, str] | None = None):
        self.config = config
        self.log = config.with_suffix(".log")
        with self.log.open("wb") as log_file:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "signing_proxy", "serve", "-c", str(config), *extra],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(
        self, admin_url: str, *, path: str = "/healthz", timeout: float = 15
    ) -> float:
        """Seconds from now until `path` answers 200 (fails if the process exits first)."""
        start = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - start < timeout:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"proxy exited with {self.proc.returncode}: {self.output()}"
                    )
                try:
                    async with session.get(admin_url + path) as resp:
                        if resp.status == 200:
                            return time.monotonic() - start
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.02)
        raise AssertionError(f"not ready within {timeout}s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
