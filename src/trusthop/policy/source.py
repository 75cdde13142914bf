"""Reloading a policy file without restarting anything.

A :class:`PolicySource` holds the policy currently in force for one file.
:class:`~trusthop.pipeline.ChainVerifier` and
:class:`~trusthop.pipeline.ChainSigner` accept it wherever they accept a
:class:`Policy` and read :attr:`PolicySource.policy` at every evaluation, so
a reload applies to the next message, including messages already queued.

A file that fails to load never replaces the policy in force: the last good
one stays, and the failure is logged at ERROR level on the
``trusthop.policy`` logger with every problem found.
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

from trusthop.policy.model import Policy, PolicyError, loads_policy

log = logging.getLogger("trusthop.policy")

_Fingerprint = tuple[int, int, int] | None


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class PolicySource:
    """The current policy of one TOML file, reloaded on demand or on change.

    Args:
        path: the policy file. It is loaded now.
        clock: seconds since the epoch (for :attr:`loaded_at`); injectable.

    Raises:
        OSError: the file cannot be read at construction.
        PolicyError: the file is invalid at construction (there is no last
            good policy to keep yet).

    Attributes:
        path: the policy file.
        loaded_at: when the policy in force was loaded.
        file_digest: ``sha256:<hex>`` of the bytes of the policy in force.
        last_error: the failure of the latest reload attempt, ``None`` once
            a reload succeeded or when none failed.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self.last_error: PolicyError | OSError | None = None
        self._seen = _fingerprint(self.path)
        raw = self.path.read_bytes()
        self._policy = self._parse(raw)
        self.file_digest = self._hash(raw)
        self._tried = self.file_digest
        self.loaded_at = clock()

    @property
    def policy(self) -> Policy:
        """The policy in force (the last one that loaded successfully)."""
        return self._policy

    @staticmethod
    def _hash(raw: bytes) -> str:
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def _parse(self, raw: bytes) -> Policy:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(["the file is not UTF-8 text"], source=str(self.path)) from None
        return loads_policy(text, source=str(self.path))

    def reload(self) -> bool:
        """Read the file again; put it in force if it is valid and changed.

        Returns ``True`` when a new policy is now in force, ``False`` when
        the file is unchanged (same bytes) or failed to load. A failure
        (unreadable, not UTF-8, not TOML, invalid) keeps the last good
        policy, is stored in :attr:`last_error` and logged at ERROR level:
        ``policy reload failed, keeping the last good policy from <time>:``
        followed by every problem. Never raises for a bad file.
        """
        self._seen = _fingerprint(self.path)
        try:
            raw = self.path.read_bytes()
            digest = self._hash(raw)
            self._tried = digest
            if digest == self.file_digest:
                self.last_error = None
                return False
            policy = self._parse(raw)
        except (OSError, PolicyError) as exc:
            self.last_error = exc
            problems = exc.errors if isinstance(exc, PolicyError) else [str(exc)]
            log.error(
                "policy reload failed, keeping the last good policy from %s: %s: %s",
                _stamp(self.loaded_at),
                self.path,
                "; ".join(problems),
            )
            return False
        self._policy = policy
        self.file_digest = digest
        self.loaded_at = self._clock()
        self.last_error = None
        log.info("policy reloaded from %s (%s): %s", self.path, policy.digest, policy.summary())
        return True

    def poll(self) -> bool:
        """Reload if the file's mtime, size or inode changed since last seen
        and its bytes differ from the last ones tried (so a bad file is
        reported once, not at every poll). Returns what :meth:`reload`
        returns, ``False`` when nothing changed. Never raises."""
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
        :class:`asyncio.CancelledError`; failures are logged by
        :meth:`reload`.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # never let the watcher die silently
                log.exception("policy watch of %s failed; retrying", self.path)


def current_policy(policy: Policy | PolicySource | None) -> Policy | None:
    """The policy to evaluate now: ``policy`` itself or the source's current one."""
    return policy.policy if isinstance(policy, PolicySource) else policy
