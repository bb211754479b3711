"""The web console (relayd.web.console): driven by headless Chromium as an admin would, its JSON
against the CLI's --json, CSRF, and the login off loopback."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Upstream,
    arelayd_cli,
    dead_port,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)
from fakes.https import server_cert_files, shared_ca
from test_auth_login import headless_chromium

from relayd.auth.passwords import hash_password
from relayd.config import ConfigError, WebConfig, load_config

SUBJECT = "<b>bold</b> & <script>alert(1)</script> \x1b[2J\x07bell"
WEB = '[web]\nlisten = "127.0.0.1:0"\n'


def routes(up: int, down: int) -> str:
    return (smtp_route("staff", '["*@business.com"]', up)
            + smtp_route("other", '["*@other.test"]', down))


def get(url: str, *, accept: str = "", auth: str | None = None,
        context: Any = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    request = urllib.request.Request(url)
    if accept:
        request.add_header("Accept", accept)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def post(url: str, fields: dict[str, str], *, auth: str | None = None,
         context: Any = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(),
                                     method="POST")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def shoot(driver: Any, path: Path) -> None:
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# Every selenium call runs on a thread: the driver waits for a page to load, and the page
# needs this event loop (the console reads the queue on it).


async def open_page(driver: Any, url: str) -> str:
    def go() -> str:
        driver.get(url)
        return str(driver.find_element("tag name", "body").text)

    return await asyncio.to_thread(go)


async def click(driver: Any, how: str, what: str = "") -> str:
    """Click the element with id `how` (or found by `how`, `what`), which leads to another
    page; that page's text."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def go() -> str:
        old = driver.find_element("tag name", "html")
        driver.find_element(*((how, what) if what else ("id", how))).click()
        # While the next page replaces this one, an element found a moment before may be
        # gone ("stale", "does not belong to the document"): read again until it holds.
        wait = WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,))
        wait.until(expected_conditions.staleness_of(old))
        return str(wait.until(lambda d: d.find_element("tag name", "body").text))

    return await asyncio.to_thread(go)


async def type_into(driver: Any, element_id: str, text: str) -> None:
    await asyncio.to_thread(lambda: driver.find_element("id", element_id).send_keys(text))


async def source(driver: Any) -> str:
    return str(await asyncio.to_thread(lambda: driver.page_source))


