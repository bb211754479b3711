"""The outbox upstream: each message becomes an .eml file; nothing leaves the machine."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

from relayd.config import Config, RouteConfig
from relayd.delivery.base import (
    OutboundMessage,
    RecipientResult,
    Session,
    Status,
    Upstream,
    all_results,
)
from relayd.errors import TransientDeliveryError
from relayd.platform.fs import write_atomic


class OutboxUpstream(Upstream):
    def __init__(self, route: RouteConfig, config: Config) -> None:
        super().__init__(route, config)
        self.path: Path = route.outbox.path

    def session(self) -> Session:
        return OutboxSession(self.path)


class OutboxSession(Session):
    def __init__(self, path: Path) -> None:
        self.path = path

    async def deliver(self, message: OutboundMessage) -> dict[str, RecipientResult]:
        # The envelope is not in the message bytes; keep it in front, as a local delivery
        # agent does with Return-Path, so a dry run shows where the mail would have gone.
        head = f"Return-Path: <{message.sender}>\r\n".encode()
        head += b"".join(f"X-Relayd-Recipient: <{r}>\r\n".encode() for r in message.recipients)
        target = self.path / f"{message.queue_id}.eml"
        try:
            await asyncio.to_thread(self._write, target, head, message)
        except OSError as e:
            raise TransientDeliveryError(f"cannot write {target}: {e.strerror}") from e
        return all_results(message.recipients,
                           RecipientResult.smtp(Status.DELIVERED, 250, f"written to {target}"))

    def _write(self, target: Path, head: bytes, message: OutboundMessage) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if message.spooled is None:
            write_atomic(target, head + message.data, self.path)
        else:
            write_atomic(target, itertools.chain((head,), message.spooled.read_chunks()),
                         self.path)
