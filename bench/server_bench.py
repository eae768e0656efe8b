"""Micro-benchmark: the listener's own HTTP/1.1 server (signing_proxy/http_server.py) against
aiohttp's low-level ``web.Server``, each answering every request with the same fixed 200 JSON
body. Only the server side is measured: no upstream, no signing.

Each server runs in its own process on core 0; wrk loads it from core 1 (taskset). CPU per
request is the server process's user+system time over the requests wrk completed. Rounds
alternate between the servers and the medians are printed, because the machine is shared.

    .venv/bin/python bench/server_bench.py [--rounds 5] [--seconds 5] [--connections 32]
        [--loop uvloop|asyncio]

Needs wrk (``apt-get install -y wrk``) and taskset.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BODY = b'{"status":"ok","service":"signing-proxy","n":12345}'


# ---------------------------------------------------------------- the servers (child processes)
async def _serve_httptools(port: int) -> None:
    from signing_proxy.http_request import Request
    from signing_proxy.http_server import HttpServer

    headers = [(b"Content-Type", b"application/json")]

    async def handler(request: Request) -> None:
        await request.respond(200, "OK", headers, BODY)

    http = HttpServer(handler)
    server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", port, backlog=1024)
    async with server:
        await asyncio.Event().wait()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    runner = web.ServerRunner(web.Server(handler, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def child(kind: str, port: int, loop: str) -> None:
    main = _serve_httptools if kind == "httptools" else _serve_aiohttp
    if loop == "uvloop":
        import uvloop

        uvloop.run(main(port))
    else:
        asyncio.run(main(port))


# ---------------------------------------------------------------- the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("server did not start")


def _wrk(port: int, connections: int, seconds: float) -> tuple[int, float]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s",
         f"http://127.0.0.1:{port}/api/v3/brokerage/accounts"],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        raise SystemExit(f"wrk saw errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return requests, rate


def measure(kind: str, args: argparse.Namespace) -> tuple[float, float]:
    port = _free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, __file__, "--child", kind, "--port", str(port),
         "--loop", args.loop],
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_listening(port, proc)
        _wrk(port, args.connections, 1)  # warm-up
        before = _cpu_seconds(proc.pid)
        requests, rate = _wrk(port, args.connections, args.seconds)
        cpu = _cpu_seconds(proc.pid) - before
        return cpu / requests * 1e6, rate
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--child", choices=["httptools", "aiohttp"])
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.port, args.loop)
        return
    if not (shutil.which("wrk") and shutil.which("taskset")):
        raise SystemExit("needs wrk and taskset (apt-get install -y wrk util-linux)")
    kinds = ["aiohttp", "httptools"]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for round_ in range(args.rounds):
        for kind in kinds if round_ % 2 == 0 else reversed(kinds):
            results[kind].append(measure(kind, args))
            cpu, rate = results[kind][-1]
            print(f"round {round_ + 1} {kind:10} {cpu:7.1f} µs/req {rate:9.0f} req/s", flush=True)
    print(f"\nmedians of {args.rounds} rounds, {args.connections} connections, {args.loop}:")
    print(f"{'server':12} {'CPU µs/request':>15} {'req/s':>10}")
    for kind in kinds:
        cpu = statistics.median(r[0] for r in results[kind])
        rate = statistics.median(r[1] for r in results[kind])
        print(f"{kind:12} {cpu:15.1f} {rate:10.0f}")
    base = statistics.median(r[0] for r in results["aiohttp"])
    own = statistics.median(r[0] for r in results["httptools"])
    print(f"httptools / aiohttp CPU per request: {own / base:.2f}")


if __name__ == "__main__":
    main()
