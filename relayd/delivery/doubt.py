"""Which failed attempts may have sent the message anyway: the answers that leave it in doubt.

An attempt that fails is retried. That is right when the upstream's answer proves it did not
send, and wrong when the answer was lost after the upstream got the whole request: Graph can
answer `504 Gateway Timeout` after it sent the message (a Microsoft Q&A thread reports a 504'd
sendMail delivered four times by the client's retries), and a request that times out on
relayd's side may well have been processed. Such an attempt is *in doubt*. The agent reports
the doubt (`Report.doubt`); the queue manager then keeps the message marked "started", exactly
as after a crash mid-send, so on a `dedupe` route the next attempt looks in the mailbox's Sent
Items first (`Upstream.find_sent`) and a hit is journaled `found-in-sent-items`, with the doubt.

The table (`http_in_doubt` decides the HTTP rows; EWS and SMTP map their libraries' failures
onto the same facts: was the request written whole, what status came back):

| What happened                                          | Doubt | Why                          |
|--------------------------------------------------------|-------|------------------------------|
| connection refused, no such host, connect/TLS timeout  | no    | no byte reached a server     |
| reset or timeout while the request is being written    | no    | a server acts on a request   |
|                                                        |       | only once its body is whole  |
| request written, then a timeout (no status line)       | yes   | Graph under load answers     |
|                                                        |       | slowly: it may have sent     |
| request written, then a reset or EOF before the status | yes   | the same: the answer is lost |
| 401                                                    | no    | refused before processing    |
| 400, 403, 404, 413, any other 4xx                      | no    | refused before processing    |
| 429 (Retry-After)                                      | no    | throttled, not processed     |
| 502, 503, 504 (a gateway's)                            | yes   | the gateway gave up; the     |
|                                                        |       | service behind it may not    |
| 503 (or 502/504) with Graph's throttling error body    | no    | Graph itself refused it      |
| (`error.code` in `THROTTLING_CODES`)                   |       | before processing            |
| 500                                                    | yes   | the service failed, maybe    |
|                                                        |       | after it had sent            |
| EWS ErrorServerBusy (its throttling), ErrorSendAsDenied | no   | Exchange answered the        |
| and the other response codes                           |       | CreateItem: nothing was sent |
| EWS ErrorTimeoutExpired, ErrorInternalServerError      | yes   | Exchange's own timeout or    |
|                                                        |       | failure, mid-operation       |
| EWS: no answer within the route's `timeout`, or a      | yes   | the CreateItem was written   |
| reset after the request; an HTTP 5xx without SOAP      |       | and may have sent            |
| relayd gave up on the attempt (the agent's timeout,    | yes   | the request may be written   |
| shutdown) on EWS or Graph                              |       | (EWS's thread even goes on)  |
| SMTP: timeout or reset after the final "." of DATA     | yes   | RFC 1047's duplicate window  |
| SMTP: anything before the final "." is written         | no    | a server drops an unfinished |
|                                                        |       | transaction                  |

EWS cannot tell which of `send()`'s calls failed: a GetFolder before the CreateItem that times
out counts as in doubt too (it costs a lookup). A stale keep-alive connection that Graph closed
just as a send went out looks like a reset after the request: in doubt, for the same price.

What follows a doubt, per upstream:
- Graph, EWS with `dedupe` (and, for EWS, `save_to_sent`): the next attempt looks in Sent
  Items. Sent Items may show the copy a few seconds after the send, and a gateway that gave up
  may leave the service behind it still sending: a lookup that finds nothing looks again every
  `SENT_ITEMS_POLL_S` until `SENT_ITEMS_LAG_S` after the doubtful attempt ended, and only then
  concludes "not sent". The retry backoff (`retry_min`, a minute by default) usually passes
  the bound before the next attempt starts, so the wait costs nothing then; it matters after a
  short Retry-After or `relayd queue retry`. A copy that shows up later than the bound is sent
  twice: dedupe narrows the window, it cannot close it.
- Graph, EWS whose lookup is refused (403 / ErrorAccessDenied) or impossible (EWS with
  `save_to_sent = false`, no Message-ID): sent again, at least once, as today.
- SMTP: relayd cannot look (no Sent Items on an SMTP server). The doubt is logged and
  journaled ("the resend may duplicate") and counted in `relayd_attempts_in_doubt_total`
  with `lookup="no"`; the message is retried as any deferral. A reused connection that dies
  there is not retried on a new connection within the same attempt (as it is before DATA).

Rejected alternatives: treating every transient failure as in doubt (each 429 or refused
connection would then cost a Sent Items lookup and, worse, the bounded wait, for mail that
provably was not sent); and never retrying a doubtful attempt (a gateway's 503 that sent
nothing would then lose the message, and nothing accepted may be lost).
"""

from __future__ import annotations

# A lookup after a doubtful attempt concludes "not sent" only this long after that attempt
# ended: Sent Items shows a copy seconds after the send (FIELD-NOTES), and a gateway's 504
# comes when the gateway gave up, not when the service behind it did. 30 s covers both with
# room, and is shorter than the default `retry_min`, so it seldom holds anything up.
SENT_ITEMS_LAG_S = 30.0
SENT_ITEMS_POLL_S = 5.0  # between lookups within that bound

# The HTTP statuses that say a gateway or the service failed while the request may have
# been acted on.
DOUBTFUL_STATUSES = frozenset({500, 502, 503, 504})
# Graph's error codes for "throttled, not processed" (Graph's throttling guidance; the Outlook
# service answers `ApplicationThrottled` with "MailboxConcurrency" in the message): with one of
# these in the body, a 503 proves nothing was sent. Only codes known to mean that: a code
# wrongly listed here would send a message twice.
THROTTLING_CODES = frozenset({"TooManyRequests", "ApplicationThrottled", "MailboxConcurrency"})

# What the log and the journal say of a doubt that no lookup can settle, and of SMTP's.
DUPLICATE_RISK = "the resend may duplicate it"
SMTP_DUPLICATE_RISK = ("no reply after the end of DATA (RFC 1047): the upstream may have "
                       f"taken the message; {DUPLICATE_RISK}")
# The doubt of an attempt that was under way when relayd stopped (a crash, kill -9).
INTERRUPTED = "an attempt was under way when relayd stopped"


def http_in_doubt(status: int | None, *, written: bool, error_code: str = "") -> bool:
    """The table's HTTP rows. `status` is None when no status line came (a timeout, a reset,
    EOF); `written`: the whole request was handed to the connection; `error_code`: the
    service's own error code from the body (Graph's `error.code`), if any."""
    if status is None:
        return written
    if status in DOUBTFUL_STATUSES:
        return error_code not in THROTTLING_CODES
    return False