async def journal_events(path: Path, predicate: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def look() -> bool:
        found.clear()
        for f in sorted(path.glob("*.jsonl")):
            for line in f.read_text().splitlines():
                event = json.loads(line)
                if predicate(event):
                    found.append(event)
        return bool(found)

    await wait_for(look, what="the journal event")
    return found


async def test_console_queue_message_retry_delete_in_chromium(tmp_path: Path,
                                                               upstream: Upstream) -> None:
    """1. route staff's upstream is down, route other's never answers: three messages wait
    2. the overview shows both routes failing, first under "Needs attention"
    3. the queue filtered to route staff lists its two messages, not other's
    4. the message page shows the envelope, the last reply, the Subject escaped
    5. delete (confirmed) removes one, journaled with the admin, shown in /log
    6. the upstream is back; retry (confirmed) delivers the other at once."""
    cfg = write_config(tmp_path, routes(upstream.port, dead_port()), extra=WEB,
                       queue='retry_min = "1h"\nretry_max = "2h"')
    await upstream.stop()
    with headless_chromium(tmp_path) as driver:
        async with run_service(cfg) as svc:
            port = service_port(svc)
            await send(port, "alice@business.com", ["bob@example.com"],
                       message(to="bob@example.com", subject=SUBJECT))
            await send(port, "alice@business.com", ["carol@example.com"], message())
            await send(port, "x@other.test", ["dave@example.com"], message("x@other.test"))
            # The first of each route is tried; carol's waits for staff's hold to end.
            await wait_for(lambda: svc.qmgr.view.count() == 3 and sum(
                1 for q in svc.qmgr.view.messages() if q.attempts) == 2, what="two tried")
            base = f"http://127.0.0.1:{svc.web_port}"
            by_rcpt = {q.entry.recipients[0]: q.id for q in svc.qmgr.view.messages()}

            text = await open_page(driver, base + "/")
            assert "Needs attention" in text
            assert "route staff: unreachable failing since" in text
            assert "route other: unreachable failing since" in text
            assert "3 message(s) in the queue" in text
            assert text.count("held until") == 2  # both routes' mail waits for the hold
            await asyncio.to_thread(shoot, driver, tmp_path / "overview.png")

            await open_page(driver, base + "/queue")
            from selenium.webdriver.support.ui import Select

            await asyncio.to_thread(lambda: Select(driver.find_element("id", "f-route"))
                                    .select_by_value("staff"))
            text = await click(driver, "apply")
            assert "2 of 3 queued message(s) match" in text
            assert by_rcpt["bob@example.com"] in text and by_rcpt["carol@example.com"] in text
            assert by_rcpt["dave@example.com"] not in text
            await asyncio.to_thread(shoot, driver, tmp_path / "queue.png")

            bob = by_rcpt["bob@example.com"]
            text = await click(driver, "link text", bob)
            assert f"Message {bob}" in text and "<alice@business.com>" in text
            assert "bob@example.com pending" in text and "cannot connect" in text
            # The Subject, escaped: its markup is text, its controls visible escapes.
            assert "<b>bold</b> & <script>alert(1)</script> \\x1b[2J\\x07bell" in text
            html_source = await source(driver)
            assert "<script>alert" not in html_source and "\x1b" not in html_source
            assert "<script" not in html_source
            await asyncio.to_thread(shoot, driver, tmp_path / "message.png")

            carol = by_rcpt["carol@example.com"]
            await open_page(driver, f"{base}/queue/{carol}")
            text = await click(driver, "delete")
            assert f"Delete {carol} from the queue?" in text
            text = await click(driver, "confirm")
            assert "delete: 1 message(s)" in text
            assert not svc.qmgr.view.has(carol)
            assert carol not in text
            await upstream.start()
            await open_page(driver, f"{base}/queue/{bob}")
            text = await click(driver, "retry")
            assert f"Retry {bob} now?" in text
            text = await click(driver, "confirm")
            await wait_for(lambda: len(upstream.messages) == 1, what="the retried message")
            assert upstream.messages[0].rcpt_tos == ["bob@example.com"]
            await wait_for(lambda: not svc.qmgr.view.has(bob), what="bob's message gone")
            assert "retry: 1 message(s)" in text

            events = await journal_events(tmp_path / "journal",
                                          lambda e: e["event"] == "deleted")
            assert events[0]["id"] == carol and events[0]["admin"] == "loopback"
            retried = await journal_events(tmp_path / "journal",
                                           lambda e: e["event"] == "retry")
            assert retried[0]["id"] == bob and retried[0]["admin"] == "loopback"
            text = await open_page(driver, f"{base}/log?id={carol}")
            assert "deleted" in text and "loopback" in text
            await asyncio.sleep(0.5)
            assert len(upstream.messages) == 1  # carol's was not sent


async def test_journal_query_for_a_recipient_across_two_day_files(tmp_path: Path,
                                                                  upstream: Upstream) -> None:
    """1. the journal holds events of dave on two days, in two day files, and others' 2. the
    admin searches for dave's address in /log 3. both days' events show, newest first, with
    the upstream's answer 4. one event a page: the older page comes from the other file
    5. the CSV export holds both."""
    journal = tmp_path / "journal"
    journal.mkdir()
    now = time.time()
    old = now - 3 * 86400

    def day(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")

    def event(ts: float, qid: str, to: str, reply: str) -> str:
        return json.dumps({"time": ts, "event": "delivered", "id": qid,
                           "from": "alice@business.com", "to": [to], "route": "staff",
                           "reply": reply}) + "\n"

    (journal / f"{day(old)}.jsonl").write_text(
        event(old, "OLDQUEUEID01", "dave@example.com", "250 2.0.0 old accepted")
        + event(old + 1, "OLDQUEUEID02", "erin@example.com", "250 erin"))
    (journal / f"{day(now)}.jsonl").write_text(
        event(now - 60, "NEWQUEUEID01", "dave@example.com", "250 2.0.0 new accepted"))
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       extra=WEB)
    with headless_chromium(tmp_path) as driver:
        async with run_service(cfg) as svc:
            base = f"http://127.0.0.1:{svc.web_port}"
            await open_page(driver, base + "/log")
            await type_into(driver, "f-to", "dave@example.com")
            text = await click(driver, "apply")
            assert "2 event(s)" in text
            assert text.index("NEWQUEUEID01") < text.index("OLDQUEUEID01")  # newest first
            assert "250 2.0.0 old accepted" in text and "250 2.0.0 new accepted" in text
            assert "erin" not in text
            await asyncio.to_thread(shoot, driver, tmp_path / "log.png")

            text = await open_page(driver, base + "/log?to=dave%40example.com&limit=1")
            assert "NEWQUEUEID01" in text and "OLDQUEUEID01" not in text
            text = await click(driver, "older")
            assert "OLDQUEUEID01" in text and "NEWQUEUEID01" not in text

            status, ctype, body = await asyncio.to_thread(
                get, base + "/log/export?to=dave%40example.com&format=csv")
            assert status == 200 and ctype.startswith("text/csv")
            lines = body.splitlines()
            assert lines[0].startswith("time_utc,event,id") and len(lines) == 3
            assert "OLDQUEUEID01" in lines[1] and "NEWQUEUEID01" in lines[2]
            status, _, body = await asyncio.to_thread(
                get, base + "/api/log?to=dave%40example.com")
    cli = await arelayd_cli("log", "-c", str(cfg), "--to", "dave@example.com", "--json")
    from_cli = [json.loads(line) for line in cli.stdout.splitlines()]
    assert json.loads(body)["events"] == list(reversed(from_cli))


async def test_send_test_and_route_lookup_in_chromium(tmp_path: Path,
                                                      upstream: Upstream) -> None:
    """1. /routes says what check --explain says 2. the admin looks up a sender's route
    3. sends a test through it: the steps show as the CLI prints them 4. it arrived."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       extra=WEB)
    with headless_chromium(tmp_path) as driver:
        async with run_service(cfg) as svc:
            base = f"http://127.0.0.1:{svc.web_port}"
            text = await open_page(driver, base + "/routes")
            assert "route staff:" in text
            await type_into(driver, "f-address", "alice@business.com")
            text = await click(driver, "lookup")
            assert "alice@business.com: route staff (upstream smtp" in text
            await type_into(driver, "test-from", "alice@business.com")
            await type_into(driver, "test-to", "bob@example.com")
            text = await click(driver, "send-test")
            assert "delivered (exit status 0)" in text
            assert "1. route: staff (upstream smtp)" in text
            assert "4. <bob@example.com>: delivered" in text
            await asyncio.to_thread(shoot, driver, tmp_path / "send-test.png")
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.com"]]
    cli = await arelayd_cli("send-test", "-c", str(cfg), "--from", "alice@business.com",
                            "--to", "bob@example.com")
    assert cli.stdout.splitlines()[0] in text


async def test_token_page_shows_an_expiring_secret(tmp_path: Path, upstream: Upstream,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An app route whose client secret lapses in 5 days: /tokens highlights it and says to
    renew it; the overview lists it first under "Needs attention"."""
    monkeypatch.setenv("CONSOLE_TEST_SECRET", "s3cret")
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=5.5)).date()
    app = ('[routes.app]\nsenders = ["app@business.com"]\nupstream = "graph"\n'
           'tenant_id = "tenant"\nclient_id = "app-client"\n'
           f'client_secret_env = "CONSOLE_TEST_SECRET"\nclient_secret_expires = "{expires}"\n')
    cfg = write_config(tmp_path, app + smtp_route("staff", '["*@business.com"]',
                                                  upstream.port),
                       extra=WEB + f'[auth]\npath = "{tmp_path / "tokens"}"\n')
    with headless_chromium(tmp_path) as driver:
        async with run_service(cfg) as svc:
            base = f"http://127.0.0.1:{svc.web_port}"
            text = await open_page(driver, base + "/tokens")
            assert f"app client secret {expires} 00:00:00 UTC (expires in" in text
            assert "renew it" in text
            assert "Routes without OAuth tokens" in text
            warn = await asyncio.to_thread(
                lambda: [w.text for w in driver.find_elements("css selector",
                                                              "#credentials .warn")])
            assert len(warn) == 1 and "renew it" in warn[0]
            assert "s3cret" not in await source(driver)
            await asyncio.to_thread(shoot, driver, tmp_path / "tokens.png")
            text = await open_page(driver, base + "/")
            assert f"route app: its client secret or certificate expires on {expires}" in text
            status, _, body = await asyncio.to_thread(get, base + "/api/tokens")
    data = json.loads(body)
    assert status == 200 and [c["route"] for c in data["credentials"]] == ["app"]
    assert data["without_tokens"] == [{"route": "staff", "upstream": "smtp", "auth": "none"}]
    assert data["credentials"][0]["expires_at"] == dt.datetime(
        expires.year, expires.month, expires.day, tzinfo=dt.UTC).timestamp()


