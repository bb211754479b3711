"""Who signed in, from a Microsoft id token's claims: shared by the sign-in flows
(relayd.auth.login, the web console's /signin) and the device-code login
(relayd.auth.oauth.login), so that neither imports the other.
"""

from __future__ import annotations

from typing import Any

# The tenant id in every personal Microsoft account's tokens (ID token claims reference, `tid`).
MSA_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"


def microsoft_names(claims: dict[str, Any]) -> list[str]:
    """The names a Microsoft id token gives the signed-in account: preferred_username and upn;
    for a personal account (tid is the personal accounts' tenant) also `email`, because its
    preferred_username is whatever it signed in with (an address, a phone number or another
    name; ID token claims reference) while `email` is its mailbox. A work account's `email` is
    a directory attribute an admin may set to anything, so it is not taken there."""
    keys = ["preferred_username", "upn"]
    if str(claims.get("tid") or "").lower() == MSA_TENANT_ID:
        keys.append("email")
    names: list[str] = []
    for key in keys:
        value = str(claims.get(key) or "").strip()
        if value and value.lower() not in (n.lower() for n in names):
            names.append(value)
    return names


def microsoft_account(claims: dict[str, Any], wanted: str | None) -> str:
    """The signed-in account as relayd stores it: `wanted` when the token names it (any case),
    else the first name that is an address, else the first name (which check_account refuses
    as another account)."""
    names = microsoft_names(claims)
    for name in names:
        if wanted and name.lower() == wanted.lower():
            return name
    return next((n for n in names if "@" in n), names[0] if names else "")


def signed_in_account(claims: dict[str, Any]) -> str:
    return str(claims.get("preferred_username") or claims.get("upn") or claims.get("email")
               or "").strip()
