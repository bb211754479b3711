"""`relayd sendmail`: the sendmail command line legacy tools and cron use, submitting to relayd.

Reads one message on stdin, completes its headers (Date, Message-ID, From), and submits it by
SMTP to relayd's first listener. Exit codes follow sysexits(3): EX_TEMPFAIL (75) whenever relayd
cannot take the message now, so that callers which retry, retry.
"""

from __future__ import annotations

import re
import smtplib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parseaddr
from typing import BinaryIO

from relayd.config import Address, ServerConfig, config_path, load_server_config
from relayd.errors import ConfigError
from relayd.platform import proc

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

SMTP_TIMEOUT_S = 120.0      # relayd answers DATA only after an fsync; allow for a slow disk
PROG = "relayd sendmail"

# Options that take a value, which sendmail accepts either attached (-fADDR) or next (-f ADDR).
_VALUE_OPTIONS = frozenset("fFrBNRLXOCVh")
# Flags without a value that mean nothing here (verbose, initial submission, no aliasing, ...).
_IGNORED_FLAGS = frozenset("vUGnme")
_HEADER_NAME_RE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")
_EOL_RE = re.compile(rb"\r\n|\r|\n")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ADDRESS_RE = re.compile(r"[\x00-\x20\x7f<>()\[\],;\"\\]")


USAGE = f"""usage: {PROG} [-t] [-i] [-f ADDR] [-F NAME] [-C FILE] [--] [RCPT ...]

Read one message on stdin and hand it to relayd's first listener (server.listen), as
sendmail does for cron, scripts and legacy tools.

  -t        also send to the To, Cc and Bcc addresses of the message (Bcc is removed)
  -i, -oi   a line with a single dot does not end the message (read to end of input)
  -f ADDR   envelope sender (also -r); default: the From header, else USER@server.hostname
  -F NAME   full name for a From header relayd adds
  -C FILE   relayd's config file (default: $RELAYD_CONFIG, then /etc/relayd/relayd.toml)
  -h, --help  this help

Accepted and ignored: -oX..., -v, -U, -G, -n, -m, -e, -bm, -B, -N, -R, -L, -X, -O, -V, -hN.
Exit codes (sysexits): 0 taken; 64 bad usage; 65 bad message; 75 relayd cannot take it now
(try again later); 78 bad config. More: docs/sendmail.md.
"""


class _Help(Exception):
    """-h alone or --help: print USAGE, exit 0."""


