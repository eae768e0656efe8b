"""The upstream half alone: the same GETs to a local TLS server through aiohttp's ClientSession
(configured as aiohttp_client.py configures it) and through signing_proxy.upstream_pool.UpstreamPool.

    .venv/bin/python bench/pool_bench.py            # both loops, 5 rounds
    .venv/bin/python bench/pool_bench.py --quick    # 2 rounds

The client runs pinned to core 0, the upstream to core 1: nginx when it is installed (as in
bench/run), else an aiohttp TLS server in a subprocess. Each round runs every client in turn
(interleaved, so background load hits all alike) over N sequential GETs and N GETs from 32
concurrent tasks, after a warm-up; a figure is the best round. CPU µs/request is the client
process's CPU time (user + system, time.process_time) ÷ requests; req/s is wall-clock.
"""

# The report is for people: micro signs and multiplication signs are meant.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

BODY = b'{"accounts":[{"uuid":"8bfc20d7-f7c6-4422-bf07-8243ca4169fe","name":"BTC Wallet",' + (
    b'"currency":"BTC","available_balance":{"value":"1.23","currency":"BTC"}}],"has_next":false}'
).ljust(220, b" ")
PATH = "/api/v3/brokerage/accounts"
# What the relay sends for a signed GET: the upstream's Host, a JWT-sized Authorization, the
# client's own few headers.
HEADERS = [
    ("Host", "api.coinbase.com"),
    ("Accept", "application/json"),
    ("User-Agent", "trading-bot/1.0"),
    ("Authorization", "Bearer " + "e" * 420),
    ("X-Request-Id", "0f8b3c1e2d4a4b6c8e0f1a2b3c4d5e6f"),
]
CONCURRENCY = 32
PROXY_CORE, LOAD_CORE = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the upstream
def serve_aiohttp(port: int, cert: str, key: str) -> None:
    from aiohttp import web

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=context, access_log=None, print=None)


NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}
}}
"""


def start_upstream(
    work: Path, port: int, cert: Path, key: Path
) -> tuple[subprocess.Popen[bytes], str]:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx:
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(work=work, port=port, cert=cert, key=key, body=BODY.decode())
        )
        cmd = ["taskset", "-c", str(LOAD_CORE), nginx, "-p", str(work), "-c", str(conf),
               "-g", "daemon off;"]  # fmt: skip
        what = "nginx"
    else:
        cmd = ["taskset", "-c", str(LOAD_CORE), sys.executable, __file__, "--serve", str(port),
               str(cert), str(key)]  # fmt: skip
        what = "aiohttp TLS server (nginx not installed)"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, what
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.02)


# ---------------------------------------------------------------- the clients
Get = Callable[[], Awaitable[bytes]]


async def aiohttp_client(
    port: int, context: ssl.SSLContext
) -> tuple[Get, Callable[[], Awaitable[None]]]:
    import aiohttp
    from multidict import CIMultiDict
    from yarl import URL

    from signing_proxy.aiohttp_client import create_session

    session = create_session()
    url = URL(f"https://127.0.0.1:{port}{PATH}", encoded=True)
    headers = CIMultiDict(HEADERS)
    timeout = aiohttp.ClientTimeout(total=10.0)

    async def get() -> bytes:
        async with session.request(
            "GET", url, headers=headers, allow_redirects=False, ssl=context, timeout=timeout
        ) as resp:
            return await resp.read()

    return get, session.close


async def pool_client(
    port: int, context: ssl.SSLContext
) -> tuple[Get, Callable[[], Awaitable[None]]]:
    from signing_proxy.upstream_pool import UpstreamPool

    pool = UpstreamPool("127.0.0.1", port, context, "api.coinbase.com")
    target = PATH.encode()
    headers = [(n.encode(), v.encode()) for n, v in HEADERS]

    async def get() -> bytes:
        resp = await pool.request("GET", target, headers, None, timeout=10.0)
        try:
            return await resp.read()
        finally:
            resp.release()

    return get, pool.close


async def measure(get: Get, n: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs per request, requests per second) for n GETs, `concurrency` at a time."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            body = await get()
            if len(body) != len(BODY):
                raise RuntimeError(f"short body: {len(body)} bytes")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / n * 1e6, n / wall


async def run(
    port: int, context: ssl.SSLContext, n: int, rounds: int
) -> dict[str, dict[str, tuple[float, float]]]:
    clients = {
        "aiohttp ClientSession (relay.py settings)": await aiohttp_client(port, context),
        "UpstreamPool (httptools)": await pool_client(port, context),
    }
    best: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in clients}
    try:
        for get, _ in clients.values():  # warm-up: connections, caches
            await measure(get, 500, CONCURRENCY)
        for _ in range(rounds):
            for mode, concurrency in (
                ("sequential", 1),
                (f"{CONCURRENCY} concurrent", CONCURRENCY),
            ):
                for name, (get, _) in clients.items():
                    cpu, rps = await measure(get, n, concurrency)
                    old = best[name].get(mode)
                    best[name][mode] = (
                        min(cpu, old[0]) if old else cpu,
                        max(rps, old[1]) if old else rps,
                    )
    finally:
        for _, close in clients.values():
            await close()
    return best


def report(loop_name: str, best: dict[str, dict[str, tuple[float, float]]]) -> str:
    names = list(best)
    modes = list(best[names[0]])
    lines = [
        f"\n### {loop_name}\n",
        "| client | mode | CPU µs/request | req/s |",
        "|---|---|---:|---:|",
    ]
    for mode in modes:
        for name in names:
            cpu, rps = best[name][mode]
            lines.append(f"| {name} | {mode} | {cpu:.0f} | {rps:,.0f} |")
    lines.append("")
    base, ours = names
    for mode in modes:
        cpu_ratio = best[ours][mode][0] / best[base][mode][0]
        rps_ratio = best[ours][mode][1] / best[base][mode][1]
        lines.append(
            f"- {mode}: UpstreamPool CPU/request {cpu_ratio:.2f}× aiohttp's, "
            f"req/s {rps_ratio:.2f}×, saving {best[base][mode][0] - best[ours][mode][0]:.0f} µs/request"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=3000, help="GETs per figure")
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_aiohttp(int(args.serve[0]), args.serve[1], args.serve[2])
        return 0
    rounds = 2 if args.quick else 5

    import trustme

    with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        leaf = ca.issue_cert("api.coinbase.com", "127.0.0.1")
        cert, key = work / "cert.pem", work / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        context = ssl.create_default_context()
        ca.configure_trust(context)

        port = free_port()
        proc, what = start_upstream(work, port, cert, key)
        os.sched_setaffinity(0, {PROXY_CORE})
        out = [
            "## Upstream client: aiohttp ClientSession vs UpstreamPool",
            "",
            f"- upstream: {what} over TLS on core {LOAD_CORE}, {len(BODY)}-byte JSON body; "
            f"client pinned to core {PROXY_CORE}",
            f"- Python {sys.version.split()[0]}; {args.requests} GETs per figure, best of {rounds} "
            "interleaved rounds",
        ]
        try:
            for loop_name in args.loops.split(","):
                if loop_name == "uvloop":
                    try:
                        import uvloop
                    except ImportError:
                        out.append("\n(uvloop not installed: skipped)")
                        continue
                    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
                else:
                    runner = asyncio.Runner()
                with runner:
                    best = runner.run(run(port, context, args.requests, rounds))
                out.append(report(loop_name, best))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            proc.wait(10)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
