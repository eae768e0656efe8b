"""Soak test: the proxy under a steady request rate with upstream faults, checked for leaks.

    .venv/bin/python bench/soak.py                # 60 s (default)
    .venv/bin/python bench/soak.py --minutes 10 --rate 80

Loopback only, bounded in time and in requests. It
  1. writes a CA, a CDP key and generated.yaml to a temp dir, and runs the proxy as a subprocess
     (`signing-proxy serve -c generated.yaml`);
  2. serves, in this process, a TLS upstream that answers normally, with 503, resets before
     answering, resets mid-body, or stalls past the upstream timeout (by path), plus a raw TCP
     server that answers garbage, and points one upstream at a closed port (refusals);
  3. sends requests at a fixed rate for the duration (some clients hang up mid-request);
  4. samples the proxy's RSS and open file descriptors every few seconds;
  5. after the load: waits for idle pooled connections to expire, then asserts the descriptor count
     is back near its idle baseline, RSS did not keep growing after warm-up, and nothing is in flight.

Prints errors by code, RSS and descriptors over time, and exits 1 on a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

HOST = "api.coinbase.com"
TIMEOUT = 1.0  # the upstreams' timeout in the generated config
PAGE = 4096
MIX = [  # (weight, what the request asks for)
    (60, "ok"),
    (8, "5xx"),
    (8, "reset"),
    (4, "reset-mid"),
    (4, "stall"),
    (6, "refused"),
    (6, "garbage"),
    (4, "client-abort"),
    (2, "bad-line"),  # a request line that crashes aiohttp's connection task (guard.py)
]
MAX_REQUESTS = 200_000
FD_SLACK = 4  # descriptors allowed above the idle baseline after the settle time
RSS_GROWTH_MIB = 15.0  # RSS allowed above its post-warm-up level at the end


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process, from /proc."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


# --- the faulty upstreams (in this process) ------------------------------------------------------


async def fault_handler(request: web.Request) -> web.StreamResponse:
    kind = request.path.rsplit("/", 1)[-1]
    if kind == "5xx":
        return web.json_response({"message": "unavailable"}, status=503)
    if kind == "reset":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    if kind == "stall":
        await asyncio.sleep(TIMEOUT * 3)
        return web.Response(text="too late")
    if kind == "reset-mid":
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response
    if kind == "client-abort":
        await asyncio.sleep(TIMEOUT * 0.8)  # the client hangs up before this
        return web.Response(text="nobody is listening")
    return web.json_response({"ok": True, "signed": "Authorization" in request.headers})


async def start_upstreams(ca: trustme.CA) -> tuple[web.AppRunner, int, asyncio.AbstractServer, int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fault_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    tls_port = int(runner.addresses[0][1])

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x01 this is not TLS, nor HTTP\r\n" * 4)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    raw = await asyncio.start_server(garbage, "127.0.0.1", 0)
    return runner, tls_port, raw, int(raw.sockets[0].getsockname()[1])


def write_config(
    tmp: Path, ca: trustme.CA, tls_port: int, garbage_port: int
) -> tuple[Path, int, int]:
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    key_file = tmp / "cdp_api_key.json"
    key_file.write_text(json.dumps({"name": "organizations/soak/apiKeys/soak", "privateKey": pem}))
    key_file.chmod(0o600)
    proxy_port, admin_port = free_port(), free_port()

    def upstream(url: str) -> dict[str, Any]:
        return {"credential": "trading", "url": url, "ca_file": str(ca_file), "timeout": TIMEOUT}

    config = {
        "listen": f"127.0.0.1:{proxy_port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "drain_timeout": 2,
        "log_level": "WARNING",
        "credentials": {"trading": {"key_file": str(key_file)}},
        "upstreams": {
            HOST: upstream(f"https://127.0.0.1:{tls_port}"),
            "refused.example": upstream(f"https://127.0.0.1:{free_port()}"),
            "garbage.example": upstream(f"https://127.0.0.1:{garbage_port}"),
        },
        "routes": [{"prefix": "/", "upstream": HOST}],
    }
    path = tmp / "generated.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, proxy_port, admin_port


def proxy_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("signing-proxy")
    if script.exists():
        return [str(script), "serve", "-c", str(config)]
    return [sys.executable, "-m", "signing_proxy", "serve", "-c", str(config)]


# --- load --------------------------------------------------------------------------------------------


class Load:
    def __init__(self, proxy_port: int, rate: float, seed: int):
        self.base = f"http://127.0.0.1:{proxy_port}"
        self.rate = rate
        self.rng = random.Random(seed)
        self.kinds = [kind for weight, kind in MIX for _ in range(weight)]
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.sent = 0
        self.skipped = 0
        self.sending_seconds = 0.0
        self.tasks: set[asyncio.Task[None]] = set()

    def target(self, kind: str) -> tuple[str, dict[str, Any]]:
        if kind == "refused":
            return "http://refused.example/api/v3/x", {"proxy": self.base}
        if kind == "garbage":
            return "http://garbage.example/api/v3/x", {"proxy": self.base}
        return f"{self.base}/api/v3/soak/{kind}", {}

    async def bad_line(self) -> str:
        port = int(self.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"CONNECT  \r\nHost: soak\r\n\r\n")
            async with asyncio.timeout(TIMEOUT * 5):
                head = await reader.read(64)
            return head.split(b"\r\n", 1)[0].decode(errors="replace") or "closed, no answer"
        except TimeoutError:
            return "CLIENT TIMEOUT"
        finally:
            writer.close()

    async def one(self, session: aiohttp.ClientSession, kind: str) -> None:
        if kind == "bad-line":
            self.outcomes[kind][await self.bad_line()] += 1
            return
        url, kwargs = self.target(kind)
        try:
            async with asyncio.timeout(TIMEOUT * 0.3 if kind == "client-abort" else TIMEOUT * 5):
                async with session.get(url, **kwargs) as resp:
                    body = await resp.read()
            code = str(resp.status)
            if resp.status >= 400 and body.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    code += " " + str(json.loads(body).get("error", "upstream"))
        except TimeoutError:
            code = "client hung up" if kind == "client-abort" else "CLIENT TIMEOUT"
        except aiohttp.ClientPayloadError:
            code = "broken mid-body"
        except aiohttp.ClientError as exc:
            code = f"client error {type(exc).__name__}"
        self.outcomes[kind][code] += 1

    async def run(self, seconds: float, max_in_flight: int = 400) -> None:
        connector = aiohttp.TCPConnector(limit=max_in_flight)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            loop = asyncio.get_running_loop()
            start = loop.time()
            interval = 1.0 / self.rate
            while (now := loop.time()) - start < seconds and self.sent < MAX_REQUESTS:
                if len(self.tasks) >= max_in_flight:
                    self.skipped += 1  # the proxy is not keeping up: never queue without bound
                else:
                    task = asyncio.create_task(self.one(session, self.rng.choice(self.kinds)))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                    self.sent += 1
                next_at = start + self.sent * interval
                await asyncio.sleep(max(0.0, next_at - now))
            self.sending_seconds = loop.time() - start
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=TIMEOUT * 6)


async def metric(admin: str, name: str) -> float | None:
    async with aiohttp.ClientSession() as session, session.get(f"{admin}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


async def wait_ready(admin: str, proc: asyncio.subprocess.Process, within: float = 20) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < within:
            if proc.returncode is not None:
                raise SystemExit(f"the proxy exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{admin}/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.1)
    raise SystemExit("the proxy did not become ready")


# --- main ----------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> int:
    seconds = args.minutes * 60
    warmup = max(5.0, seconds * 0.15)
    ca = trustme.CA()
    runner, tls_port, garbage, garbage_port = await start_upstreams(ca)
    tmp = Path(tempfile.mkdtemp(prefix="signing-proxy-soak-"))
    config, proxy_port, admin_port = write_config(tmp, ca, tls_port, garbage_port)
    admin = f"http://127.0.0.1:{admin_port}"
    log_file = (tmp / "proxy.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *proxy_command(config), stdout=log_file, stderr=subprocess.STDOUT
    )
    samples: list[tuple[float, float, int, str]] = []
    code = 0
    try:
        ready = await wait_ready(admin, proc)
        rss0, fd0 = proc_stats(proc.pid)
        samples.append((0.0, rss0, fd0, "idle"))
        print(f"proxy pid {proc.pid} ready in {ready:.2f}s; idle RSS {rss0:.1f} MiB, {fd0} fds")
        print(f"load: {args.rate:g} req/s for {seconds:g}s (warm-up {warmup:g}s), faults mixed in")

        load = Load(proxy_port, args.rate, args.seed)
        started = time.monotonic()
        load_task = asyncio.create_task(load.run(seconds))
        while not load_task.done():
            await asyncio.sleep(args.sample)
            rss, fds = proc_stats(proc.pid)
            t = time.monotonic() - started
            samples.append((t, rss, fds, "warm-up" if t < warmup else "load"))
        await load_task
        after_load = time.monotonic() - started

        # Idle pooled connections (aiohttp's client keep-alive is 15 s) must expire by themselves.
        settle_start = time.monotonic()
        rss, fds = proc_stats(proc.pid)
        while fds > fd0 + FD_SLACK and time.monotonic() - settle_start < args.settle:
            await asyncio.sleep(1.0)
            rss, fds = proc_stats(proc.pid)
        samples.append((time.monotonic() - started, rss, fds, "settled"))
        in_flight = await metric(admin, "signing_proxy_in_flight_requests")

        # Report
        sending = load.sending_seconds
        print(f"\nsent {load.sent} requests in {sending:.1f}s ({load.sent / sending:.1f}/s), "
              f"skipped {load.skipped} (client cap); last answer at {after_load:.1f}s")  # fmt: skip
        print("\noutcomes by request kind:")
        for kind in [k for _, k in MIX]:
            row = ", ".join(f"{c}: {n}" for c, n in sorted(load.outcomes[kind].items()))
            print(f"  {kind:13} {row}")
        print("\n    t(s)  phase      RSS(MiB)  fds")
        for t, rss_s, fds_s, phase in samples:
            print(f"  {t:6.1f}  {phase:9} {rss_s:8.1f}  {fds_s:4d}")
        warm = [s for s in samples if s[3] == "load"]
        rss_warm = warm[0][1] if warm else rss0
        rss_end = samples[-1][1]
        fd_peak = max(s[2] for s in samples)
        unexpected = sum(
            n
            for counts in load.outcomes.values()
            for c, n in counts.items()
            if c.startswith(("CLIENT TIMEOUT", "500"))
        )
        print(
            f"\nidle fds {fd0}, peak {fd_peak}, settled {samples[-1][2]} (allowed {fd0 + FD_SLACK})"
        )
        print(f"RSS after warm-up {rss_warm:.1f} MiB, at end {rss_end:.1f} MiB "
              f"(growth {rss_end - rss_warm:+.1f}, allowed {RSS_GROWTH_MIB:g})")  # fmt: skip
        print(f"in flight at end: {in_flight}; unexpected outcomes (500s, hangs): {unexpected}")
        problems = []
        if samples[-1][2] > fd0 + FD_SLACK:
            problems.append("file descriptors did not return to the idle baseline")
        if rss_end - rss_warm > RSS_GROWTH_MIB:
            problems.append("RSS kept growing after warm-up")
        if in_flight != 0:
            problems.append("requests still in flight after the load")
        if unexpected:
            problems.append("500s or hung requests")
        if proc.returncode is not None:
            problems.append(f"the proxy exited ({proc.returncode})")
        if not load.outcomes["ok"].get("200"):
            problems.append("no request succeeded")
        print("\nRESULT: " + ("LEAK/FAULT: " + "; ".join(problems) if problems else "no leaks"))
        code = 1 if problems else 0
    finally:
        if proc.returncode is None:
            proc.terminate()  # SIGTERM: the proxy drains and exits
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log_file.close()
        garbage.close()
        await garbage.wait_closed()
        await runner.cleanup()
        if code == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(proxy log and config kept in {tmp})")
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="load duration (default 1)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS/fd samples")
    parser.add_argument("--settle", type=float, default=25.0, help="max seconds to wait for idle")
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60 or not 0 < args.rate <= 2000:
        parser.error("--minutes must be in (0, 1440] and --rate in (0, 2000]")
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
