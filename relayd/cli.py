"""Command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any, TextIO

from relayd import __version__, queuetext
from relayd.config import DEFAULT_CONFIG_PATH, Config, config_path, folder_problems, load_config
from relayd.errors import ConfigError, DeliveryError, QueueError, TransientDeliveryError
from relayd.escape import json_line
from relayd.logsetup import setup_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PIPE = 128 + 13  # as a shell reports a process that SIGPIPE ended (SIGPIPE is 13)
CONTROL_WAIT_S = 10.0

log = logging.getLogger("relayd")


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _print_problems(e: ConfigError, out: TextIO) -> None:
    for problem in e.problems:
        print(problem, file=out)


# -- commands ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from relayd import loop as relayd_loop
    from relayd.app import serve
    from relayd.errors import RelayError

    setup_logging(args.log_level, args.log_format)
    log_options = ["--log-level", args.log_level, "--log-format", args.log_format]
    try:
        return relayd_loop.run(serve(config_path(args.config), log_options=log_options))
    except (RelayError, OSError) as e:
        if isinstance(e, (ConfigError, QueueError)):
            raise  # main() prints these with their own exit codes
        # One line, not a traceback: a port in use, a metrics address that cannot be bound.
        logging.getLogger("relayd").error("relayd: %s", e)
        return EXIT_FAILED


def cmd_check(args: argparse.Namespace) -> int:
    # --explain explains what it can even when secrets cannot be read (the examples, read
    # outside the systemd unit that hands them over), then lists those as problems.
    config = load_config(config_path(args.config), secrets_optional=args.explain)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    problems = [*config.secret_problems, *folder_problems(config)]
    print(f"{config.source}: {'ok, ' if not problems else ''}"
          f"{len(config.routes)} route(s): "
          + ", ".join(f"{r.name} ({r.upstream})" for r in config.routes.values()))
    if args.explain:
        from relayd.explain import explain

        print("\n".join(explain(config)))
    if problems:
        sys.stdout.flush()
        _print_problems(ConfigError(problems, config.source), sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_route(args: argparse.Namespace) -> int:
    from relayd.router import Router, recipient_allowed

    config = _load(args)
    # as written in a MAIL FROM, a log or a header: <alice@business.com>
    address = args.address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    args.address = address
    match = Router(config.routes).match(args.address)
    if match is None:
        print(f"{args.address}: no route (refused at MAIL FROM with 550 5.7.1)")
        return EXIT_FAILED
    r = match.route
    print(f"{args.address}: route {r.name} (upstream {r.upstream} {r.target}) "
          f"matched by {match.pattern!r}")
    ok = True
    for rcpt in args.to or []:
        if recipient_allowed(r, rcpt):
            print(f"  to {rcpt}: allowed" + (f" by routes.{r.name}.recipients"
                                              if r.recipients else ""))
        else:
            ok = False
            print(f"  to {rcpt}: refused at RCPT TO with 550 5.7.1 (not in "
                  f"routes.{r.name}.recipients)")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_send_test(args: argparse.Namespace) -> int:
    from relayd.delivery import OutboundMessage, Status, make_upstream
    from relayd.router import Router

    setup_logging("warning")
    config = _load(args)
    route = Router(config.routes).lookup(args.sender)
    if route is None:
        print(f"no route for {args.sender}: it would be refused with 550 5.7.1")
        return EXIT_FAILED
    print(f"1. route: {route.name} (upstream {route.upstream})")
    msg = EmailMessage()
    msg["From"] = args.sender
    msg["To"] = ", ".join(args.to)
    msg["Subject"] = args.subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=config.server.hostname)
    msg.set_content(f"This is a test message from relayd on {config.server.hostname}, sent "
                    f"through the route {route.name!r} at {time.strftime('%Y-%m-%d %H:%M:%S')}.\n")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    print(f"2. message: {len(data)} bytes from <{args.sender}> to "
          + ", ".join(f"<{t}>" for t in args.to))

    async def run() -> int:
        upstream = make_upstream(route, config)
        if hasattr(upstream, "trace"):
            upstream.trace = lambda step: print(f"   {step}")
        session = upstream.session()
        try:
            print(f"3. delivering through {route.upstream} ...")
            results = await session.deliver(OutboundMessage("SENDTEST", args.sender, args.to,
                                                            data))
        except DeliveryError as e:
            kind = "temporary" if isinstance(e, TransientDeliveryError) else "permanent"
            print(f"4. failed ({kind}): {e}")
            _print_fix(route, e.reply)
            return EXIT_FAILED
        finally:
            await session.close()
            await upstream.close()
        ok = True
        for rcpt, res in results.items():
            print(f"4. <{rcpt}>: {res.status.value}: {res.reply}".rstrip())
            ok = ok and res.status is Status.DELIVERED
            if res.status is not Status.DELIVERED:
                _print_fix(route, res.reply)
        return EXIT_OK if ok else EXIT_FAILED

    return asyncio.run(run())


def _print_fix(route: Any, reply: object) -> None:
    """send-test: the provider's fix for this refusal (relayd.providers), when it has one."""
    from relayd.providers import fix_for

    fix = fix_for(route, reply)
    if fix:
        print(f"   fix: {fix}")