class _Exit(Exception):
    """Stop with an exit code and a one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Options:
    extract_recipients: bool = False          # -t
    sender: str | None = None                 # -f / -r
    full_name: str | None = None              # -F
    ignore_dots: bool = False                 # -i / -oi
    config: str | None = None                 # -C
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """The sendmail options relayd understands; the common others are accepted and ignored."""
    opts = Options()
    i = 0
    while i < len(argv):  # bounded: every pass consumes at least one argument
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.recipients.extend(argv[i:])
            break
        if arg == "--help" or (arg == "-h" and i >= len(argv)):
            raise _Help()  # -h N (a hop count, which sendmail takes) is still ignored
        if not arg.startswith("-") or arg == "-":
            opts.recipients.extend(argv[i - 1:])
            break
        letter, rest = arg[1], arg[2:]
        if letter in _VALUE_OPTIONS:
            if not rest:
                if i >= len(argv):
                    raise _Exit(EX_USAGE, f"option -{letter} needs a value")
                rest = argv[i]
                i += 1
            if letter in "fr":
                opts.sender = rest
            elif letter == "F":
                opts.full_name = rest
            elif letter == "C":
                opts.config = rest
        elif letter == "o":
            # -oi: dots do not end input; -oem, -odb, -oQ... are delivery tuning: ignored.
            if not rest and i < len(argv):
                rest = argv[i]
                i += 1
            if rest == "i":
                opts.ignore_dots = True
        elif letter == "b":
            if rest != "m":
                raise _Exit(EX_USAGE, f"mode -b{rest} is not supported (only -bm, the default)")
        elif letter == "q":
            raise _Exit(EX_USAGE, "-q is not supported: relayd runs its own queue "
                        "(see `relayd queue`)")
        elif all(c == "t" or c == "i" or c in _IGNORED_FLAGS for c in arg[1:]):
            opts.extract_recipients |= "t" in arg
            opts.ignore_dots |= "i" in arg
        else:
            raise _Exit(EX_USAGE, f"unknown option {arg}")
    return opts


def _submit_address(server: ServerConfig) -> Address:
    if not server.listen:
        raise _Exit(EX_CONFIG, "server.listen is empty: sendmail submits to the plain listener")
    addr = server.listen[0]
    if addr.port == 0:
        raise _Exit(EX_CONFIG, f"server.listen[0]: {addr} has no fixed port to submit to")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
    return Address(host, addr.port)


def read_message(stdin: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """Read the message, stopping at EOF (or a lone '.' line unless ignore_dots); CRLF ends."""
    if ignore_dots:
        data = stdin.read(limit + 1)
    else:
        chunks: list[bytes] = []
        total = 0
        while total <= limit:  # bounded by the size limit and by EOF
            line = stdin.readline(limit + 1 - total)
            if not line or line.rstrip(b"\r\n") == b".":
                break
            chunks.append(line)
            total += len(line)
        data = b"".join(chunks)
    if len(data) > limit:
        raise _Exit(EX_DATAERR, f"message larger than server.max_message_size ({limit} bytes)")
    data = _EOL_RE.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


@dataclass
class _Message:
    fields: list[list[bytes]]    # each header field: its first line and continuation lines
    body: bytes

    def names(self) -> set[str]:
        return {_field_name(f) for f in self.fields}

    def values(self, name: str) -> list[str]:
        return [_field_value(f) for f in self.fields if _field_name(f) == name]

    def remove(self, *names: str) -> None:
        self.fields = [f for f in self.fields if _field_name(f) not in names]

    def add(self, name: str, value: str) -> None:
        self.fields.append([f"{name}: {value}".encode()])

    def to_bytes(self) -> bytes:
        head = b"".join(line + b"\r\n" for f in self.fields for line in f)
        return head + b"\r\n" + self.body


def _field_name(lines: list[bytes]) -> str:
    return lines[0].split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _field_value(lines: list[bytes]) -> str:
    raw = b" ".join([lines[0].split(b":", 1)[1], *lines[1:]])
    return " ".join(raw.decode("utf-8", "replace").split())


def split_message(data: bytes) -> _Message:
    """Header fields and body. Headers end at the first blank line or the first line that is
    not a header (the body then starts there). A leading mbox "From " line is dropped."""
    lines = data.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    start = 1 if lines and lines[0].startswith(b"From ") else 0
    fields: list[list[bytes]] = []
    i = start
    while i < len(lines):  # bounded by the number of lines
        line = lines[i]
        if _HEADER_NAME_RE.match(line):
            fields.append([line])
        elif line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            break
        i += 1
    if i < len(lines) and lines[i] == b"":
        i += 1
    rest = lines[i:]
    body = b"".join(line + b"\r\n" for line in rest)
    return _Message(fields, body)


def _login_name() -> str:
    return proc.user_name()


def _check_address(addr: str, what: str) -> str:
    if _BAD_ADDRESS_RE.search(addr) or addr.count("@") > 1:
        raise _Exit(EX_DATAERR if what == "header" else EX_USAGE,
                    f"invalid address {addr!r}")
    return addr


def _qualify(addr: str, domain: str) -> str:
    return addr if "@" in addr else f"{addr}@{domain}"


def _parse_addresses(values: Sequence[str], domain: str, what: str) -> list[str]:
    found = []
    for value in values:
        if _CONTROL_RE.search(value):
            raise _Exit(EX_DATAERR if what == "header" else EX_USAGE,
                        f"invalid address {value!r}: control characters")
    for _name, addr in getaddresses(list(values)):
        if addr:
            found.append(_qualify(_check_address(addr, what), domain))
    return found


def _envelope_sender(opts: Options, msg: _Message, domain: str) -> str:
    if opts.sender is not None:
        text = opts.sender.strip()
        if text in ("", "<>"):
            return ""
        return _qualify(_check_address(parseaddr(text)[1] or text, "argument"), domain)
    for value in msg.values("from"):
        addr = parseaddr(value)[1]
        if addr:
            return _qualify(_check_address(addr, "header"), domain)
    return f"{_login_name()}@{domain}"


def _reply_text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


def _refused(code: int, reply: bytes | str, what: str, where: Address) -> _Exit:
    text = f"{what} refused by relayd at {where}: {code} {_reply_text(reply)}"
    if 400 <= code < 500:
        return _Exit(EX_TEMPFAIL, text + " (try again later)")
    if 500 <= code < 600:
        return _Exit(EX_NOUSER if what.startswith("sender") else EX_UNAVAILABLE, text)
    return _Exit(EX_TEMPFAIL, f"unexpected reply from relayd at {where}: {code} "
                 f"{_reply_text(reply)}")


def submit(where: Address, sender: str, recipients: Sequence[str], data: bytes) -> None:
    """One SMTP transaction: all recipients are accepted, or nothing is sent."""
    unreachable = f"relayd at {where} is not reachable"
    try:
        with smtplib.SMTP(where.host, where.port, local_hostname="localhost",
                          timeout=SMTP_TIMEOUT_S) as smtp:
            code, reply = smtp.ehlo()
            if not 200 <= code < 300:
                code, reply = smtp.helo()
                if not 200 <= code < 300:
                    raise _refused(code, reply, "greeting", where)
            options = []
            if smtp.has_extn("size"):
                options.append(f"SIZE={len(data)}")
            if any(b > 0x7F for b in data) and smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if not all(a.isascii() for a in (sender, *recipients)):
                if not smtp.has_extn("smtputf8"):
                    raise _Exit(EX_DATAERR, "non-ASCII address, and relayd does not offer "
                                "SMTPUTF8")
                options.append("SMTPUTF8")
            code, reply = smtp.mail(sender, options)
            if code != 250:
                raise _refused(code, reply, f"sender <{sender}>", where)
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    smtp.rset()
                    raise _refused(code, reply, f"recipient <{rcpt}>", where)
            try:
                code, reply = smtp.data(data)
            except smtplib.SMTPDataError as e:
                raise _refused(e.smtp_code, e.smtp_error, "message", where) from None
            if code != 250:
                raise _refused(code, reply, "message", where)
    except smtplib.SMTPConnectError as e:
        raise _refused(e.smtp_code, e.smtp_error, "connection", where) from None
    except smtplib.SMTPServerDisconnected:
        raise _Exit(EX_TEMPFAIL, f"relayd at {where} closed the connection; "
                    "try again later") from None
    except smtplib.SMTPException as e:
        raise _Exit(EX_TEMPFAIL, f"relayd at {where}: {e}") from None
    except TimeoutError:
        raise _Exit(EX_TEMPFAIL, f"relayd at {where} did not answer in time") from None
    except OSError as e:
        raise _Exit(EX_TEMPFAIL, f"{unreachable} ({e.strerror or e}); "
                    "is relayd running?") from None


def _run(argv: Sequence[str], stdin: BinaryIO, config_file: str | None) -> None:
    opts = parse_args(argv)
    path = config_path(opts.config or config_file)
    try:
        server = load_server_config(path)
    except ConfigError as e:
        raise _Exit(EX_CONFIG, f"bad config: {'; '.join(e.problems)}") from None
    where = _submit_address(server)
    domain = server.hostname
    data = read_message(stdin, opts.ignore_dots, server.max_message_size)
    msg = split_message(data)

    recipients = _parse_addresses(opts.recipients, domain, "argument")
    if opts.extract_recipients:
        recipients += _parse_addresses(msg.values("to") + msg.values("cc") + msg.values("bcc"),
                                       domain, "header")
    unique: dict[str, str] = {}
    for rcpt in recipients:
        unique.setdefault(rcpt.lower(), rcpt)
    recipients = list(unique.values())
    if not recipients:
        if opts.extract_recipients:
            raise _Exit(EX_DATAERR, "no recipient addresses found in the message headers")
        raise _Exit(EX_USAGE, "no recipients: give them as arguments, or use -t")
    sender = _envelope_sender(opts, msg, domain)

    # Bcc must not reach the recipients; the envelope already carries those addresses.
    msg.remove("bcc", "resent-bcc")
    names = msg.names()
    if "from" not in names:
        from_addr = sender or f"{_login_name()}@{domain}"
        msg.add("From", formataddr((opts.full_name, from_addr)) if opts.full_name
                else from_addr)
    if "date" not in names:
        msg.add("Date", formatdate(localtime=True))
    if "message-id" not in names:
        msg.add("Message-ID", make_msgid(domain=domain))
    submit(where, sender, recipients, msg.to_bytes())


def main(argv: list[str], stdin: BinaryIO, config_path: str | None) -> int:
    """Run `relayd sendmail ARGV`; print at most one line to stderr; return a sysexits code."""
    try:
        _run(argv, stdin, config_path)
    except _Help:
        sys.stdout.write(USAGE)
        return EX_OK
    except _Exit as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.code
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], sys.stdin.buffer, None))
