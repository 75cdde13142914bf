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

import logging

from trusthop.policy.model import Policy, PolicyError, loads_policy
from trusthop.reloading import ReloadingFile


class PolicySource(ReloadingFile[Policy]):
    """The current policy of one TOML file, reloaded on demand or on change.

    See :class:`~trusthop.reloading.ReloadingFile` for ``reload()``,
    ``poll()``, ``watch()``, ``loaded_at``, ``file_digest`` and
    ``last_error``.

    Raises:
        OSError: the file cannot be read at construction.
        PolicyError: the file is invalid at construction (there is no last
            good policy to keep yet).
    """

    kind = "policy"
    log = logging.getLogger("trusthop.policy")

    @property
    def policy(self) -> Policy:
        """The policy in force (the last one that loaded successfully)."""
        return self.current

    def _parse(self, raw: bytes) -> Policy:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(["the file is not UTF-8 text"], source=str(self.path)) from None
        return loads_policy(text, source=str(self.path))

    def _problems(self, exc: Exception) -> list[str] | None:
        return list(exc.errors) if isinstance(exc, PolicyError) else None

    def _describe(self, value: Policy) -> str:
        return f"({value.digest}) {value.summary()}"


def current_policy(policy: Policy | PolicySource | None) -> Policy | None:
    """The policy to evaluate now: ``policy`` itself or the source's current one."""
    return policy.policy if isinstance(policy, PolicySource) else policy