def cmd_queue(args: argparse.Namespace) -> int:
    from relayd.queue import Spool

    config = _load(args)
    spool = Spool(config.queue.path)
    if args.queue_cmd == "list":
        queuetext.queue_list(spool, sys.stdout, as_json=args.json, config=config)
        return EXIT_OK
    if args.queue_cmd == "show":
        try:
            entry = spool.load(args.id)
        except QueueError as e:
            print(str(e), file=sys.stderr)
            return EXIT_FAILED
        route_name = queuetext.route_of(entry, config)
        if args.json:
            print(json.dumps({**entry.summary(), "route": route_name,
                              "route_pinned": entry.route is not None}, indent=2))
        else:
            print(queuetext.show(entry, route_name))
        if args.body:
            sys.stdout.flush()
            sys.stdout.buffer.write(spool.read_data(entry))
        return EXIT_OK
    target = "all" if getattr(args, "all", False) else args.id
    if target is None:
        print("give a queue id or --all", file=sys.stderr)
        return EXIT_USAGE
    if target != "all":
        try:
            spool.load(target)
        except QueueError as e:
            print(str(e), file=sys.stderr)
            return EXIT_FAILED
    return _queue_act(spool, args.queue_cmd, target, config)


def _queue_act(spool: Any, action: str, target: str, config: Config) -> int:
    """Ask the running daemon, or act on the files when no daemon holds the queue (a removal
    is then one line here and a `deleted` journal record, as the daemon would make)."""
    if spool.daemon_running():
        path = spool.request(action, target)
        deadline = time.monotonic() + CONTROL_WAIT_S
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if path.exists():
            print(f"{action} {target}: the daemon did not take the request within "
                  f"{CONTROL_WAIT_S:.0f}s; it stays queued", file=sys.stderr)
            return EXIT_FAILED
        print(f"{action} {target}: done by the running daemon")
        return EXIT_OK
    from relayd.journal import Journal
    from relayd.queue import ID_RE

    ids = spool.ids() if target == "all" else [target]
    journal = Journal(config.journal)
    for qid in ids:
        try:
            entry = spool.load(qid)
        except QueueError as e:
            if action != "delete" or not ID_RE.match(qid):
                print(str(e), file=sys.stderr)
                continue
            entry = None  # unreadable: removed all the same, as asked
        if action == "delete":
            spool.remove(qid)
            print(f"{qid}: removed from the queue: deleted by the admin")
            if entry is not None:
                journal.record("deleted", qid, message_id=entry.message_id,
                               **{"from": entry.sender}, to=entry.pending(),
                               route=entry.route)
        else:
            assert entry is not None
            entry.next_attempt, entry.backoff = 0.0, 0  # as the daemon's retry does
            spool.save_state(entry)
    journal.close()
    print(f"{action} {target}: done ({len(ids)} message(s)); the daemon is not running")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """`relayd reload`: the config is checked here first (a bad one is refused with its
    problems, exit 2), then the running daemon is asked through control/ (every platform;
    SIGHUP does the same on POSIX)."""
    from relayd.queue import Spool

    config = _load(args)
    spool = Spool(config.queue.path)
    if not spool.daemon_running():
        print(f"relayd reload: no relayd is running on the queue {config.queue.path}",
              file=sys.stderr)
        return EXIT_FAILED
    path = spool.request("reload", "config")
    deadline = time.monotonic() + CONTROL_WAIT_S
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if path.exists():
        with contextlib.suppress(OSError):
            path.unlink()
        print(f"relayd reload: the daemon did not take the request within "
              f"{CONTROL_WAIT_S:.0f}s", file=sys.stderr)
        return EXIT_FAILED
    print(f"reload: {config.source} taken by the running daemon (its log says what changed)")
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    """`relayd service install|uninstall`: the Windows service (relayd.winservice)."""
    from relayd.platform import WINDOWS

    if not WINDOWS:
        print("relayd service: Windows only; on Linux run relayd under systemd "
              "(systemd/relayd.service) or in a container", file=sys.stderr)
        return EXIT_USAGE
    from relayd import winservice

    if args.service_cmd == "install":
        return winservice.install(config_path(args.config), args.name, args.start)
    return winservice.uninstall(args.name)


