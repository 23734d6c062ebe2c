"""Limits on what arrives from outside, decided once at the edge (issue 9): JSON nesting depth and NUL.

**Depth.** The eth/py_ecc stack raises ``sys.getrecursionlimit()`` to 100 000 when imported, so a JSON
parser's own depth guard (``Py_EnterRecursiveCall``) would fire only after the C stack is gone: 30 000
``[`` segfault the process. ``server/__init__.py`` puts the limit back; on top of that every JSON from
outside (HTTP bodies, Socket.IO packets, JSON-RPC answers) is scanned here, on the bytes and before any
parser sees them, and refused past ``MAX_DEPTH`` levels. The scan costs two ``bytes.count`` calls for a
body with at most ``MAX_DEPTH`` brackets (nearly every one); otherwise strings are cut out and the
innermost bracket pairs removed level by level, each step a C-speed pass over what is left.

**NUL.** PostgreSQL cannot store U+0000 in text or jsonb (SQLite can), so a NUL reaching a query is a
500 on one engine and a stored value on the other. Decoded values are checked with :func:`nul_path`
(cheap: a JSON body can only carry a NUL as the escape ``\\u0000``, looked for first) and refused with
422 ``invalid_request`` naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from domain.errors import InvalidRequest

MAX_DEPTH = 64
"""Arrays and objects nested deeper than this are refused (OpenAI tool schemas stay far below)."""

# Bracket bytes only, both kinds as one: for depth, "{" is "[" (a mismatched pair is not JSON, and a parser
# stops at the mismatch). Everything else is deleted.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NUL_ESCAPE = b"\\u0000"


class TooDeep(ValueError):
    """JSON nested past ``MAX_DEPTH`` (a ``ValueError``, which python-engineio/socketio treat as a bad packet)."""


class BodyTooDeep(InvalidRequest):
    """An HTTP body nested past ``MAX_DEPTH``: refused unparsed, a 400 like any JSON that does not parse."""

    status = 400

    def __init__(self) -> None:
        super().__init__(f"the body nests arrays/objects deeper than {MAX_DEPTH} levels", {"max_depth": MAX_DEPTH})


def depth_exceeds(raw: bytes | bytearray | memoryview | str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests arrays/objects deeper than ``limit`` levels, or has so many
    unclosed brackets that a parser would go that deep before failing. Brackets in strings do not count."""
    if isinstance(raw, str):
        if raw.count("[") + raw.count("{") <= limit:
            return False
        data = raw.encode("utf-8", "surrogatepass")
    else:
        data = bytes(raw)
        if data.count(b"[") + data.count(b"{") <= limit:
            return False
    # Cut strings out: escaped backslashes and quotes first (left to right, as a parser reads them); then
    # every quote delimits a string, and the even pieces of a split on '"' are what lies outside strings.
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(data.split(b'"')[::2]).translate(_BRACKETS, _NOT_BRACKETS)
    # Each pass removes every innermost pair: exactly one level (replace() does not rescan what it
    # joined). After ``removed`` passes every bracket left has ``removed`` levels below it, so a run of
    # ``limit + 1 - removed`` opening brackets proves the depth. Well-nested JSON of depth <= limit is
    # gone after ``limit`` passes; a pass that removes nothing leaves only closing brackets first and
    # opening ones after (not JSON), and a parser gets at most ``removed`` + the openers left deep.
    for removed in range(limit + 1):
        if brackets.count(b"[") + removed <= limit:
            return False
        if b"[" * (limit + 1 - removed) in brackets:
            return True
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False  # only "]]][[[" is left: its openers were counted above
        brackets = shorter
    return True


def decode_json(raw: bytes | str) -> Any:
    """``msgspec.json.decode`` behind the depth scan: too deep is a ``msgspec.DecodeError`` like any JSON that
    does not parse (for decoders whose callers already handle that: provider answers, tool arguments)."""
    if depth_exceeds(raw):
        raise msgspec.DecodeError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return msgspec.json.decode(raw)


def check_depth(raw: bytes | bytearray | memoryview | str, limit: int = MAX_DEPTH) -> None:
    if depth_exceeds(raw, limit):
        raise TooDeep(f"JSON nested deeper than {limit} levels")


def may_hold_nul(raw: bytes | str) -> bool:
    """False when the JSON text ``raw`` certainly decodes to no string (or key) containing U+0000."""
    if isinstance(raw, str):
        return "\\u0000" in raw or "\x00" in raw
    return _NUL_ESCAPE in raw or b"\x00" in raw


def nul_path(value: Any, skip: frozenset[str] = frozenset()) -> str | None:
    """The path (``name``, ``metadata.k``, ``messages[0].role``) of the first string or key holding a NUL
    in a decoded JSON value, or None. Top-level keys in ``skip`` are not looked into. Iterative: the
    value's depth is already bounded, but no recursion is needed."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path or "$"
        elif isinstance(item, dict):
            for key, sub in item.items():
                key = str(key)
                name = f"{path}.{key}" if path else key
                if "\x00" in key:
                    return name
                if not path and key in skip:
                    continue
                stack.append((name, sub))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", sub) for i, sub in enumerate(item))
    return None


def nul_message(field: str) -> str:
    return f"{field} must not contain a NUL character (U+0000)"


def refuse_nul(value: Any, *, key: str = "field", skip: frozenset[str] = frozenset()) -> None:
    """Raise 422 ``invalid_request`` naming the first field of ``value`` with a NUL (details ``{key: path}``)."""
    path = nul_path(value, skip)
    if path is not None:
        raise InvalidRequest(nul_message(path), {key: path})


_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")  # \u0000 not itself escaped (\\u0000 is text)


def storable_json(text: str) -> str:
    """JSON text as PostgreSQL's jsonb takes it: U+0000 in a string becomes U+FFFD. For what is stored but
    may carry a NUL: gateway message content and what comes back from providers (storage/db.py)."""
    if "\\u0000" not in text:
        return text
    return _ESCAPED_NUL.sub(r"\1\\ufffd", text)


def without_nul(value: Any) -> Any:
    """``value`` with U+0000 in every string (and key) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value


class SocketJson:
    """The ``json`` module python-socketio and python-engineio use for packets (``AsyncServer(json=...)``):
    the standard library's, with the depth scan in front of ``loads``."""

    @staticmethod
    def loads(s: str | bytes, **kwargs: Any) -> Any:
        check_depth(s)
        return json.loads(s, **kwargs)

    dumps = staticmethod(json.dumps)
