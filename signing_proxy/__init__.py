"""signing-proxy: an authenticating forward proxy for Coinbase APIs.

A request walks one straight line:
cli → config → credentials → app (listeners, lifecycle) → proxy (entry) → routing → signers
→ relay (upstream) → metrics / access log.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