def cmd_auth(args: argparse.Namespace) -> int:
    from relayd.auth import login, registry

    config = _load(args)
    if args.auth_cmd == "login":
        return int(login.login(config, args.route, args.user, args.mode, args.port, sys.stdout,
                               sys.stdin))
    return int(registry.status(config, sys.stdout))


def cmd_log(args: argparse.Namespace) -> int:
    """`relayd log`: the delivery journal's events, oldest first, filtered."""
    import time

    from relayd import journal

    config = _load(args)
    try:
        since = journal.parse_since(args.since, time.time()) if args.since else None
    except ValueError as e:
        print(f"relayd log: {e}", file=sys.stderr)
        return EXIT_USAGE
    sender = None if args.sender is None else args.sender.strip().strip("<>").strip()
    query = journal.Query(queue_id=args.id, message_id=args.message_id, sender=sender,
                          recipient=args.to, route=args.route, since=since)
    count = 0
    for event in journal.read(config.journal.path, query):
        print(json_line(event) if args.json else journal.format_event(event))
        count += 1
    if count == 0 and not args.json:
        print(f"relayd log: no matching events in {config.journal.path}", file=sys.stderr)
    return EXIT_OK if count else EXIT_FAILED


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relayd.auth.passwords import hash_password_cli

    return int(hash_password_cli(sys.stdin, sys.stdout, sys.stderr))


# -- parser ------------------------------------------------------------------------------------


# What each command reads from the config (its --help says so; README has every key).
READS = {
    "serve": "all of them: [server] (listen, listen_tls, hostname, max_message_size, "
             "allowed_clients, tls_*, users, workers, max_sessions*, session_timeout, "
             "null_sender_route), [queue], [journal], [metrics], [auth], [routes.*]",
    "check": "all of them; --explain prints [routes.*] and [server.users] in plain words",
    "route": "[routes.*] senders and recipients",
    "send-test": "[server] hostname, [auth], the sender's [routes.*] route",
    "queue": "[queue] path",
    "auth": "[auth] path and key_file, the [routes.*] route named",
    "log": "[journal] path",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Local SMTP relay for legacy apps "
                                "that delivers through modern-auth upstreams.",
                                epilog="Every command takes -c FILE; `relayd COMMAND --help` "
                                "lists the config keys it reads.")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (_serve_check_route, _send_test, _queue, _reload_service, _auth, _log):
        add_commands(sub)
    sp = sub.add_parser("hash-password", help="print an scrypt hash for server.users")
    sp.set_defaults(func=cmd_hash_password)
    sub.add_parser("sendmail", help="sendmail-compatible submission (see relayd sendmail -h)",
                   add_help=False)
    return p


