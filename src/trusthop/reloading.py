"""Reloading a configuration file without restarting anything.

:class:`ReloadingFile` holds the value currently in force for one file (a
policy, a trust bundle). Readers take :attr:`ReloadingFile.current` at every
use, so a reload applies to the next message, including messages already
queued. A file that fails to load never replaces the value in force: the
last good one stays, and the failure is logged at ERROR level with every
problem found. Subclasses say how to parse and describe the value.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

_Fingerprint = tuple[int, int, int] | None


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class ReloadingFile(Generic[T]):
    """The current value of one file, reloaded on demand or on change.

    Args:
        path: the file. It is loaded now.
        clock: seconds since the epoch (for :attr:`loaded_at`); injectable.

    Raises:
        OSError: the file cannot be read at construction.
        the subclass's parse error: the file is invalid at construction
            (there is no last good value to keep yet).

    Attributes:
        path: the file.
        loaded_at: when the value in force was loaded.
        file_digest: ``sha256:<hex>`` of the bytes of the value in force.
        last_error: the failure of the latest reload attempt, ``None`` once
            a reload succeeded or when none failed.
    """

    kind = "file"
    """What the file holds, for log messages ("policy", "trust bundle")."""
    log = logging.getLogger("trusthop")

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self.last_error: Exception | None = None
        self._seen = _fingerprint(self.path)
        raw = self.path.read_bytes()
        self._value = self._parse(raw)
        self.file_digest = self._hash(raw)
        self._tried = self.file_digest
        self.loaded_at = clock()

    @property
    def current(self) -> T:
        """The value in force (the last one that loaded successfully)."""
        return self._value

    def _parse(self, raw: bytes) -> T:
        """Parse the file's bytes; raise an exception of :meth:`_problems`'s kind."""
        raise NotImplementedError

    def _problems(self, exc: Exception) -> list[str] | None:
        """The problems ``exc`` reports when it is a parse failure, else ``None``."""
        raise NotImplementedError

    def _describe(self, value: T) -> str:
        """One line about a newly loaded value, for the INFO log."""
        return ""

    @staticmethod
    def _hash(raw: bytes) -> str:
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def reload(self) -> bool:
        """Read the file again; put it in force if it is valid and changed.

        Returns ``True`` when a new value is now in force, ``False`` when the
        file is unchanged (same bytes) or failed to load. A failure keeps the
        last good value, is stored in :attr:`last_error` and logged at ERROR
        level: ``<kind> reload failed, keeping the last good <kind> from
        <time>:`` followed by every problem. Never raises for a bad file.
        """
        self._seen = _fingerprint(self.path)
        try:
            raw = self.path.read_bytes()
            digest = self._hash(raw)
            self._tried = digest
            if digest == self.file_digest:
                self.last_error = None
                return False
            value = self._parse(raw)
        except Exception as exc:
            problems = [str(exc)] if isinstance(exc, OSError) else self._problems(exc)
            if problems is None:
                raise
            self.last_error = exc
            self.log.error(
                "%s reload failed, keeping the last good %s from %s: %s: %s",
                self.kind,
                self.kind,
                _stamp(self.loaded_at),
                self.path,
                "; ".join(problems),
            )
            return False
        self._value = value
        self.file_digest = digest
        self.loaded_at = self._clock()
        self.last_error = None
        self.log.info("%s reloaded from %s: %s", self.kind, self.path, self._describe(value))
        return True

    def poll(self) -> bool:
        """Reload if the file's mtime, size or inode changed since last seen
        and its bytes differ from the last ones tried (so a bad file is
        reported once, not at every poll). Returns what :meth:`reload`
        returns, ``False`` when nothing changed. Never raises for a bad file."""
        if _fingerprint(self.path) == self._seen:
            return False
        try:
            raw = self.path.read_bytes()
        except OSError:
            return self.reload()  # logs the failure
        if self._hash(raw) == self._tried:
            self._seen = _fingerprint(self.path)
            return False
        return self.reload()

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the file every ``interval`` seconds until cancelled.

        Run it as a task (``asyncio.create_task(source.watch())``) and
        cancel it on shutdown. Never raises except
        :class:`asyncio.CancelledError`; failures are logged.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # never let the watcher die silently
                self.log.exception("%s watch of %s failed; retrying", self.kind, self.path)
