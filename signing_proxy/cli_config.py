"""What every command shares: its config (flags > env > file) and the one-line usage error.

Commands that read the config call ``config_from_args``; a command that finds its flags do not
fit together says so with ``usage_error`` (exit 2, like argparse).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Final

from .config import ENV_PREFIX, Config, env_overrides, load_config
from .errors import ConfigError

__all__ = ["FLAG_FIELDS", "config_from_args", "config_path", "usage_error"]

FLAG_FIELDS: Final = {  # serve flags that override config fields (flags > env > file)
    "listen": "listen",
    "admin_listen": "admin_listen",
    "drain_timeout": "drain_timeout",
    "min_drain": "min_drain",
    "workers": "workers",
    "log_format": "log_format",
    "log_level": "log_level",
    "event_loop": "event_loop",
}


def config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get(f"{ENV_PREFIX}CONFIG")
    if not path:
        raise ConfigError(f"no config file: give --config PATH (or set {ENV_PREFIX}CONFIG)")
    return path


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, tuple[Any, str]] = env_overrides(os.environ)
    for attr, field in FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[field] = (value, f"--{attr.replace('_', '-')}")
    config = load_config(config_path(args), overrides)
    from .topper import topper_settings

    topper_settings(config)  # the optional sections are checked at load, with the rest
    return config


def usage_error(command: str, problem: str) -> int:
    print(f"signing-proxy {command}: error: {problem}", file=sys.stderr)
    return 2
