"""The ``signing-proxy`` command: serve, check, jwt, onramp-url, keygen, topper-token (README.md, "Commands").

Exit codes: 0 fine, 1 a problem with credentials or a request, 2 usage or config error.

``main`` parses the command line and turns errors into those exit codes; the rest lives in
``cli_parser`` (every flag and help text), ``cli_config`` (the config a command loads, flags >
env > file), ``cli_serve`` (serve, the event loop, ``--workers``), ``cli_wait``, ``cli_check``,
``cli_tokens`` (jwt, keygen, topper-token) and ``cli_onramp`` (onramp-url).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli_parser import build_parser
from .cli_serve import without_workers
from .errors import ConfigError, ProxyError

# Commands import what they use: the --workers supervisor and `wait` stay small and start fast
# without the crypto and HTTP stacks.

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = without_workers(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"signing-proxy: config error: {exc.message}", file=sys.stderr)
        return 2
    except ProxyError as exc:  # credentials, the upstream, the request: exit 1
        print(f"signing-proxy: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
