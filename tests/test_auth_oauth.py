"""MSAL token providers against a fake identity provider over real HTTPS: app and device flows."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from fakes.config import ALICE, SYSTEM_BUNDLE, UNREACHABLE_EWS, ews_route_keys, staff_config
from fakes.https import HttpsServer
from fakes.idp import (
    DEVICE_GRANT,
    IdpState,
    make_certificate,
)

from relayd.auth.oauth import (
    MsalTokenProvider,
    app_scopes,
    delegated_scopes,
    has_signed_in,
    login,
)
from relayd.auth.registry import make_token_provider, status
from relayd.config import Config, parse_config
from relayd.errors import AuthenticationError

pytestmark = pytest.mark.usefixtures("machine_ca_env")


def make_config(tmp_path: Path, idp: HttpsServer, *, flow: str = "app",
                **route: Any) -> Config:
    return staff_config(tmp_path, ews_route_keys(tmp_path, idp, UNREACHABLE_EWS, flow=flow,
                                                 **route))


def provider(config: Config) -> MsalTokenProvider:
    route = config.routes["staff"]
    scopes = delegated_scopes(route) if route.delegated else app_scopes(route)
    p = make_token_provider(route, config, scopes)
    assert isinstance(p, MsalTokenProvider)
    return p


def sign_in(config: Config, state: IdpState, user: str = ALICE) -> tuple[int, str]:
    state.device_user = user
    out = io.StringIO()
    rc = login(config, "staff", user, out)
    return rc, out.getvalue()


# -- app flow (client credentials) ---------------------------------------------------------------


async def test_app_token_is_cached_not_fetched_per_message(tmp_path: Path,
                                                           idp: HttpsServer) -> None:
    p = provider(make_config(tmp_path, idp))
    first = await p.token("alice@contoso.com")
    for _ in range(5):
        assert await p.token("bob@contoso.com") == first
    assert idp.state.grants("client_credentials") == 1
    form = idp.state.requests[0][1]
    assert form["scope"] == "https://127.0.0.1/.default"
    assert idp.state.check_bearer(first) is not None


async def test_app_token_renewed_before_it_expires(tmp_path: Path, idp: HttpsServer) -> None:
    """1. the IdP asks for renewal after 1 s (refresh_in) 2. a later call gets a new token."""
    idp.state.refresh_in_s = 1
    p = provider(make_config(tmp_path, idp))
    first = p.acquire("")
    assert first.renew_at <= first.expires_at - 300
    assert await p.token("") == first.token
    await asyncio.sleep(1.3)
    second = await p.token("")
    assert second != first.token
    assert idp.state.grants("client_credentials") == 2


async def test_app_token_with_certificate(tmp_path: Path, idp: HttpsServer) -> None:
    cert, pem, thumb = make_certificate(tmp_path)
    idp.state.certificate = cert
    config = make_config(tmp_path, idp, client_secret_file=None, certificate_file=str(pem),
                         thumbprint=thumb)
    token = await provider(config).token("")
    assert idp.state.check_bearer(token) is not None
    form = idp.state.requests[-1][1]
    assert "client_secret" not in form and form["client_assertion"]


async def test_app_certificate_not_registered_is_refused(tmp_path: Path,
                                                         idp: HttpsServer) -> None:
    registered, _, _ = make_certificate(tmp_path / ".")
    idp.state.certificate = registered
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, pem, thumb = make_certificate(other_dir)
    config = make_config(tmp_path, idp, client_secret_file=None, certificate_file=str(pem),
                         thumbprint=thumb)
    with pytest.raises(AuthenticationError, match="invalid_client"):
        await provider(config).token("")


async def test_wrong_secret_is_an_authentication_error_shown_in_status(
        tmp_path: Path, idp: HttpsServer) -> None:
    idp.state.client_secret = "rotated"
    config = make_config(tmp_path, idp)
    with pytest.raises(AuthenticationError, match="invalid_client") as e:
        await provider(config).token("")
    assert "app-secret-value" not in str(e.value)
    out = io.StringIO()
    assert status(config, out) == 1
    assert "invalid_client" in out.getvalue() and "app-only" in out.getvalue()
    assert "app-secret-value" not in out.getvalue()


async def test_invalidate_fetches_a_new_app_token(tmp_path: Path, idp: HttpsServer) -> None:
    p = provider(make_config(tmp_path, idp))
    first = await p.token("")
    p.invalidate("")
    second = await p.token("")
    assert second != first
    assert await p.token("") == second
    assert idp.state.grants("client_credentials") == 2


async def test_identity_provider_down_is_transient(tmp_path: Path, idp: HttpsServer) -> None:
    config = make_config(tmp_path, idp)
    idp.stop()
    with pytest.raises(AuthenticationError, match="unreachable"):
        await provider(config).token("")


async def test_token_endpoint_5xx_is_transient(tmp_path: Path, idp: HttpsServer) -> None:
    idp.state.fail_token_status = 503
    with pytest.raises(AuthenticationError):
        await provider(make_config(tmp_path, idp)).token("")


async def test_ca_file_wins_over_requests_ca_bundle(tmp_path: Path, idp: HttpsServer) -> None:
    # REQUESTS_CA_BUNDLE points at the system store (machine_ca_env), which does not trust the
    # test CA: success proves the route's ca_file was used.
    assert os.environ["REQUESTS_CA_BUNDLE"] == SYSTEM_BUNDLE
    assert await provider(make_config(tmp_path, idp)).token("")
    # and without ca_file the test CA is not trusted: verification is on.
    config = make_config(tmp_path, idp, ca_file=None)
    with pytest.raises(AuthenticationError, match="unreachable"):
        await provider(config).token("")


# -- device flow (delegated) ---------------------------------------------------------------------


async def test_device_login_stores_an_encrypted_cache_used_by_the_daemon(
        tmp_path: Path, idp: HttpsServer) -> None:
    config = make_config(tmp_path, idp, flow="device")
    assert not has_signed_in(config, config.routes["staff"], ALICE)
    rc, out = await asyncio.to_thread(sign_in, config, idp.state)
    assert rc == 0, out
    assert "devicelogin" in out and "Signed in as alice@contoso.com" in out
    assert has_signed_in(config, config.routes["staff"], "Alice@Contoso.com")
    files = [p for p in (tmp_path / "tokens").iterdir() if p.name.endswith(".token")]
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "token.key").stat().st_mode) == 0o600
    blob = files[0].read_bytes()
    # None of the tokens the identity provider issued, nor the account, is readable on disk.
    # (Compare whole tokens: a 3-byte prefix like "rt-" turns up in random base64 by chance.)
    issued = list(idp.state.access_tokens) + list(idp.state.refresh_tokens)
    assert issued and not any(token.encode() in blob for token in issued)
    assert b"alice" not in blob
    form = next(f for g, f in idp.state.requests if g == "devicecode")
    assert idp.state.grants(DEVICE_GRANT) == 2  # polled: pending, then approved
    assert "EWS.AccessAsUser.All" in form["scope"]

    p = provider(config)
    token = await p.token(ALICE)
    assert idp.state.check_bearer(token).user == ALICE  # type: ignore[union-attr]
    assert idp.state.grants("refresh_token") == 0  # the stored access token was still good
    p.invalidate(ALICE)
    assert await p.token(ALICE) != token
    assert idp.state.grants("refresh_token") == 1

    out_io = io.StringIO()
    assert status(config, out_io) == 0
    text = out_io.getvalue()
    assert "alice@contoso.com" in text and "refresh token stored" in text
    assert "at-" not in text and "rt-" not in text


async def test_an_expired_device_code_says_so(tmp_path: Path, idp: HttpsServer) -> None:
    """1. `relayd auth login --device` 2. nobody enters the code before it expires 3. exit 1,
    "expired" and what to do, not msal's last poll answer (authorization_pending)."""
    config = make_config(tmp_path, idp, flow="device")
    idp.state.device_expires_s = 2
    idp.state.device_user = None
    out = io.StringIO()
    rc = await asyncio.to_thread(login, config, "staff", ALICE, out)
    text = out.getvalue()
    assert rc == 1, text
    assert "the code expired before anyone signed in with it" in text
    assert "relayd auth login staff --device" in text
    assert "authorization_pending" not in text
    assert not has_signed_in(config, config.routes["staff"], ALICE)


