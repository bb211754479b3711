"""Text that came from a client or an upstream, made safe to show: one function for every place
relayd shows it (the daemon log, `relayd log`, its `--json`, the journal file, notices).

A Subject, a Message-ID, an address or an upstream's reply is someone else's text. Shown raw,
CR and LF forge log and journal lines, ESC sequences clear a terminal or set its title
(`ESC [2J`, `ESC ]0;`), and Unicode's bidi controls and line/paragraph separators reorder or
split what an admin reads. The policy:
- `visible(text)`: C0 controls, DEL and C1 controls become visible escapes (`\\r`, `\\n`,
  `\\t`, `\\xNN`); the bidi controls (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069)
  and U+2028/U+2029 become `\\uXXXX`; bytes that were not UTF-8 (lone surrogates from
  surrogateescape) become `\\xNN` of the byte. Everything else, printable ASCII and UTF-8
  text, is kept as it is, so a name with accents still reads as one. `limit` cuts the result
  (a client's command line in the daemon log: SHOWN_COMMAND_MAX).
- `json_line(value)`: JSON with every one of those characters as `\\uXXXX` (the standard
  library escapes C0 only; a U+2028 left raw splits the line for Python's splitlines and
  JavaScript alike), UTF-8 text kept.
The web pages escape with `html.escape` (relayd.web.pages) and are not this module's.
Rejected: a backslash is not doubled. Escapes cannot then be told from a literal `\\x1b`
typed by the client, but nothing can be forged by that, and a Windows path in a log line
stays readable.
"""

from __future__ import annotations

import json
import re
from typing import Any

SHOWN_COMMAND_MAX = 200  # characters of a client's command line shown in the daemon log

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                          "\u2066-\u2069\ud800-\udfff]")  # json.dumps escapes C0 itself
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0xA0:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def visible(text: str, limit: int | None = None) -> str:
    """`text` with its controls as visible escapes (module docstring); cut to `limit`
    characters, ending in "...", when it is longer."""
    if _UNSAFE.search(text) is not None:
        text = _UNSAFE.sub(_escape, text)
    if limit is not None and len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_line(value: Any, **kwargs: Any) -> str:
    """json.dumps with UTF-8 text kept and every control, bidi control and line separator
    as \\uXXXX: one line, whatever the strings in `value` hold."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    if _JSON_UNSAFE.search(text) is not None:
        text = _JSON_UNSAFE.sub(_json_escape, text)
    return text
