"""`python -m signing_proxy` is the `signing-proxy` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