async def test_login_as_another_account_stores_nothing(tmp_path: Path, idp: HttpsServer) -> None:
    config = make_config(tmp_path, idp, flow="device")
    idp.state.device_user = "mallory@contoso.com"
    out = io.StringIO()
    rc = await asyncio.to_thread(login, config, "staff", ALICE, out)
    assert rc == 1
    assert "signed in as mallory@contoso.com" in out.getvalue()
    assert not has_signed_in(config, config.routes["staff"], ALICE)
    assert not has_signed_in(config, config.routes["staff"], "mallory@contoso.com")


async def test_login_refuses_a_route_without_device_flow(tmp_path: Path,
                                                         idp: HttpsServer) -> None:
    out = io.StringIO()
    assert login(make_config(tmp_path, idp), "staff", ALICE, out) == 2
    assert login(make_config(tmp_path, idp), "nope", ALICE, out) == 2


async def test_not_signed_in_names_the_login_command(tmp_path: Path, idp: HttpsServer) -> None:
    config = make_config(tmp_path, idp, flow="device")
    with pytest.raises(AuthenticationError, match="relayd auth login staff --user bob@"):
        await provider(config).token("bob@contoso.com")


async def test_revoked_refresh_token_defers_and_shows_in_status(tmp_path: Path,
                                                                idp: HttpsServer) -> None:
    """1. alice signs in 2. her refresh token is revoked 3. the token cannot be renewed:
    AuthenticationError (transient) 4. status says invalid_grant 5. a new sign-in is picked up
    by the running provider without a restart."""
    config = make_config(tmp_path, idp, flow="device")
    assert (await asyncio.to_thread(sign_in, config, idp.state))[0] == 0
    p = provider(config)
    await p.token(ALICE)
    idp.state.revoke_user(ALICE)
    p.invalidate(ALICE)  # as after a 401: the access token must be renewed now
    with pytest.raises(AuthenticationError, match="invalid_grant") as e:
        await p.token(ALICE)
    assert "relayd auth login staff --user alice@contoso.com" in str(e.value)
    out = io.StringIO()
    assert status(config, out) == 1
    assert "invalid_grant" in out.getvalue() and ALICE in out.getvalue()

    assert (await asyncio.to_thread(sign_in, config, idp.state))[0] == 0
    token = await p.token(ALICE)
    assert idp.state.check_bearer(token) is not None
    out = io.StringIO()
    assert status(config, out) == 0, out.getvalue()


