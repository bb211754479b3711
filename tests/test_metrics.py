"""The Prometheus endpoint and /healthz, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.config import Address
from relayd.metrics import Metrics


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    def fetch() -> tuple[int, str, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers["Content-Type"], e.read().decode()

    return await asyncio.to_thread(fetch)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Health:
    def __init__(self) -> None:
        self.result: bool | Exception = True

    def __call__(self) -> bool:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, int, Health]]:
    metrics, health = Metrics(), Health()
    port = await metrics.start(Address("127.0.0.1", 0), health)
    try:
        yield metrics, port, health
    finally:
        await metrics.stop()


async def test_metrics_exposes_every_figure(served: tuple[Metrics, int, Health]) -> None:
    metrics, port, _ = served
    metrics.stored("staff")
    metrics.stored("staff")
    metrics.stored("system")
    metrics.delivered("staff")
    metrics.deferred("staff")
    metrics.bounced("system")
    metrics.failed_login()
    metrics.observe_latency("staff", 0.3)
    metrics.observe_latency("staff", 7.0)
    metrics.set_queue(5, 120.5)
    metrics.set_token_expiry("staff", "alice@business.com", 3599)

    status, ctype, body = await _get(port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    s = _samples(body)
    assert s[("relayd_messages_accepted_total", (("route", "staff"),))] == 2
    assert s[("relayd_messages_accepted_total", (("route", "system"),))] == 1
    assert s[("relayd_messages_delivered_total", (("route", "staff"),))] == 1
    assert s[("relayd_messages_deferred_total", (("route", "staff"),))] == 1
    assert s[("relayd_messages_bounced_total", (("route", "system"),))] == 1
    assert s[("relayd_failed_logins_total", ())] == 1
    assert s[("relayd_delivery_latency_seconds_count", (("route", "staff"),))] == 2
    assert s[("relayd_delivery_latency_seconds_bucket", (("le", "0.5"), ("route", "staff")))] == 1
    assert s[("relayd_queue_depth", ())] == 5
    assert s[("relayd_queue_oldest_age_seconds", ())] == 120.5
    assert s[("relayd_token_expiry_seconds",
              (("account", "alice@business.com"), ("route", "staff")))] == 3599


async def test_instances_do_not_share_figures() -> None:
    a, b = Metrics(), Metrics()
    a.stored("staff")
    assert b"relayd_messages_accepted_total{route=\"staff\"}" in a.render()
    assert b"route=\"staff\"" not in b.render()


async def test_healthz(served: tuple[Metrics, int, Health]) -> None:
    _, port, health = served
    assert await _get(port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    health.result = False
    status, _, body = await _get(port, "/healthz")
    assert (status, body) == (503, "unhealthy: health check failed\n")
    health.result = OSError("queue /var/lib/relayd/queue not writable: No space left")
    status, _, body = await _get(port, "/healthz")
    assert status == 503
    assert body == "unhealthy: queue /var/lib/relayd/queue not writable: No space left\n"
    health.result = True
    assert (await _get(port, "/healthz"))[0] == 200


async def test_other_requests(served: tuple[Metrics, int, Health]) -> None:
    _, port, _ = served
    assert (await _get(port, "/"))[0] == 404
    assert (await _get(port, "/metrics", method="POST"))[0] == 405
    status, _, body = await _get(port, "/metrics", method="HEAD")
    assert (status, body) == (200, "")
    assert (await _get(port, "/metrics?name[]=x"))[0] == 200


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_malformed_and_oversize_requests(served: tuple[Metrics, int, Health]) -> None:
    _, port, _ = served
    assert (await _raw(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
    assert (await _raw(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.0 431 ")
    many = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"
    assert (await _raw(port, many)).startswith(b"HTTP/1.0 431 ")
    # The endpoint still serves after all that.
    assert (await _get(port, "/healthz"))[0] == 200


async def test_stop_closes_idle_connections_and_port() -> None:
    metrics = Metrics()
    port = await metrics.start(Address("127.0.0.1", 0), lambda: True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")   # never finishes the request
    await writer.drain()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(metrics.stop(), 10)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await metrics.stop()   # idempotent


async def test_start_twice_refused(served: tuple[Metrics, int, Health]) -> None:
    metrics, _, _ = served
    check: Callable[[], bool] = lambda: True  # noqa: E731
    with pytest.raises(RuntimeError):
        await metrics.start(Address("127.0.0.1", 0), check)


def test_token_health_is_in_the_metrics() -> None:
    from relayd.auth import TokenHealth

    m = Metrics()
    m.set_token_health(TokenHealth("m365", "alice@business.com", needs_signin=True,
                                   credential_expires_at=1_000_000 + 5 * 86400), 1_000_000)
    text = m.render().decode()
    assert 'relayd_token_needs_signin{account="alice@business.com",route="m365"} 1.0' in text
    assert 'relayd_credential_expiry_seconds{route="m365"} 432000.0' in text
