"""Address patterns, as routes and logins write them: an exact address, `*@domain`, or `*`.

The one rule that picks a route for a sender lives here, in `best_pattern`: the address itself
beats `*@domain`, which beats `*`. `relayd.router.Router` answers with it at MAIL FROM and
`relayd.config` with it when it checks that [notify]'s sender has a route, so this module
imports neither of them (it was the piece config and router shared, and the reason they
imported each other).

Matching folds ASCII letters only (`ascii_lower`), as Postfix does: Unicode case folding would
let a look-alike address match another's route.
"""

from __future__ import annotations

from collections.abc import Container

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only, as Postfix folds addresses: str.lower() would also fold
    non-ASCII (KELVIN SIGN U+212A becomes k), making a look-alike match another's route."""
    return text.translate(_ASCII_LOWER)


def validate_pattern(pattern: str) -> str | None:
    """Return why a sender pattern is invalid, or None."""
    if pattern == "*":
        return None
    if any(c.isspace() for c in pattern) or pattern.count("@") != 1:
        return f"{pattern!r} is not an address, *@domain or *"
    local, domain = pattern.split("@")
    if not local or not domain or "*" in domain or ("*" in local and local != "*"):
        return f"{pattern!r} is not an address, *@domain or *"
    return None


def normalize(address: str) -> str:
    """ASCII lower-case for matching. Local parts are case-sensitive in theory, never in
    practice; a non-ASCII address must match a pattern exactly (no Unicode case folding)."""
    return ascii_lower(address.strip())


def matches_any(patterns: tuple[str, ...], sender: str) -> bool:
    """Whether `sender` matches one of the patterns (exact, *@domain or *)."""
    address = normalize(sender)
    domain = address.rpartition("@")[2]
    return "*" in patterns or address in patterns or f"*@{domain}" in patterns


def allows(patterns: tuple[str, ...], address: str) -> bool:
    """Whether a recipient list lets `address` through (an empty list allows anyone)."""
    return not patterns or matches_any(patterns, address)


def best_pattern(sender: str, claimed: Container[str]) -> str | None:
    """The pattern in `claimed` that picks `sender`'s route: the address itself, else
    `*@domain`, else `*`; None when none does or `sender` is not an address."""
    address = normalize(sender)
    if not address or "@" not in address:
        return None
    if address in claimed:
        return address
    domain = f"*@{address.rpartition('@')[2]}"
    if domain in claimed:
        return domain
    return "*" if "*" in claimed else None
