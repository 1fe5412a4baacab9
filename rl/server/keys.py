"""API keys: one per tenant, stored as salted hashes in a JSON file.

    python -m rl.server keys add alice      # prints a new `tml-...` key once
    python -m rl.server keys list
    python -m rl.server keys revoke alice

The file (`$ENGINEROOM_HOME/server/keys.json` by default, mode 0600) maps each tenant name to
the SHA-256 of its key with a per-key salt; the key itself is never written. A lookup hashes
the presented key against every entry and compares with `hmac.compare_digest`, so the time it
takes does not depend on which entry (if any) matches. Keys start with `tml-`, the prefix the
`tinker` SDK insists on.

Every write replaces the file atomically and durably (`rl.durable.write_atomically`: a temporary file in
the same directory, fsync'd, renamed over the old one, then the directory fsync'd), so a server
or `keys` command killed at any moment leaves the old file or the new one, never a mix; and a
`keys` command holds an exclusive lock on the file's directory while it reads, changes and
writes, so two at once do not lose each other's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rl.durable import write_atomically
from rl.errors import InvalidRequestError

KEY_PREFIX = "tml-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class KeyEntry:
    name: str
    salt: str
    digest: str
    created: float


def _digest(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory`, between processes (a server and `keys` commands)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class KeyStore:
    """The keys file; re-read when it changes on disk, so `keys add` on a running server works."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._entries: list[KeyEntry] = []
        # The file as last read: (inode, mtime, size); a write replaces the inode, so a change
        # within the clock's granularity is seen too.
        self._stamp: tuple[int, int, int] | None = None

    def entries(self) -> list[KeyEntry]:
        with self._lock:
            self._reload()
            return list(self._entries)

    def add(self, name: str) -> str:
        """Creates a key for tenant `name` and returns it (the only time it is shown)."""
        if not _NAME.match(name):
            raise InvalidRequestError(
                f"tenant name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self._changing():
            if any(e.name == name for e in self._entries):
                raise InvalidRequestError(f"tenant {name!r} has a key already; revoke it first")
            self._entries.append(KeyEntry(name, salt, _digest(salt, key), time.time()))
            self._write()
        return key

    def revoke(self, name: str) -> bool:
        with self._changing():
            kept = [e for e in self._entries if e.name != name]
            if len(kept) == len(self._entries):
                return False
            self._entries = kept
            self._write()
            return True

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant whose key this is, or None. Every entry is checked, match or not."""
        if not key:
            return None
        with self._lock:
            self._reload()
            entries = list(self._entries)
        found = None
        for entry in entries:
            if hmac.compare_digest(_digest(entry.salt, key), entry.digest):
                found = entry.name
        return found

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Holds both locks and the file's latest content, for a read-modify-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, _exclusive(self.path.parent):
            self._stamp = None  # re-read whatever the stamp says
            self._reload()
            try:
                yield
            except BaseException:
                self._stamp = None  # a failed write: re-read the file, not what was changed
                raise

    def _reload(self) -> None:
        try:
            stamp = _stamp(self.path)
        except FileNotFoundError:
            self._entries, self._stamp = [], None
            return
        if stamp == self._stamp:
            return
        raw = json.loads(self.path.read_text() or "{}")
        self._entries = [
            KeyEntry(name, e["salt"], e["sha256"], float(e.get("created", 0.0)))
            for name, e in raw.get("keys", {}).items()
        ]
        self._stamp = stamp

    def _write(self) -> None:
        data = {
            "keys": {
                e.name: {"salt": e.salt, "sha256": e.digest, "created": e.created}
                for e in self._entries
            }
        }
        write_atomically(self.path, json.dumps(data, indent=2))
        self._stamp = _stamp(self.path)


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


__all__ = ["KEY_PREFIX", "KeyEntry", "KeyStore"]
