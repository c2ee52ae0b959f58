"""Parse alias tables (aliases(5)), ``:include:`` lists and ``.forward`` files.

Responsibility: turn the text of ``/etc/aliases``, an include file or a
``.forward`` file into :class:`AliasTarget` values.  This module only parses;
it never expands, resolves, delivers, or checks ownership/permissions.  The
only file I/O is :func:`load_aliases`, which reads a file and calls
:func:`parse_aliases`.

Contract:

* :func:`parse_aliases` follows Postfix ``postalias``/``readlline``: a
  logical line is ``name: value, value, ...``; a physical line that starts
  with whitespace continues the preceding logical line; empty lines,
  whitespace-only lines and lines whose first non-blank character is ``#``
  are ignored (they do not end a logical line).  Names are case-insensitive
  and stored lowercased; a name may be double-quoted (``"a b": x``).  An
  unquoted name must not contain whitespace, ``,``, ``@`` or ``%`` (Postfix:
  "name must be local").  The result is an :class:`AliasTable` (a ``dict``
  subclass) whose ``warnings`` attribute lists non-fatal findings as
  ``"file:line: text"``: a duplicate name (the *last* definition wins), and
  continuation text with no preceding entry (ignored, as Postfix does).
* :func:`parse_targets` parses one right-hand side.  Values are separated by
  commas outside double quotes and outside ``<...>``.  A value that is
  entirely double-quoted is unquoted first (``\\"`` and ``\\\\`` escapes), so
  ``"|/usr/bin/foo -x, y"`` is one command.  Then:

  - ``|cmd ...``      -> ``AliasTarget("command", "cmd ...")`` (text after
    the ``|``, whitespace-stripped; split it with
    :func:`mailserver.delivery.pipe.split_command`);
  - ``/path``         -> ``AliasTarget("file", "/path")``;
  - ``~/path``        -> ``AliasTarget("file", "~/path")``: relative to the
    recipient's home directory; the *caller* must expand it and refuse it
    where there is no user context (Postfix: "unknown home directory");
  - ``:include:/path`` (prefix case-insensitive) ->
    ``AliasTarget("include", "/path")``;
  - anything else     -> ``AliasTarget("address", text)``: the address as
    written (external form, quotes kept), except that ``Name <addr>`` yields
    ``addr``.  ``\\user`` stays ``"\\user"`` (deliver to the local mailbox,
    do not alias-expand again).

  Empty values (``a,,b``, a trailing comma) are skipped.
* :func:`parse_forward` parses ``.forward`` and ``:include:`` file text: each
  physical line is a right-hand side; no continuation lines; blank lines and
  lines whose first non-blank character is ``#`` are comments.

Failure: malformed input raises :class:`AliasSyntaxError` (a ``ValueError``)
with ``filename``/``lineno`` and the message ``"file:line: text"``: a line
without a colon, an empty or non-local name, an empty right-hand side, an
unterminated double quote, or an empty command/include path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "AliasTarget",
    "AliasSyntaxError",
    "AliasTable",
    "parse_aliases",
    "parse_targets",
    "parse_forward",
    "load_aliases",
]

_INCLUDE = ":include:"


@dataclass(frozen=True, slots=True)
class AliasTarget:
    """One destination of an alias, include list or .forward entry."""

    kind: str  # "address" | "command" | "file" | "include"
    value: str  # address text; command without '|'; file path; include path


class AliasSyntaxError(ValueError):
    """Malformed alias/include/.forward text; ``str()`` is ``file:line: text``."""

    def __init__(self, filename: str, lineno: int, text: str) -> None:
        super().__init__(f"{filename}:{lineno}: {text}")
        self.filename = filename
        self.lineno = lineno
        self.text = text


class AliasTable(dict[str, list[AliasTarget]]):
    """Result of :func:`parse_aliases`: ``name -> targets`` plus ``warnings``."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []


class _TargetError(Exception):
    """Internal: a right-hand side problem without file/line context."""


# --------------------------------------------------------------------------
# Right-hand sides
# --------------------------------------------------------------------------


def _split_values(value: str) -> list[str]:
    """Split at commas that are outside double quotes and outside <...>."""
    items: list[str] = []
    cur: list[str] = []
    in_quote = False
    angle = 0
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quote:
            cur.append(ch)
            if ch == "\\" and i + 1 < n:
                cur.append(value[i + 1])
                i += 2
                continue
            if ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
            cur.append(ch)
        elif ch == "<":
            angle += 1
            cur.append(ch)
        elif ch == ">" and angle > 0:
            angle -= 1
            cur.append(ch)
        elif ch == "," and angle == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if in_quote:
        raise _TargetError(f"unterminated double quote in: {value.strip()!r}")
    items.append("".join(cur))
    return [item.strip() for item in items]


def _unquote_whole(item: str) -> str | None:
    """If ``item`` is one double-quoted string, return its unescaped content."""
    if len(item) < 2 or item[0] != '"' or item[-1] != '"':
        return None
    out: list[str] = []
    i = 1
    end = len(item) - 1
    while i < end:
        ch = item[i]
        if ch == "\\" and i + 1 < end:
            out.append(item[i + 1])
            i += 2
            continue
        if ch == '"':
            return None  # a quote ends before the last character: not whole
        out.append(ch)
        i += 1
    return "".join(out)


_ROUTE_ADDR = re.compile(r"<([^<>]*)>\s*$")


