"""Consumer mail providers relayd has recipes for, and the fix for each one's usual refusals.

One table (`PROVIDERS`) that `relayd send-test`, the delivery agent's log line for a refused
login, the status page and `relayd check --explain` all read, so an admin is told the same fix
wherever the refusal shows up.

Rules:
- A route belongs to a provider when its SMTP host is (or ends with) one of the provider's
  hosts, or else when the account it logs in as (`username`, a fixed `mailbox`, or its exact
  senders) is an address at one of the provider's own domains. The second rule covers custom
  domains relayed through the provider's host and routes whose host is a test server.
- A fix is given only for a refusal whose words match the provider's pattern, and only on the
  route kind it applies to (`password` routes for an app-password refusal); nothing is guessed
  for other replies. The reply itself is never changed: the journal and the bounce keep the
  upstream's words, and the fix is said beside them.
- The explain line names what the provider refuses (send-as rules, daily limits), so the admin
  reads it before the first refusal, not after.
Each row cites where its facts come from; the recipes in conf/examples carry the same sources.
Rejected alternative: rows in relayd.reply's table. That table changes what a reply means for
the queue (defer instead of bounce); these rows change nothing about delivery, and they depend on
the route (which provider, password or OAuth), which a reply alone does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.config import RouteConfig


@dataclass(frozen=True)
class Fix:
    pattern: re.Pattern[str]  # searched in the reply as one line ("535 5.7.8 ...")
    auth: tuple[str, ...]  # the route auth kinds it applies to
    text: str


@dataclass(frozen=True)
class Provider:
    name: str
    hosts: tuple[str, ...]  # SMTP submission hosts (a host equal to one, or a subdomain)
    domains: tuple[str, ...]  # the provider's own address domains
    refuses: str  # for `check --explain`: send-as rules and limits, in one sentence
    fixes: tuple[Fix, ...]
    recipe: str


def _fix(pattern: str, auth: tuple[str, ...], text: str) -> Fix:
    return Fix(re.compile(pattern, re.IGNORECASE), auth, text)


# An SMTP AUTH refusal: 535 with any status, or 5.7.8 / 5.7.139 / 5.7.3 wherever it appears.
_AUTH_REFUSED = r"(^|\s)535\b|\b5\.7\.(8|139|3)\b|authentication (unsuccessful|failed)"

PROVIDERS: tuple[Provider, ...] = (
    # Apple: support.apple.com/102525 (server settings: smtp.mail.me.com, 587, STARTTLS, the
    # full address as user name, an app-specific password), support.apple.com/102654
    # (app-specific passwords need two-factor authentication), support.apple.com/102198
    # (limits: 1,000 messages and 1,000 recipients a day, 500 recipients a message, 20 MB).
    Provider(
        "Apple iCloud Mail", hosts=("smtp.mail.me.com",),
        domains=("icloud.com", "me.com", "mac.com"),
        refuses=("a From other than the account's own address, its aliases or its iCloud+ "
                 "custom-domain addresses; more than 1,000 messages or 1,000 recipients a day, "
                 "500 recipients a message, 20 MB"),
        fixes=(_fix(_AUTH_REFUSED, ("password",),
                    "use an app-specific password: appleid.apple.com -> Sign-In and Security "
                    "-> App-Specific Passwords (two-factor authentication must be on), and the "
                    "Apple Account's primary address as username"),),
        recipe="conf/examples/icloud-app-password.toml"),
    # Yahoo: smtp.mail.yahoo.com 465 with TLS from the start (Thunderbird's ISPDB entry for
    # yahoo.com; Delta Chat's provider database, checked 2025-09: an app password from the
    # account security page); 587 with STARTTLS also works (third-party guides). Yahoo's
    # business-mail help (SLN17655) gives 500 messages a day over SMTP, 100 recipients a
    # message. Yahoo's own settings page was not among the stored references.
    Provider(
        "Yahoo Mail", hosts=("smtp.mail.yahoo.com",),
        domains=("yahoo.com", "ymail.com", "rocketmail.com", "myyahoo.com", "yahoo.co.uk",
                 "yahoo.fr", "yahoo.de", "yahoo.it", "yahoo.es", "yahoo.ca", "yahoo.com.au"),
        refuses=("a From other than the account's address (or a verified sending address); "
                 "more than about 500 messages a day over SMTP, 100 recipients a message"),
        fixes=(_fix(_AUTH_REFUSED, ("password",),
                    "use an app-specific password: login.yahoo.com -> Account security -> "
                    "Generate app password (the account password is refused over SMTP)"),),
        recipe="conf/examples/yahoo-app-password.toml"),
    # Microsoft personal accounts: support.microsoft.com "POP, IMAP, and SMTP settings for
    # Outlook.com" (smtp-mail.outlook.com, 587, STARTTLS) and "Modern authentication methods
    # now needed to continue syncing Outlook email in non-Microsoft email apps" (basic
    # authentication off from 2024-09-16); the refusal users report reads "535 5.7.139
    # Authentication unsuccessful, basic authentication is disabled". Limits: "Sending limits
    # in Outlook.com" (5,000 recipients a day for subscribers, lower otherwise; 500 a message;
    # 1,000 new recipients a day).
    Provider(
        "Outlook.com (Microsoft personal account)",
        hosts=("smtp-mail.outlook.com", "smtp.live.com"),
        domains=("outlook.com", "hotmail.com", "live.com", "msn.com", "passport.com",
                 "outlook.co.uk", "hotmail.co.uk", "live.co.uk", "outlook.fr", "hotmail.fr",
                 "live.fr", "outlook.de", "hotmail.de", "live.de", "outlook.it", "hotmail.it",
                 "outlook.es", "hotmail.es"),
        refuses=("passwords and app passwords since 2024-09-16 (OAuth only); a From other than "
                 "the signed-in account or its aliases; 5,000 recipients a day with a Microsoft "
                 "365 subscription and fewer without, 500 a message, 1,000 new recipients a day"),
        fixes=(_fix(_AUTH_REFUSED, ("password",),
                    "this account needs the xoauth2 recipe: Outlook.com refuses passwords "
                    "(basic authentication) since September 2024; see "
                    "conf/examples/outlook-com-xoauth2.toml"),),
        recipe="conf/examples/outlook-com-xoauth2.toml"),
)


_OUTLOOK_COM = PROVIDERS[2]


def _domain(address: str | None) -> str:
    return address.rpartition("@")[2].lower() if address and "@" in address else ""


def _host_matches(host: str | None, hosts: tuple[str, ...]) -> bool:
    host = (host or "").lower().rstrip(".")
    return any(host == h or host.endswith("." + h) for h in hosts)


def provider_of(route: RouteConfig) -> Provider | None:
    """The provider a route talks to, by its SMTP host, else by the account's address; a
    delegated Graph route that personal Microsoft accounts sign in to is Outlook.com's."""
    if route.upstream == "graph" and route.delegated:
        from relayd.auth.oauth import takes_personal_accounts

        return _OUTLOOK_COM if takes_personal_accounts(route) else None
    if route.upstream != "smtp":
        return None
    smtp = route.smtp
    for p in PROVIDERS:
        if _host_matches(smtp.host, p.hosts):
            return p
    accounts = [smtp.username, smtp.mailbox if smtp.mailbox != "sender" else None,
                *(s for s in route.senders if "*" not in s)]
    for p in PROVIDERS:
        if any(_domain(a) in p.domains for a in accounts if a):
            return p
    return None


def fix_for(route: RouteConfig, reply: object) -> str:
    """The provider's fix for this refusal on this route, or "" when the table has none."""
    provider = provider_of(route)
    if provider is None:
        return ""
    words = " ".join(str(reply).split())
    auth = route.smtp.auth if route.upstream == "smtp" else None
    for fix in provider.fixes:
        if auth in fix.auth and fix.pattern.search(words):
            return f"{provider.name}: {fix.text}"
    return ""


def explain_line(route: RouteConfig) -> str | None:
    """For `check --explain`: the provider and what it refuses; None for other routes."""
    provider = provider_of(route)
    if provider is None:
        return None
    line = f"provider: {provider.name} (recipe {provider.recipe}); it refuses {provider.refuses}"
    if provider.recipe.endswith("outlook-com-xoauth2.toml") and route.uses_password:
        line += ("; WARNING: this route logs in with a password, which Outlook.com refuses: "
                 "use the xoauth2 recipe")
    return line
