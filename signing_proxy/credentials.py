"""Credentials: every configured key by name, loaded at start and reloaded when its files change.

This module holds ``CredentialStore`` (the relay asks it for a signer per request) and
``CredentialWatcher`` (rotation). The parts live in their own modules, whose public names are
re-exported here: ``key_material`` (reading secrets, parsing private keys, fingerprints,
``FileState``) and ``credential_loader`` (one ``Credential``: its signer built from its sources,
and the ``CredentialInfo`` that may be shown).

Key files are watched (``CredentialWatcher``): polled about once a second by stat (device, inode,
size, mtime, following symlinks, so a Kubernetes Secret volume's atomic ``..data`` swap is seen)
and by a hash of the content (an edit that keeps size and mtime is seen too). A changed file is
reloaded; a broken one keeps the last good key.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Mapping

from .config import CredentialConfig
from .credential_loader import Credential, CredentialInfo
from .errors import CredentialError
from .key_material import (
    FileState,
    load_key_file,
    parse_private_key,
    public_fingerprint,
    read_secret,
)
from .signers import Clock, Signer

__all__ = [
    "Credential",
    "CredentialInfo",
    "CredentialStore",
    "CredentialWatcher",
    "FileState",
    "load_key_file",
    "parse_private_key",
    "public_fingerprint",
    "read_secret",
]

log = logging.getLogger(__name__)


class CredentialStore:
    """All configured credentials by name; the relay asks it for a signer per request."""

    def __init__(self, configs: Mapping[str, CredentialConfig], *, clock: Clock | None = None):
        self._credentials = {name: Credential(cfg, clock=clock) for name, cfg in configs.items()}
        self.lock = threading.Lock()  # one load at a time: start-up and the watcher

    def __iter__(self) -> Iterator[Credential]:
        return iter(self._credentials.values())

    def __getitem__(self, name: str) -> Credential:
        return self._credentials[name]

    def load_all(self) -> list[str]:
        """Load every credential; returns the problems (empty when all loaded)."""
        problems = []
        with self.lock:
            for cred in self._credentials.values():
                try:
                    cred.load()
                except CredentialError as exc:
                    problems.append(exc.message)
        return problems

    def missing(self) -> list[str]:
        return [c.error or f"credential '{c.name}' not loaded" for c in self if c.signer is None]

    def signer(self, name: str) -> Signer:
        """The current signer, or a CredentialError that says what to configure. Fails closed."""
        cred = self._credentials[name]
        signer = cred.signer
        if signer is None:
            raise CredentialError(
                f"{cred.error or f'credential {name!r} is not loaded'}. "
                f"Configure credential '{name}' (see `signing-proxy check`); "
                "the request was not forwarded"
            )
        return signer


ReloadCallback = Callable[[Credential, CredentialError | None], None]


class CredentialWatcher:
    """Reloads credentials whose files changed; tells ``on_reload`` how each reload went."""

    def __init__(self, store: CredentialStore, on_reload: ReloadCallback, *, interval: float = 1.0):
        self.store = store
        self.on_reload = on_reload
        self.interval = interval

    def poll(self) -> list[str]:
        """One pass over every watched credential; returns the names reloaded (or tried)."""
        tried = []
        for cred in self.store:
            if not cred.changed():
                continue
            tried.append(cred.name)
            try:
                with self.store.lock:
                    cred.load()
            except CredentialError as exc:
                self.on_reload(cred, exc)
            else:
                self.on_reload(cred, None)
        return tried

    async def run(self) -> None:
        """Poll until cancelled. File I/O runs in a worker thread, off the event loop."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.poll)
            except Exception as exc:  # keep watching whatever happened; log the type only
                log.error(
                    "credential watcher pass failed",
                    extra={"fields": {"exc_type": type(exc).__name__}},
                )
