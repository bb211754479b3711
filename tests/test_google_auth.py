"""GoogleTokenProvider against a fake Google token endpoint over HTTPS with a test CA."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.google import (
    CLIENT_ID,
    CLIENT_SECRET,
    GMAIL_SCOPE,
    JWT_GRANT,
    GoogleState,
    start_google,
)
from fakes.https import HttpsServer

from relayd.auth.google import GoogleTokenProvider
from relayd.auth.registry import make_token_provider
from relayd.config import Config, parse_config
from relayd.errors import AuthenticationError

SCOPES = [GMAIL_SCOPE]


@pytest.fixture
def google() -> Iterator[HttpsServer]:
    server = start_google()
    yield server
    server.stop()


def google_config(tmp_path: Path, token_uri: str, ca_file: Path | None, **keys: Any) -> Config:
    route: dict[str, Any] = {
        "senders": ["*@business.com"], "upstream": "smtp", "host": "127.0.0.1", "port": 2525,
        "tls": "none", "auth": "xoauth2", "provider": "google", "client_id": CLIENT_ID,
        "authority": token_uri, **keys,
    }
    if ca_file is not None:
        route["ca_file"] = str(ca_file)
    return parse_config({"queue": {"path": str(tmp_path / "queue")},
                         "auth": {"path": str(tmp_path / "tokens")},
                         "routes": {"gmail": route}})


def refresh_provider(tmp_path: Path, server: HttpsServer, monkeypatch: pytest.MonkeyPatch,
                     user: str = "alice@business.com", ca: bool = True) -> GoogleTokenProvider:
    st: GoogleState = server.state
    monkeypatch.setenv("G_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("G_REFRESH", st.add_user(user))
    config = google_config(tmp_path, st.token_uri, server.ca_file if ca else None,
                           client_secret_env="G_SECRET", refresh_token_env="G_REFRESH")
    provider = make_token_provider(config.routes["gmail"], config, SCOPES)
    assert isinstance(provider, GoogleTokenProvider)
    return provider


def sa_provider(tmp_path: Path, server: HttpsServer, monkeypatch: pytest.MonkeyPatch,
                key: dict[str, Any] | str | None = None,
                client_id: str = "104050607080901020304") -> GoogleTokenProvider:
    st: GoogleState = server.state
    if key is None:
        key = st.add_service_account(client_id=client_id)
    key_file = tmp_path / "sa.json"
    key_file.write_text(key if isinstance(key, str) else json.dumps(key))
    os.chmod(key_file, 0o600)
    config = google_config(tmp_path, st.token_uri, server.ca_file, client_id=client_id,
                           client_secret_file=str(key_file))
    provider = make_token_provider(config.routes["gmail"], config, SCOPES)
    assert isinstance(provider, GoogleTokenProvider)
    return provider


async def test_refresh_token_gives_a_token_the_server_issued(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    st: GoogleState = google.state
    provider = refresh_provider(tmp_path, google, monkeypatch)
    assert provider.mode == "refresh_token"
    token = await provider.token("alice@business.com")
    issued = st.check_bearer(token)
    assert issued is not None and issued.user == "alice@business.com"
    assert issued.scope == GMAIL_SCOPE
    # Cached: the second call asks Google nothing.
    assert await provider.token("alice@business.com") == token
    assert st.grants("refresh_token") == 1
    secret_values = [token, os.environ["G_REFRESH"], CLIENT_SECRET]
    assert not any(v in caplog.text for v in secret_values)
    provider.close()


async def test_invalidate_fetches_a_new_token(tmp_path: Path, google: HttpsServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    st: GoogleState = google.state
    provider = refresh_provider(tmp_path, google, monkeypatch)
    first = await provider.token("alice@business.com")
    provider.invalidate("alice@business.com")
    second = await provider.token("alice@business.com")
    assert second != first and st.grants("refresh_token") == 2
    provider.close()


async def test_token_renewed_before_it_expires(tmp_path: Path, google: HttpsServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    st: GoogleState = google.state
    st.token_lifetime_s = 1
    provider = refresh_provider(tmp_path, google, monkeypatch)
    first = await provider.token("alice@business.com")
    await asyncio.sleep(1.2)
    second = await provider.token("alice@business.com")
    assert second != first
    assert st.check_bearer(second) is not None
    provider.close()


async def test_revoked_refresh_token_is_an_authentication_error(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    st: GoogleState = google.state
    provider = refresh_provider(tmp_path, google, monkeypatch)
    st.revoked.add(os.environ["G_REFRESH"])
    with pytest.raises(AuthenticationError) as exc:
        await provider.token("alice@business.com")
    assert "invalid_grant" in str(exc.value) and "revoked" in str(exc.value)
    assert os.environ["G_REFRESH"] not in str(exc.value)
    provider.close()


async def test_ca_file_wins_over_the_environment_bundle(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. REQUESTS_CA_BUNDLE names the system bundle (as on this machine) 2. with ca_file the
    test CA is trusted 3. without it the same server is refused: verification stays on."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    good = refresh_provider(tmp_path, google, monkeypatch)
    assert await good.token("alice@business.com")
    good.close()
    bad = refresh_provider(tmp_path, google, monkeypatch, ca=False)
    with pytest.raises(AuthenticationError) as exc:
        await bad.token("alice@business.com")
    assert "unreachable" in str(exc.value)
    bad.close()


async def test_unreachable_token_endpoint_is_an_authentication_error(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("G_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("G_REFRESH", "1//whatever")
    config = google_config(tmp_path, f"https://127.0.0.1:{port}/token", google.ca_file,
                           client_secret_env="G_SECRET", refresh_token_env="G_REFRESH",
                           timeout="5s")
    provider = GoogleTokenProvider(config.routes["gmail"], config, SCOPES)
    with pytest.raises(AuthenticationError, match="unreachable"):
        await provider.token("alice@business.com")
    provider.close()


async def test_service_account_delegates_to_each_sender(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    st: GoogleState = google.state
    provider = sa_provider(tmp_path, google, monkeypatch)
    assert provider.mode == "service_account"
    alice = await provider.token("alice@business.com")
    bob = await provider.token("Bob@business.com")
    issued_alice, issued_bob = st.check_bearer(alice), st.check_bearer(bob)
    assert issued_alice is not None and issued_alice.user == "alice@business.com"
    assert issued_bob is not None and issued_bob.user == "Bob@business.com"
    assert issued_alice.scope == GMAIL_SCOPE
    assert await provider.token("alice@business.com") == alice
    assert st.grants(JWT_GRANT) == 2
    provider.close()


async def test_service_account_subject_outside_the_delegation_is_refused(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = sa_provider(tmp_path, google, monkeypatch)
    with pytest.raises(AuthenticationError, match="unauthorized_client"):
        await provider.token("mallory@elsewhere.org")
    provider.close()


@pytest.mark.parametrize("key, why", [
    ("not json at all", "not JSON"),
    (json.dumps({"type": "authorized_user"}), "service_account"),
    (json.dumps({"type": "service_account", "client_email": "x@y"}), "private_key"),
])
async def test_bad_service_account_key_is_explained(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch, key: str,
        why: str) -> None:
    provider = sa_provider(tmp_path, google, monkeypatch, key=key)
    with pytest.raises(AuthenticationError, match=why):
        await provider.token("alice@business.com")
    provider.close()


async def test_client_id_must_be_the_service_accounts(
        tmp_path: Path, google: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    st: GoogleState = google.state
    key = st.add_service_account(client_id="111")
    provider = sa_provider(tmp_path, google, monkeypatch, key=key, client_id="222")
    with pytest.raises(AuthenticationError, match="client ID"):
        await provider.token("alice@business.com")
    provider.close()