def _classify(item: str) -> AliasTarget | None:
    unquoted = _unquote_whole(item)
    text = unquoted if unquoted is not None else item
    text = text.strip()
    if not text:
        return None
    if text.startswith("|"):
        command = text[1:].strip()
        if not command:
            raise _TargetError("empty command after '|'")
        return AliasTarget("command", command)
    if text.startswith("/") or text.startswith("~/"):
        return AliasTarget("file", text)
    if text[: len(_INCLUDE)].lower() == _INCLUDE:
        path = text[len(_INCLUDE) :].strip()
        if not path:
            raise _TargetError("empty :include: path")
        return AliasTarget("include", path)
    # An address: keep it as written (external form).
    if unquoted is None:
        m = _ROUTE_ADDR.search(item)
        if m:
            inner = m.group(1).strip()
            return AliasTarget("address", inner) if inner else None
    return AliasTarget("address", item)


def _parse_targets(value: str) -> list[AliasTarget]:
    targets: list[AliasTarget] = []
    for item in _split_values(value):
        target = _classify(item)
        if target is not None:
            targets.append(target)
    return targets


def parse_targets(value: str) -> list[AliasTarget]:
    """Parse one alias right-hand side into targets (see module docstring).

    Raises :class:`AliasSyntaxError` (filename ``<targets>``, line 1) on an
    unterminated quote or an empty command/include path.
    """
    try:
        return _parse_targets(value)
    except _TargetError as exc:
        raise AliasSyntaxError("<targets>", 1, str(exc)) from None


# --------------------------------------------------------------------------
# Alias tables
# --------------------------------------------------------------------------


def _logical_lines(text: str, filename: str, warnings: list[str]) -> list[tuple[int, str]]:
    """Postfix readlline(): join continuation lines, drop comments/blanks."""
    result: list[tuple[int, str]] = []
    cur: list[str] | None = None
    cur_line = 0
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if cur is None:
                warnings.append(
                    f"{filename}:{lineno}: logical line must not start with "
                    f"whitespace: {stripped[:30]!r}; ignored"
                )
                continue
            cur.append(line)
            continue
        if cur is not None:
            result.append((cur_line, "".join(cur)))
        cur = [line]
        cur_line = lineno
    if cur is not None:
        result.append((cur_line, "".join(cur)))
    return result


def _split_name(line: str, filename: str, lineno: int) -> tuple[str, str]:
    """Return ``(lowercased name, right-hand side)`` of a logical line."""
    if line.startswith('"'):
        out: list[str] = []
        i = 1
        while i < len(line):
            ch = line[i]
            if ch == "\\" and i + 1 < len(line):
                out.append(line[i + 1])
                i += 2
                continue
            if ch == '"':
                break
            out.append(ch)
            i += 1
        else:
            raise AliasSyntaxError(filename, lineno, "unterminated quoted name")
        rest = line[i + 1 :].lstrip()
        if not rest.startswith(":"):
            raise AliasSyntaxError(filename, lineno, "need name:value pair")
        name = "".join(out)
        value = rest[1:]
        quoted = True
    else:
        colon = line.find(":")
        if colon < 0:
            raise AliasSyntaxError(filename, lineno, "need name:value pair")
        name = line[:colon].strip()
        value = line[colon + 1 :]
        quoted = False
        if any(c.isspace() or c == "," for c in name):
            raise AliasSyntaxError(filename, lineno, "need name:value pair")
    if not name.strip():
        raise AliasSyntaxError(filename, lineno, "empty alias name")
    if not quoted and ("@" in name or "%" in name):
        raise AliasSyntaxError(filename, lineno, f"name must be local: {name!r}")
    return name.lower(), value


def parse_aliases(text: str, filename: str = "<aliases>") -> AliasTable:
    """Parse aliases(5) text into ``{lowercased name: [AliasTarget, ...]}``.

    Returns an :class:`AliasTable`; non-fatal problems are in its
    ``warnings`` list.  Raises :class:`AliasSyntaxError` on a malformed entry.
    """
    table = AliasTable()
    first_seen: dict[str, int] = {}
    for lineno, line in _logical_lines(text, filename, table.warnings):
        name, value = _split_name(line, filename, lineno)
        try:
            targets = _parse_targets(value)
        except _TargetError as exc:
            raise AliasSyntaxError(filename, lineno, str(exc)) from None
        if not targets:
            raise AliasSyntaxError(filename, lineno, f"empty right-hand side for {name!r}")
        if name in table:
            table.warnings.append(
                f"{filename}:{lineno}: duplicate entry for {name!r} "
                f"(first at line {first_seen[name]}); the last one wins"
            )
        else:
            first_seen[name] = lineno
        table[name] = targets
    return table


def parse_forward(text: str, filename: str = "<forward>") -> list[AliasTarget]:
    """Parse ``.forward`` or ``:include:`` file text into targets, in order.

    Raises :class:`AliasSyntaxError` with the physical line number.
    """
    targets: list[AliasTarget] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            targets.extend(_parse_targets(stripped))
        except _TargetError as exc:
            raise AliasSyntaxError(filename, lineno, str(exc)) from None
    return targets


def load_aliases(path: str) -> AliasTable:
    """Read ``path`` (UTF-8, undecodable bytes kept as surrogates) and parse it.

    ``OSError`` from reading propagates unchanged.
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return parse_aliases(fh.read(), filename=path)
