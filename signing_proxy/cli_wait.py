"""``signing-proxy wait``: poll a running proxy's admin ``/readyz`` until it answers 200.

For start-up ordering (the app container after the sidecar). It polls with ``urllib``; given
``--admin`` it imports nothing else, so it starts fast (``--config`` loads the config first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .cli_config import config_from_args
from .config import ENV_PREFIX

__all__ = ["cmd_wait"]


def cmd_wait(args: argparse.Namespace) -> int:
    """Poll /readyz until it answers 200; for startup ordering (app container after the sidecar)."""
    import urllib.error
    import urllib.request

    admin = args.admin
    if admin is None:
        if args.config or os.environ.get(f"{ENV_PREFIX}CONFIG"):
            address = config_from_args(args).admin_listen
            host = "127.0.0.1" if address.host in ("0.0.0.0", "::", "") else address.host  # noqa: S104
            admin = f"http://{host}:{address.port}"
        else:
            admin = "http://127.0.0.1:9090"
    url = admin.rstrip("/") + "/readyz"
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - http(s) admin URL
                print(f"ready: {url}")
                return 0 if resp.status == 200 else 1
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            last = "; ".join(body.get("missing") or []) or (
                "draining" if body.get("draining") else f"HTTP {exc.code}"
            )
        except (urllib.error.URLError, OSError) as exc:
            last = f"no answer ({getattr(exc, 'reason', exc)})"
        if time.monotonic() >= deadline:
            print(
                f"signing-proxy: not ready after {args.timeout:g}s at {url}: {last}",
                file=sys.stderr,
            )
            return 1
        time.sleep(args.interval)
