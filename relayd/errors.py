"""The exception tree: one root, delivery errors split into transient and permanent."""

from __future__ import annotations


class RelayError(Exception):
    """Root of every error relayd raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; carries every problem found, each naming its key."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("; ".join(self.problems))


class QueueError(RelayError):
    """The spool cannot be read or written."""


class DeliveryError(RelayError):
    """An upstream refused or failed a delivery. `code` and `text` are the upstream's words."""

    def __init__(self, text: str, code: int | None = None) -> None:
        self.text = text
        self.code = code
        super().__init__(f"{code} {text}" if code is not None else text)


class TransientDeliveryError(DeliveryError):
    """Try again later (4xx, timeouts, throttling, expired tokens).

    `retry_after` is the upstream's own back-off hint in seconds, when it gave one.
    """

    def __init__(self, text: str, code: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(text, code)
        self.retry_after = retry_after


class AuthenticationError(TransientDeliveryError):
    """The route's credentials were refused. Never bounces mail: it defers."""


class UpstreamUnavailableError(TransientDeliveryError):
    """The upstream could not be reached at all (refused, timed out, TLS failed). The scheduler
    then holds the route's other messages for a while instead of trying each one."""


class PermanentDeliveryError(DeliveryError):
    """Never going to work (5xx, SendAsDenied, mailbox not found): fail and bounce."""
