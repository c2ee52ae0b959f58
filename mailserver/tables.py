"""Lookup tables (Postfix: dict_*): ``type:name`` behind one interface.

Every place Postfix takes a table (alias_maps, transport_maps,
virtual_*_maps, access maps, ...) takes a list of ``type:name`` specs here.
Supported types:

* ``static:value`` — every key maps to ``value``.
* ``inline:{ key=value, key2=value2 }`` — a small table written in place.
* ``texthash:/path`` and ``hash:/path`` — the postmap(1) source format
  (``key value`` per line, ``#`` comments, lines starting with whitespace
  continue the previous one), read into memory; with ``fmt="alias"`` the
  aliases(5) format (``name: value``) as postalias(1) reads it.
* ``unix:passwd.byname`` — the system password database (local users).

Keys are matched case-insensitively (lower-cased), as Postfix's
``hash`` tables with the default ``fold`` flag.

Failures: an unknown type or a malformed spec raises :class:`TableError`
(a configuration error).  A missing file is an empty table plus a warning,
as Postfix's ``hash:/etc/aliases`` without the file.  File tables are read
when opened; :meth:`Table.reload_if_changed` re-reads a file whose mtime
changed.
"""

from __future__ import annotations

import os
import pwd
from typing import Callable, Iterable, Protocol


class TableError(Exception):
    pass


class Table(Protocol):
    spec: str

    def lookup(self, key: str) -> str | None: ...


class StaticTable:
    def __init__(self, spec: str, value: str):
        self.spec = spec
        self.value = value

    def lookup(self, key: str) -> str | None:
        return self.value


class DictTable:
    def __init__(self, spec: str, data: dict[str, str]):
        self.spec = spec
        self.data = data

    def lookup(self, key: str) -> str | None:
        return self.data.get(key.lower())

    def keys(self) -> Iterable[str]:
        return self.data.keys()


class FileTable(DictTable):
    """texthash/hash: a file read into memory."""

    def __init__(self, spec: str, path: str, fmt: str, warn: Callable[[str], None]):
        super().__init__(spec, {})
        self.path = path
        self.fmt = fmt
        self.warn = warn
        self.mtime: float | None = None
        self.load()

    def load(self) -> None:
        try:
            st = os.stat(self.path)
            with open(self.path, "r", encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except FileNotFoundError:
            self.warn(f"warning: {self.spec}: table file does not exist: {self.path}")
            self.data, self.mtime = {}, None
            return
        except OSError as exc:
            raise TableError(f"{self.spec}: cannot read {self.path}: {exc.strerror}") from None
        self.data = parse_alias_text(text, self.path) if self.fmt == "alias" else parse_postmap_text(text, self.path)
        self.mtime = st.st_mtime

    def reload_if_changed(self) -> bool:
        try:
            mtime: float | None = os.stat(self.path).st_mtime
        except OSError:
            mtime = None
        if mtime != self.mtime:
            self.load()
            return True
        return False


class PasswdTable:
    """``unix:passwd.byname``: the value is the user's passwd line fields."""

    spec = "unix:passwd.byname"

    def lookup(self, key: str) -> str | None:
        try:
            pw = pwd.getpwnam(key)
        except (KeyError, UnicodeError, ValueError):
            return None
        return f"{pw.pw_name}:x:{pw.pw_uid}:{pw.pw_gid}:{pw.pw_gecos}:{pw.pw_dir}:{pw.pw_shell}"


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Join continuation lines (leading whitespace); skip comments/blank."""
    current: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[:1].isspace() and current:
            current.append(stripped)
            continue
        if current:
            yield start, " ".join(current)
        current, start = [stripped], lineno
    if current:
        yield start, " ".join(current)


def parse_postmap_text(text: str, filename: str = "<table>") -> dict[str, str]:
    data: dict[str, str] = {}
    for lineno, line in _logical_lines(text):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise TableError(f"{filename}:{lineno}: expected 'key value'")
        data[parts[0].lower()] = parts[1].strip()
    return data


def parse_alias_text(text: str, filename: str = "<aliases>") -> dict[str, str]:
    data: dict[str, str] = {}
    for lineno, line in _logical_lines(text):
        if line.startswith('"'):
            end = line.find('"', 1)
            if end < 0 or line[end + 1 : end + 2] != ":":
                raise TableError(f"{filename}:{lineno}: bad quoted alias name")
            name, value = line[1:end], line[end + 2 :]
        else:
            name, sep, value = line.partition(":")
            if not sep:
                raise TableError(f"{filename}:{lineno}: missing ':' after alias name")
        name = name.strip().lower()
        if not name:
            raise TableError(f"{filename}:{lineno}: empty alias name")
        data[name] = value.strip()
    return data


def parse_inline(body: str, spec: str) -> dict[str, str]:
    body = body.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TableError(f"{spec}: inline table must be written inline:{{ key=value, ... }}")
    data = {}
    items, depth, cur = [], 0, []
    for ch in body[1:-1]:  # split on commas outside { } (a braced entry may hold commas)
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item.startswith("{") and item.endswith("}"):
            item = item[1:-1].strip()
        key, sep, value = item.partition("=")
        if not sep:
            raise TableError(f"{spec}: inline entry {item!r} needs key=value")
        data[key.strip().lower()] = value.strip()
    return data


def open_table(spec: str, *, fmt: str = "postmap", warn: Callable[[str], None] = lambda s: None) -> Table:
    kind, sep, name = spec.partition(":")
    if not sep:
        raise TableError(f"bad table {spec!r}: expected type:name")
    if kind == "static":
        value = name[1:-1].strip() if name.startswith("{") and name.endswith("}") else name
        return StaticTable(spec, value)
    if kind == "inline":
        return DictTable(spec, parse_inline(name, spec))
    if kind in ("texthash", "hash", "btree", "lmdb", "cdb", "dbm"):
        if not name.startswith("/") and not name.startswith("."):
            name = os.path.abspath(name)
        return FileTable(spec, name, fmt, warn)
    if kind == "unix" and name == "passwd.byname":
        return PasswdTable()
    raise TableError(f"unsupported table type {kind!r} in {spec!r}")


class TableList:
    """A parameter's list of tables: the first table with an answer wins."""

    def __init__(self, tables: list[Table]):
        self.tables = tables

    def lookup(self, key: str) -> str | None:
        for table in self.tables:
            value = table.lookup(key)
            if value is not None:
                return value
        return None

    def __bool__(self) -> bool:
        return bool(self.tables)

    def reload_if_changed(self) -> None:
        for table in self.tables:
            reload = getattr(table, "reload_if_changed", None)
            if reload is not None:
                reload()


def open_tables(specs: Iterable[str], *, fmt: str = "postmap", warn: Callable[[str], None] = lambda s: None) -> TableList:
    return TableList([open_table(spec, fmt=fmt, warn=warn) for spec in specs if spec])
