"""Sender -> route: exact beats *@domain beats *, never file order; `relayd route`."""

from __future__ import annotations

from pathlib import Path

from conftest import relayd_cli

from relayd.config import parse_config
from relayd.router import Router


def routes(*pairs: tuple[str, list[str]]) -> Router:
    data = {"routes": {name: {"senders": senders, "upstream": "outbox", "path": "/tmp/o"}
                       for name, senders in pairs}}
    return Router(parse_config(data).routes)


def test_specificity_not_file_order() -> None:
    for order in (1, -1):
        pairs = [("default", ["*"]), ("staff", ["*@business.com"]),
                 ("system", ["casemanager@business.com"])][::order]
        r = routes(*pairs)
        assert r.lookup("casemanager@business.com").name == "system"  # type: ignore[union-attr]
        assert r.lookup("alice@business.com").name == "staff"  # type: ignore[union-attr]
        assert r.lookup("x@other.org").name == "default"  # type: ignore[union-attr]


def test_case_insensitive_and_no_default() -> None:
    r = routes(("staff", ["*@Business.COM"]), ("support", ["Support@business.com"]))
    assert r.lookup("alice@BUSINESS.com").name == "staff"  # type: ignore[union-attr]
    assert r.lookup("SUPPORT@Business.com").name == "support"  # type: ignore[union-attr]
    assert r.lookup("x@other.org") is None
    assert r.lookup("") is None and r.lookup("no-at-sign") is None
    m = r.match("alice@business.com")
    assert m is not None and m.pattern == "*@business.com"


def test_route_command(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(f"""
[queue]
path = "{tmp_path}/q"
[routes.staff]
senders = ["*@business.com"]
upstream = "outbox"
path = "{tmp_path}/out"
""")
    hit = relayd_cli("route", "-c", str(cfg), "Alice@Business.com")
    assert hit.returncode == 0
    assert "route staff" in hit.stdout and "'*@business.com'" in hit.stdout
    miss = relayd_cli("route", "-c", str(cfg), "eve@elsewhere.org")
    assert miss.returncode == 1 and "no route" in miss.stdout