async def test_refreshed_cache_is_written_back(tmp_path: Path, idp: HttpsServer) -> None:
    config = make_config(tmp_path, idp, flow="device")
    assert (await asyncio.to_thread(sign_in, config, idp.state))[0] == 0
    path = next((tmp_path / "tokens").glob("*.token"))
    before = path.read_bytes()
    p = provider(config)
    p.invalidate(ALICE)
    token = await p.token(ALICE)
    assert path.read_bytes() != before
    # a fresh provider (a restarted daemon) uses the written-back access token
    assert await provider(config).token(ALICE) == token


async def test_key_from_systemd_credential(tmp_path: Path, idp: HttpsServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token-key").write_text("k" * 40)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = parse_config({
        "queue": {"path": str(tmp_path / "queue")}, "auth": {"path": str(tmp_path / "tokens")},
        "routes": {"staff": ews_route_keys(tmp_path, idp, UNREACHABLE_EWS, flow="device")}})
    assert (await asyncio.to_thread(sign_in, config, idp.state))[0] == 0
    assert await provider(config).token(ALICE)
    (creds / "token-key").write_text("x" * 40)  # another key cannot decrypt it
    with pytest.raises(AuthenticationError, match="cannot be decrypted"):
        await provider(config).token(ALICE)


async def test_concurrent_refreshes_share_one_cache(tmp_path: Path, idp: HttpsServer) -> None:
    config = make_config(tmp_path, idp, flow="device")
    assert (await asyncio.to_thread(sign_in, config, idp.state))[0] == 0
    p = provider(config)
    tokens = await asyncio.gather(*(p.token(ALICE) for _ in range(8)))
    assert len(set(tokens)) == 1
    assert threading.active_count() < 50
