"""What the queue manager reports as it goes (the metrics count it)."""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    """What the queue manager reports (metrics); every method must be cheap and never raise."""

    def delivered(self, route: str) -> None: ...
    def deferred(self, route: str) -> None: ...
    def bounced(self, route: str) -> None: ...
    def observe_latency(self, route: str, seconds: float) -> None: ...
    def in_doubt(self, route: str, lookup: bool) -> None: ...


class NullObserver:
    def delivered(self, route: str) -> None:
        pass

    def deferred(self, route: str) -> None:
        pass

    def bounced(self, route: str) -> None:
        pass

    def observe_latency(self, route: str, seconds: float) -> None:
        pass

    def in_doubt(self, route: str, lookup: bool) -> None:
        pass