async def test_json_of_each_page_is_the_clis(tmp_path: Path, upstream: Upstream) -> None:
    """Each page as JSON (Accept or /api) parses and carries what the CLI's --json prints."""
    cfg = write_config(tmp_path, routes(upstream.port, dead_port()), extra=WEB,
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        port = service_port(svc)
        await send(port, "alice@business.com", ["bob@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)
        await send(port, "x@other.test", ["dave@example.com", "erin@example.com"],
                   message("x@other.test", subject=SUBJECT))
        await wait_for(lambda: svc.qmgr.view.count() == 1 and all(
            q.attempts for q in svc.qmgr.view.messages()))
        qid = svc.qmgr.view.ids()[0]
        base = f"http://127.0.0.1:{svc.web_port}"
        await asyncio.sleep(0.6)  # the journal's batch (journal.FLUSH_S)
        pages = {}
        for path in ("/", "/queue", f"/queue/{qid}", "/log", "/routes", "/tokens"):
            s1, t1, by_accept = await asyncio.to_thread(get, base + path,
                                                        accept="application/json")
            s2, t2, by_api = await asyncio.to_thread(get, base + "/api" + path.rstrip("/"))
            assert s1 == s2 == 200 and t1 == t2 == "application/json", path
            pages[path] = json.loads(by_api)
            assert json.loads(by_accept).keys() == pages[path].keys()
        listed = await arelayd_cli("queue", "list", "-c", str(cfg), "--json")
        shown = await arelayd_cli("queue", "show", "-c", str(cfg), qid, "--json")
        logged = await arelayd_cli("log", "-c", str(cfg), "--json")
    cli_list = json.loads(listed.stdout)
    web_list = pages["/queue"]["messages"]
    # `queue list --json`'s item (the route that sends it, route_pinned), plus the state.
    assert [{k: v for k, v in m.items() if k != "state"} for m in web_list] == cli_list
    assert web_list[0]["state"] == "deferred" and web_list[0]["route"] == "other"
    message_json = pages[f"/queue/{qid}"]
    assert {k: message_json[k] for k in json.loads(shown.stdout)} == json.loads(shown.stdout)
    assert ["Subject", SUBJECT] in message_json["headers"]
    cli_events = [json.loads(line) for line in logged.stdout.splitlines()]
    assert pages["/log"]["events"] == list(reversed(cli_events))[:len(pages["/log"]["events"])]
    overview = pages["/"]
    assert {r["name"]: (r["queued"], r["deferred"]) for r in overview["routes"]} == {
        "staff": (0, 0), "other": (1, 1)}
    held = {r["name"]: r["held_until"] for r in overview["routes"]}
    assert held["staff"] is None and held["other"] > time.time() + 3000
    assert any(a.startswith("route other: unreachable failing since")
               for a in overview["attention"])
    assert any(line.startswith("route staff:") for line in pages["/routes"]["explain"])


async def test_csrf_and_escaping(tmp_path: Path, upstream: Upstream) -> None:
    """A POST without the CSRF token or with a wrong one is refused (403) and changes
    nothing; with the page's token it acts. The Subject renders escaped in HTML."""
    cfg = write_config(tmp_path, routes(upstream.port, dead_port()), extra=WEB,
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        await send(service_port(svc), "x@other.test", ["dave@example.com"],
                   message("x@other.test", subject=SUBJECT))
        await wait_for(lambda: any(q.attempts for q in svc.qmgr.view.messages()))
        qid = svc.qmgr.view.ids()[0]
        base = f"http://127.0.0.1:{svc.web_port}"
        for fields in ({"action": "delete", "id": qid},
                       {"action": "delete", "id": qid, "csrf": "0" * 64},
                       {"action": "retry-route", "route": "other", "csrf": "x"}):
            status, body = await asyncio.to_thread(post, base + "/action", fields)
            assert status == 403 and "nothing was changed" in body
        status, body = await asyncio.to_thread(post, base + "/routes/send-test",
                                               {"from": "x@other.test", "to": "a@b.c"})
        assert status == 403
        assert svc.qmgr.view.has(qid) and svc.qmgr.view.message(qid).attempts == 1
        _, _, confirm = await asyncio.to_thread(get, base + f"/confirm?action=delete&id={qid}")
        token = confirm.split('name="csrf" value="')[1].split('"')[0]
        _, _, html_page = await asyncio.to_thread(get, base + f"/queue/{qid}")
        assert ("&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt; "
                "\\x1b[2J\\x07bell") in html_page
        assert "<script>" not in html_page and "\x1b" not in html_page
        status, _ = await asyncio.to_thread(post, base + "/action",
                                            {"action": "delete", "id": qid, "csrf": token})
        assert status == 200  # after the 303 to /queue
        assert not svc.qmgr.view.has(qid)


async def test_off_loopback_every_page_and_api_needs_a_login(tmp_path: Path,
                                                             upstream: Upstream) -> None:
    """Off loopback (HTTPS, [web] admins): 401 on every page and API without a login or with
    a non-admin's; an admin sees them, and the journal names that admin for a delete."""
    ca = shared_ca()
    cert, key = server_cert_files(tmp_path)
    users = (f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
             f'[server.users.it]\npassword_hash = "{hash_password("admin-pw")}"\n'
             'senders = ["*@business.com"]\n'
             f'[server.users.scanner]\npassword_hash = "{hash_password("scan-pw")}"\n'
             'senders = ["scanner@business.com"]\n'
             f'[server.users.helpdesk]\npassword_hash = "{hash_password("look-pw")}"\n'
             'senders = ["helpdesk@business.com"]\n')
    cfg = write_config(tmp_path, routes(upstream.port, dead_port()), server=users,
                       extra=WEB + 'admins = ["it"]\nviewers = ["helpdesk"]\n',
                       queue='retry_min = "1h"\nretry_max = "2h"')
    config = load_config(cfg)
    assert config.web.viewers == ("helpdesk",)
    config = dataclasses.replace(config, web=WebConfig(config.web.listen, ("it",),
                                                       loopback=False, viewers=("helpdesk",)))
    context = ca.client_context()
    async with run_service(config) as svc:
        from relayd.queue import Spool

        entry = Spool(tmp_path / "queue").store_sync("x@other.test", ["dave@example.com"],
                                                      message("x@other.test"))
        svc.qmgr.submit(entry)
        base = f"https://127.0.0.1:{svc.web_port}"
        paths = ["/", "/queue", f"/queue/{entry.id}", "/log", "/log/export?format=csv",
                 "/routes", "/tokens", f"/confirm?action=delete&id={entry.id}"]
        for path in paths + ["/api" + p for p in paths]:
            status, _, body = await asyncio.to_thread(get, base + path, context=context)
            assert status == 401, path
            assert "dave@example.com" not in body
        # A wrong login makes the address wait (server.FAILED_LOGIN_DELAY_S, doubling).
        for path, login, pause in (("/queue", "scanner:scan-pw", 1.1),
                                   ("/api/log", "it:wrong", 2.1)):
            status, _, body = await asyncio.to_thread(get, base + path, auth=login,
                                                      context=context)
            assert status == 401 and "dave@example.com" not in body, (path, login)
            await asyncio.sleep(pause)
        status, _ = await asyncio.to_thread(post, base + "/action",
                                            {"action": "delete", "id": entry.id},
                                            context=context)
        assert status == 401 and svc.qmgr.view.has(entry.id)
        for path in paths:
            status, _, _ = await asyncio.to_thread(get, base + path, auth="it:admin-pw",
                                                   context=context)
            assert status == 200, path
        _, _, confirm = await asyncio.to_thread(
            get, base + f"/confirm?action=delete&id={entry.id}", auth="it:admin-pw",
            context=context)
        token = confirm.split('name="csrf" value="')[1].split('"')[0]
        status, body = await asyncio.to_thread(post, base + "/api/action",
                                               {"action": "delete", "id": entry.id,
                                                "csrf": token},
                                               auth="it:admin-pw", context=context)
        assert status == 200 and json.loads(body) == {"action": "delete", "done": 1,
                                                      "admin": "it"}
        events = await journal_events(tmp_path / "journal", lambda e: e["event"] == "deleted")
        assert events[0]["admin"] == "it"

        # [web] viewers: every page, no action.
        other = Spool(tmp_path / "queue").store_sync("x@other.test", ["erin@example.com"],
                                                      message("x@other.test"))
        svc.qmgr.submit(other)
        viewer = "helpdesk:look-pw"
        for path in ("/", "/queue", f"/queue/{other.id}", "/log", "/routes", "/tokens",
                     "/api/queue"):
            status, _, body = await asyncio.to_thread(get, base + path, auth=viewer,
                                                      context=context)
            assert status == 200, path
        _, _, page = await asyncio.to_thread(get, base + f"/queue/{other.id}", auth=viewer,
                                             context=context)
        assert "erin@example.com" in page and "Retry now" not in page and "csrf" not in page
        _, _, page = await asyncio.to_thread(get, base + "/routes", auth=viewer,
                                             context=context)
        assert "send-test" not in page
        status, _, _ = await asyncio.to_thread(
            get, base + f"/confirm?action=delete&id={other.id}", auth=viewer, context=context)
        assert status == 403
        status, _ = await asyncio.to_thread(post, base + "/action",
                                            {"action": "delete", "id": other.id,
                                             "csrf": token}, auth=viewer, context=context)
        assert status == 403 and svc.qmgr.view.has(other.id)


def test_viewers_must_be_users(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', 2525),
                       extra=WEB + 'viewers = ["nobody"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "web.viewers: 'nobody' is not a [server.users] name" in e.value.problems


async def test_retry_all_of_a_route(tmp_path: Path, upstream: Upstream) -> None:
    """1. route other's upstream is down: two messages wait (one tried, one held) 2. the
    upstream comes up on that port 3. "Retry all messages of route other", confirmed: both are
    delivered; one journal event names the route, the admin and the count."""
    down = Upstream()
    down.port = dead_port()
    cfg = write_config(tmp_path, routes(upstream.port, down.port), extra=WEB,
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        for rcpt in ("dave@example.com", "erin@example.com"):
            await send(service_port(svc), "x@other.test", [rcpt], message("x@other.test"))
        await wait_for(lambda: svc.qmgr.view.count() == 2 and any(
            q.attempts for q in svc.qmgr.view.messages()), what="the route held")
        base = f"http://127.0.0.1:{svc.web_port}"
        _, _, listing = await asyncio.to_thread(get, base + "/queue?route=other")
        assert "Retry all messages of route other" in listing
        _, _, confirm = await asyncio.to_thread(
            get, base + "/confirm?action=retry-route&route=other")
        assert "Retry every queued message of route other now?" in confirm
        token = confirm.split('name="csrf" value="')[1].split('"')[0]
        await down.start()
        try:
            status, body = await asyncio.to_thread(
                post, base + "/api/action", {"action": "retry-route", "route": "other",
                                             "csrf": token})
            assert status == 200 and json.loads(body)["done"] == 2
            # Until relayd has the upstream's replies too: stopping the upstream between its
            # receipt and its 250 would leave both in doubt, not delivered.
            await wait_for(lambda: len(down.messages) == 2 and not svc.qmgr.view.count(),
                           what="both delivered and gone from the queue")
        finally:
            await down.stop()
        assert not svc.qmgr.view.count()
        events = await journal_events(tmp_path / "journal", lambda e: e["event"] == "retry")
        assert [(e["id"], e["route"], e["admin"], e["count"]) for e in events] == [
            ("*", "other", "loopback", 2)]