def _add(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A command, with -c and the config keys it reads in its --help."""
    sp: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text,
        epilog=f"config keys read: {READS[name]}" if name in READS else None)
    sp.add_argument("-c", "--config", metavar="FILE",
                    help=f"config file (default: $RELAYD_CONFIG, then {DEFAULT_CONFIG_PATH})")
    return sp


def _action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-action that also takes -c after its name (relayd queue list -c FILE)."""
    ap: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
    ap.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
    return ap


def _serve_check_route(sub: Any) -> None:
    sp = _add(sub, "serve", "run the daemon in the foreground")
    sp.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    sp.add_argument("--log-format", default="text", choices=["text", "json"])
    sp.set_defaults(func=cmd_serve)

    sp = _add(sub, "check", "validate the config")
    sp.add_argument("--explain", action="store_true",
                    help="then say, for each route in plain words, who may send through it, to "
                    "whom, with which account, and what the upstream is asked to do")
    sp.set_defaults(func=cmd_check)

    sp = _add(sub, "route", "print the route an envelope sender maps to (routes.*.senders); "
              "with --to, whether its routes.*.recipients allow that recipient")
    sp.add_argument("address")
    sp.add_argument("--to", action="append", metavar="RCPT")
    sp.set_defaults(func=cmd_route)


def _send_test(sub: Any) -> None:
    sp = _add(sub, "send-test", "deliver a test message through the sender's route, now")
    sp.add_argument("--from", dest="sender", required=True, metavar="ADDR")
    sp.add_argument("--to", required=True, action="append", metavar="ADDR")
    sp.add_argument("--subject", default="relayd test message")
    sp.set_defaults(func=cmd_send_test)


def _queue(sub: Any) -> None:
    sp = _add(sub, "queue", "inspect and act on the queue (works while the daemon runs)")
    qsub = sp.add_subparsers(dest="queue_cmd", required=True, metavar="ACTION")
    _action(qsub, "list", "one line per queued message").add_argument("--json",
                                                                      action="store_true")
    q = _action(qsub, "show", "envelope, state and (--body) content of one message")
    q.add_argument("id")
    q.add_argument("--body", action="store_true")
    q.add_argument("--json", action="store_true", help="the envelope and state as JSON")
    q = _action(qsub, "retry", "try a message (or --all) again now")
    q.add_argument("id", nargs="?")
    q.add_argument("--all", action="store_true")
    _action(qsub, "delete", "remove a message from the queue without delivering it"
            ).add_argument("id")
    sp.set_defaults(func=cmd_queue)


def _reload_service(sub: Any) -> None:
    sp = _add(sub, "reload", "ask the running daemon to re-read its config (as SIGHUP; every "
              "platform); the config is checked first")
    sp.set_defaults(func=cmd_reload)

    sp = _add(sub, "service", "Windows: register or remove relayd as a Windows service "
              "(elsewhere: use systemd)")
    ssub = sp.add_subparsers(dest="service_cmd", required=True, metavar="ACTION")
    s = _action(ssub, "install", "install the service (it runs `relayd serve -c FILE`)")
    s.add_argument("--name", default="relayd")
    s.add_argument("--start", choices=["auto", "manual"], default="auto",
                   help="auto: delayed automatic start (default); manual: started by the admin")
    _action(ssub, "uninstall", "stop and remove the service").add_argument(
        "--name", default="relayd")
    sp.set_defaults(func=cmd_service)


def _auth(sub: Any) -> None:
    sp = _add(sub, "auth", "OAuth sign-in for delegated routes")
    asub = sp.add_subparsers(dest="auth_cmd", required=True, metavar="ACTION")
    a = _action(asub, "login", "delegated sign-in for a route (flow = \"device\", or Google "
                "without refresh_token_file); the token is stored where the daemon reads it")
    a.add_argument("route")
    a.add_argument("--user", metavar="ADDR", help="the account that signs in (required "
                   "except with --device)")
    how = a.add_mutually_exclusive_group()
    how.add_argument("--browser", dest="mode", action="store_const", const="browser",
                     help="(default) authorization code with PKCE: print the sign-in URL, open a "
                     "browser where there is one, wait for the redirect to http://localhost:PORT")
    how.add_argument("--paste", dest="mode", action="store_const", const="paste",
                     help="print the URL; sign in on any machine and paste back the address the "
                     "browser ended on")
    how.add_argument("--device", dest="mode", action="store_const", const="device",
                     help="device code (blocked by default in many Microsoft tenants)")
    a.add_argument("--port", type=int, default=0, metavar="N",
                   help="--browser: the loopback port for the redirect (default: a free one)")
    a.set_defaults(mode="browser")
    _action(asub, "status", "each token's account, expiry, last refresh, whether it needs a "
            "new sign-in (and the command), and the app credential's expiry")
    sp.set_defaults(func=cmd_auth)


def _log(sub: Any) -> None:
    sp = _add(sub, "log", "the delivery journal: every event of every message, with the "
              "upstream's answer (reads [journal] path)")
    sp.add_argument("--id", metavar="QID", help="a queue id (also finds its bounce)")
    sp.add_argument("--message-id", metavar="MID")
    sp.add_argument("--from", dest="sender", metavar="ADDR", help="the envelope sender "
                    '("" or "<>": null-sender mail, such as bounces)')
    sp.add_argument("--to", metavar="ADDR", help="any recipient, case-insensitive")
    sp.add_argument("--since", metavar="DUR", help="2h, 3d or YYYY-MM-DD")
    sp.add_argument("--route", metavar="NAME")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.set_defaults(func=cmd_log)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A reader that goes away (`relayd log | head`, `less` quit early) ends
    it quietly, once, here: exit with the status a shell gives a process that SIGPIPE ended
    (141), no traceback, nothing on stderr; what is still buffered goes to /dev/null, so
    the interpreter's last flush does not complain either."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if argv is None and os.path.basename(sys.argv[0]) == "sendmail":
        # installed as /usr/sbin/sendmail (a symlink to relayd): behave as sendmail
        args_list = ["sendmail", *args_list]
    if args_list[:1] == ["_worker"]:
        # a listener process started by `relayd serve` (server.workers > 1); not for people
        from relayd.workers import worker_main

        return worker_main(args_list[1:])
    if args_list[:1] == ["_service"]:
        # the Windows service process (relayd service install registers it); not for people
        from relayd.winservice import service_main

        return service_main(args_list[1:])
    if args_list[:1] == ["sendmail"]:
        # sendmail's own option syntax (-oi, -f addr, -t) does not fit argparse.
        from relayd.sendmail import main as sendmail_main

        return int(sendmail_main(args_list[1:], sys.stdin.buffer, None))
    args = build_parser().parse_args(args_list)
    try:
        return int(args.func(args))
    except ConfigError as e:
        _print_problems(e, sys.stderr)
        return EXIT_USAGE
    except QueueError as e:
        print(f"relayd: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
