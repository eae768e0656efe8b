"""``signing-proxy serve``: one process on the chosen event loop, or the ``--workers`` supervisor.

The supervisor re-runs the same command line in each worker, minus ``--workers``
(``without_workers``); ``workers.worker_command`` adds ``--workers 1``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Coroutine, Sequence
from typing import Any

from .cli_config import config_from_args
from .errors import ConfigError

# Imported when used: the --workers supervisor starts fast without asyncio, the crypto and
# the HTTP stacks, which only its workers need.

__all__ = ["cmd_serve", "run_event_loop", "without_workers"]


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .workers import WORKER_ENV

    config = config_from_args(args)
    setup_logging(config.log_format, config.log_level, worker=os.environ.get(WORKER_ENV))
    if config.workers > 1:
        from .workers import check_bindable, supervise, worker_command

        check_bindable([config.listen, config.admin_listen])  # a busy port: one line, not 5 crashes
        argv = [a for a in (args.argv or []) if a]
        stop_timeout = config.min_drain + config.drain_timeout + 5
        return supervise(config.workers, worker_command(argv), stop_timeout)

    from .app import run
    from .workers import MULTIPROC_ENV

    worker = WORKER_ENV in os.environ
    coro = run(
        config,
        reuse_port=worker,
        multiprocess_dir=os.environ.get(MULTIPROC_ENV) if worker else None,
    )
    run_event_loop(coro, config.event_loop)
    return 0


def run_event_loop(coro: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run ``coro`` to its end: on uvloop for ``uvloop``, and for ``auto`` when it is installed."""
    import asyncio

    if event_loop != "asyncio":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if event_loop == "uvloop":
                coro.close()
                raise ConfigError(
                    "event_loop: uvloop is not installed (pip install 'signing-proxy[uvloop]')"
                ) from None
        else:  # the optional extra: a faster event loop
            uvloop.run(coro)
            return
    asyncio.run(coro)


def without_workers(argv: Sequence[str]) -> list[str]:
    """The serve arguments minus --workers (the supervisor gives each worker --workers 1)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out
