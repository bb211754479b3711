"""The exception tree: one root, delivery errors split into transient and permanent."""

from __future__ import annotations

from relayd.reply import Reply


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


class SpoolBusyError(QueueError):
    """An entry cannot be read now (out of descriptors, an I/O error) but may be later: it is
    not corrupt, and is tried again rather than moved aside."""


class DeliveryError(RelayError):
    """An upstream refused or failed a delivery. `code` is an SMTP reply code (None when the
    upstream does not speak SMTP and no code says the same thing); `text` is the upstream's
    words, which may start with an RFC 3463 status. `reply` is both as one value."""

    def __init__(self, text: str, code: int | None = None, *, enhanced: str | None = None,
                 source: str = "smtp") -> None:
        self.text = text
        self.code = code
        reply = Reply.smtp(code, text, source)
        if enhanced is not None:
            reply = Reply(code, enhanced, reply.text, source)
        self.reply = reply
        super().__init__(f"{code} {text}" if code is not None else text)


class TransientDeliveryError(DeliveryError):
    """Try again later (4xx, timeouts, throttling, expired tokens).

    `retry_after` is the upstream's own back-off hint in seconds, when it gave one.
    """

    def __init__(self, text: str, code: int | None = None,
                 retry_after: float | None = None, *, enhanced: str | None = None,
                 source: str = "smtp") -> None:
        super().__init__(text, code, enhanced=enhanced, source=source)
        self.retry_after = retry_after


class AuthenticationError(TransientDeliveryError):
    """The route's credentials were refused. Never bounces mail: it defers."""


class UpstreamUnavailableError(TransientDeliveryError):
    """The upstream could not be reached at all (refused, timed out, TLS failed). The route's
    delivery agent then holds its other messages for a while instead of trying each one."""


class InDoubtError(TransientDeliveryError):
    """The request that sends was written and its answer was lost (a timeout, a reset, a
    gateway's 5xx): the upstream may have sent the message (relayd.delivery.doubt). Deferred
    like any transient error; a `dedupe` route looks in Sent Items before sending again."""


class PermanentDeliveryError(DeliveryError):
    """Never going to work (5xx, SendAsDenied, mailbox not found): fail and bounce."""
