"""Lookup tables (Postfix: dict_*): ``type:name`` behind one interface.

Every place Postfix takes a table (alias_maps, transport_maps,
virtual_*_maps, access maps, header_checks, ...) takes a list of
``type:name`` specs here, and every table answers ``lookup(key) -> str |
None``.  Supported types:

* ``static:value`` / ``static:{text with spaces}`` — every key maps to value.
* ``inline:{ key=value, { key = text, with comma } }`` — written in place.
* ``texthash:/path`` — the postmap(1) source format (``key value`` per
  line, ``#`` comments, lines starting with whitespace continue the
  previous one) read into memory; with ``fmt="alias"`` the aliases(5)
  format (``name: value``) as postalias(1) reads it.  ``lmdb``, ``cdb``,
  ``dbm`` and ``sdbm`` names are read the same way.
* ``hash:/path`` (and ``btree:``) — the same source, compiled by
  :func:`compile_table` into an SQLite index ``/path.db`` next to it and
  looked up from that index (one indexed SELECT, nothing loaded into
  memory).  The index is rebuilt automatically when the source changed
  (on open and in ``reload_if_changed``), atomically: written to a
  temporary file in the same directory, fsync'd, renamed.  An existing
  ``/path.db`` that is not an index written by this module (say a Berkeley
  DB file left by Postfix) is never replaced automatically: the table then
  reads the source into memory and warns.
* ``regexp:/path`` and ``pcre:/path`` — regexp_table(5) / pcre_table(5):
  ``/pattern/flags result`` rules, ``!/pattern/`` negation,
  ``if /pattern/`` ... ``endif`` blocks, ``$1``/``${1}``/``$(1)``
  substitution, first match wins.  Patterns are translated to Python
  :mod:`re` once, when the table is opened: POSIX bracket classes,
  ``REG_NEWLINE`` semantics and GNU escapes for ``regexp``; most of PCRE
  for ``pcre`` (``\\Q..\\E``, ``\\z``, ``\\h``, ``(?<name>``, mid-pattern
  ``(?i)``, the ``A E U`` flags...).  What Python cannot express (recursion,
  ``\\K``, ``\\p{..}``, verbs, ...) is a :class:`TableError` naming
  file:line.  Postfix's defaults apply: matching is case-INsensitive
  unless the ``i`` flag toggles it, and keys are never lower-cased.
* ``cidr:/path`` — cidr_table(5): ``network/prefix result`` or
  ``address result`` (``[...]`` accepted), ``!`` negation, ``if``/``endif``
  blocks, IPv4 and IPv6, first match wins.
* ``regexp:{ {rule}, {rule} }``, ``pcre:{...}``, ``cidr:{...}`` — the same
  rules written in place (Postfix 3.7 inline form).
* ``sqlite:/path.cf`` — sqlite_table(5): ``dbpath``, ``query`` with
  ``%s %u %d %[1-9] %%`` expansions, ``result_format``, ``domain``,
  ``expansion_limit`` (and the legacy ``table``/``select_field``/
  ``where_field``/``additional_conditions``).  Values are never formatted
  into SQL: each expansion becomes a ``?`` parameter (inside a quoted
  literal, the literal becomes a ``(? || ? ...)`` concatenation).  The
  database is opened read-only.  Several rows are joined with ``,``.
* ``unionmap:{a, b}`` — every table's answers, joined with ``,``;
  ``pipemap:{a, b}`` — each table's answer is the next table's key.
* ``unix:passwd.byname`` — the system password database (local users).

Keys of hash/texthash/inline/sqlite tables are matched case-insensitively
(lower-cased), as Postfix's fixed-string tables with the default ``fold``
flag; regexp, pcre and cidr tables see the key as given.

Failures: an unknown type, a malformed spec or a malformed table source
raises :class:`TableError` (a configuration error) naming ``file:line``.
A missing source file is an empty table plus a warning, as Postfix's
``hash:/etc/aliases`` without the file.  ``reload_if_changed()`` re-reads
a source whose modification time changed; when the new version of a
regexp, pcre, cidr, hash or sqlite source is broken, the previous version
stays in use and a warning says so.  A lookup that cannot be answered
right now (an SQLite error, too many results) raises
:class:`TableLookupError`: callers must treat it as a temporary failure,
never as "not found".
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import re
import socket
import sqlite3
import sys
import tempfile
import threading
import urllib.parse
import warnings
from typing import Callable, Iterable, Protocol

Warn = Callable[[str], None]


def _no_warn(text: str) -> None:
    pass


class TableError(Exception):
    pass


class TableLookupError(TableError):
    """A lookup failed for a reason that may go away (temporary failure)."""


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
    """texthash (and lmdb/cdb/dbm names): a file read into memory."""

    def __init__(self, spec: str, path: str, fmt: str, warn: Warn):
        super().__init__(spec, {})
        self.path = path
        self.fmt = fmt
        self.warn = warn
        self.sig: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of what was read
        self.missing = False
        self.load()

    def load(self) -> None:
        try:
            st = os.stat(self.path)
            with open(self.path, "r", encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except FileNotFoundError:
            if self.sig is not None and _kept_when_gone(self, self.path):  # (gone since it was read)
                self.sig = None
                return
            self.warn(f"warning: {self.spec}: table file does not exist: {self.path}")
            self.data, self.sig, self.missing = {}, None, True
            return
        except OSError as exc:
            raise TableError(f"{self.spec}: cannot read {self.path}: {exc.strerror}") from None
        self.data = _parse_source(text, self.path, self.fmt)
        self.sig, self.missing = (st.st_mtime_ns, st.st_size, st.st_ino), False

    def reload_if_changed(self) -> bool:
        """Re-read the file when its signature (time stamp, size, inode)
        changed.  A file that disappears keeps the previous contents (an
        editor replacing it, an administrator's mistake) with a warning."""
        sig = _file_sig(self.path)
        if sig == self.sig:
            return False
        if sig is None and _kept_when_gone(self, self.path):
            self.sig = None
            return False
        try:
            self.load()
        except TableError:
            self.sig = sig  # (previous contents kept; reported once per version of the file)
            raise
        return True


def getpwnam(name: str) -> pwd.struct_passwd | None:
    """The passwd entry of ``name``, or None when there is none.

    Python's ``pwd.getpwnam`` reports every failed lookup as "not found"
    (KeyError), also one that could not run (out of descriptors or memory,
    an LDAP or sssd source that is down): the user would be unknown and the
    mail refused or bounced.  So this calls the C library's ``getpwnam_r``,
    whose result tells the two apart, as Postfix's ``mypwnam_err`` does; a
    lookup that could not run raises OSError (callers treat it as a
    temporary failure, as Postfix's lookup errors)."""
    if not name or "\0" in name:
        return None
    lookup = _getpwnam_r()
    if lookup is None:  # (no C library function to call: Python's, with a check of a miss)
        return _getpwnam_checked(name)
    try:
        key = name.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return None
    size = 1024
    while True:
        entry, buf, result = _Passwd(), ctypes.create_string_buffer(size), ctypes.POINTER(_Passwd)()
        err = lookup(key, ctypes.byref(entry), buf, size, ctypes.byref(result))
        if err == 0:
            break
        if err == errno.ERANGE and size < 1 << 20:  # a long entry: a larger buffer
            size *= 4
            continue
        if err in (errno.ENOENT, errno.ESRCH):  # "not found", as some sources say it
            return None
        raise _lookup_error(name, err)
    if not result:
        return None
    p = result.contents

    def text(value: bytes | None) -> str:
        return os.fsdecode(value) if value is not None else ""

    return pwd.struct_passwd((text(p.pw_name), text(p.pw_passwd), p.pw_uid, p.pw_gid, text(p.pw_gecos),
                              text(p.pw_dir), text(p.pw_shell)))


class _Passwd(ctypes.Structure):  # struct passwd (glibc and musl)
    _fields_ = [("pw_name", ctypes.c_char_p), ("pw_passwd", ctypes.c_char_p), ("pw_uid", ctypes.c_uint32),
                ("pw_gid", ctypes.c_uint32), ("pw_gecos", ctypes.c_char_p), ("pw_dir", ctypes.c_char_p),
                ("pw_shell", ctypes.c_char_p)]


_GETPWNAM_R: list = []


def _getpwnam_r():
    """The C library's getpwnam_r (ctypes releases the GIL around it), or None."""
    if not _GETPWNAM_R:
        try:
            if not sys.platform.startswith("linux"):  # (the BSDs' struct passwd has more fields)
                raise OSError("struct passwd layout unknown here")
            function = ctypes.CDLL(None, use_errno=True).getpwnam_r
            function.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Passwd), ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.POINTER(_Passwd))]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _GETPWNAM_R.append(function)
    return _GETPWNAM_R[0]


def _getpwnam_checked(name: str) -> pwd.struct_passwd | None:
    """Python's getpwnam; a miss is checked: when /etc/passwd cannot be
    opened for want of descriptors or memory, the OSError is raised."""
    try:
        return pwd.getpwnam(name)
    except (UnicodeError, ValueError):
        return None
    except KeyError:
        pass
    try:
        fd = os.open("/etc/passwd", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise _lookup_error(name, exc.errno) from None
        return None  # no /etc/passwd (other NSS sources): the miss stands
    os.close(fd)
    return None


def _lookup_error(name: str, err: int) -> OSError:
    return OSError(err, f"cannot look up user {name!r}: {os.strerror(err)}")


class PasswdTable:
    """``unix:passwd.byname``: the value is the user's passwd line fields."""

    spec = "unix:passwd.byname"

    def lookup(self, key: str) -> str | None:
        pw = getpwnam(key)
        if pw is None:
            return None
        return f"{pw.pw_name}:x:{pw.pw_uid}:{pw.pw_gid}:{pw.pw_gecos}:{pw.pw_dir}:{pw.pw_shell}"


# --------------------------------------------------------------------------
# Source formats
# --------------------------------------------------------------------------


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


def _readllines(text: str, where: Callable[[int], str], warn: Warn) -> list[tuple[int, str]]:
    """Postfix readlline(3) exactly: continuation text is appended as is.

    Comment and blank lines are dropped without ending a logical line; a
    line starting with whitespace continues the previous one; trailing
    whitespace of the logical line is trimmed.  Returns ``(first line
    number, text)`` pairs.
    """
    result: list[tuple[int, str]] = []
    current: list[str] | None = None
    start = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if current is None:
                warn(f"warning: {where(lineno)}: logical line must not start with whitespace: "
                     f"\"{stripped[:30]}\"; ignored")
                continue
            current.append(line)
            continue
        if current is not None:
            result.append((start, "".join(current).rstrip()))
        current, start = [line], lineno
    if current is not None:
        result.append((start, "".join(current).rstrip()))
    return result


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


def _parse_source(text: str, filename: str, fmt: str) -> dict[str, str]:
    return parse_alias_text(text, filename) if fmt == "alias" else parse_postmap_text(text, filename)


def _split_braced(body: str) -> list[str]:
    """Split ``a, {b, c}, d`` on commas outside braces (inline: syntax)."""
    items, depth, cur = [], 0, []
    for ch in body:
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
    return items


def parse_inline(body: str, spec: str) -> dict[str, str]:
    body = body.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TableError(f"{spec}: inline table must be written inline:{{ key=value, ... }}")
    data = {}
    for item in _split_braced(body[1:-1]):
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


def _inline_rules(name: str, spec: str) -> list[tuple[int, str]]:
    """``{ {rule one}, {rule two} }`` -> numbered rule lines."""
    body = name.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TableError(f"{spec}: inline rules must be written {{ {{rule}}, {{rule}} }}")
    rules = []
    for item in _split_braced(body[1:-1]):
        item = item.strip()
        if item.startswith("{") and item.endswith("}"):
            item = item[1:-1].strip()
        if item:
            rules.append((len(rules) + 1, item))
    return rules


def _abspath(name: str) -> str:
    if not name.startswith("/") and not name.startswith("."):
        return os.path.abspath(name)
    return name


def _file_sig(path: str) -> tuple[int, int, int] | None:
    """What reload_if_changed compares: (mtime_ns, size, inode), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _kept_when_gone(table, path: str) -> bool:
    """The one rule for a table file that disappears (an editor replacing
    it, an administrator's mistake): the table keeps its previous contents,
    with one warning, until the file is back, as a running Postfix daemon
    keeps the table it opened.  Never an empty table: a vanished access or
    cidr list would permit what it refused.  True when that applies (the
    caller forgets the old signature, so that the file's return is a
    change); False for a table that was already missing."""
    if table.missing:
        return False
    table.warn(f"warning: {table.spec}: table file {path} disappeared; keeping the previous version")
    table.missing = True
    return True


def _reload_changed(table) -> bool:
    """Re-read a file-backed table whose file signature changed; a broken
    new version keeps the previous one (with a warning), and so does a file
    that disappeared (:func:`_kept_when_gone`)."""
    if table.path is None:
        return False
    sig = _file_sig(table.path)
    if sig == table._sig:
        return False
    if sig is None and _kept_when_gone(table, table.path):
        table._sig = None
        return False
    try:
        table._load()
    except TableError as exc:
        table.warn(f"warning: {table.spec}: {exc}; keeping the previous version")
        table._sig = sig
    return True



class _SourceTable:
    """A table compiled from one source file (or from inline rules).

    Subclasses implement ``_compile(lines_text) -> None`` raising
    TableError; this class handles missing files and reloads.
    """

    kind = ""
    spec: str
    path: str | None
    warn: Warn

    def _setup(self, spec: str, name: str, warn: Warn) -> None:
        self.spec = spec
        self.warn = warn
        self.missing = False
        self._sig: tuple[int, int, int] | None = None
        if name.lstrip().startswith("{"):
            self.path = None
            self._compile(_inline_rules(name, spec), lambda n: f"{spec}, rule {n}")
        else:
            self.path = _abspath(name)
            self._load()

    def _where(self, lineno: int) -> str:
        return f"{self.path}:{lineno}"

    def _load(self) -> None:
        assert self.path is not None
        sig = _file_sig(self.path)
        try:
            with open(self.path, "r", encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except FileNotFoundError:
            if self._sig is not None and _kept_when_gone(self, self.path):  # (gone since it was read)
                self._sig = None
                return
            self.warn(f"warning: {self.spec}: table file does not exist: {self.path}")
            self._compile([], self._where)
            self.missing, self._sig = True, None
            return
        except OSError as exc:
            raise TableError(f"{self.spec}: cannot read {self.path}: {exc.strerror}") from None
        self._compile(_readllines(text, self._where, self.warn), self._where)
        self.missing, self._sig = False, sig

    def _compile(self, lines: list[tuple[int, str]], where: Callable[[int], str]) -> None:
        raise NotImplementedError

    def reload_if_changed(self) -> bool:
        return _reload_changed(self)


# --------------------------------------------------------------------------
# regexp: and pcre: — pattern translation to Python re
# --------------------------------------------------------------------------


class _PatternError(Exception):
    pass


_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "0-9a-zA-Z",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "punct": "".join("\\" + c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "print": r"\x20-\x7e",
    "graph": r"\x21-\x7e",
    "cntrl": r"\x00-\x1f\x7f",
    "xdigit": "0-9A-Fa-f",
}
_PCRE_POSIX_CLASSES = dict(_POSIX_CLASSES, word=r"\w")
_PCRE_POSIX_NEGATED = {"digit": r"\D", "space": r"\S", "word": r"\W"}

# GNU regcomp escapes outside brackets; any other escaped character is
# literal (so "\d" is "d" and "\." is ".", as with Postfix's regexp:).
_GNU_ESCAPES = {
    "<": r"\b(?=\w)", ">": r"\b(?<=\w)", "`": r"\A", "'": r"\Z",
    "w": r"\w", "W": r"\W", "s": r"\s", "S": r"\S", "b": r"\b", "B": r"\B",
}


def _set_char(c: str) -> str:
    """One literal character inside a Python [...] set."""
    if c in "\\]^-[&~|":
        return "\\" + c
    if c == "\n":
        return "\\n"
    return c


def _char_escape(cp: int) -> str:
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    if cp <= 0x10FFFF:
        return f"\\U{cp:08x}"
    raise _PatternError(f"character code {cp:#x} is out of range")


def _posix_bracket(p: str, i: int, newline: bool) -> tuple[str, int]:
    """POSIX bracket expression at p[i] == '[' (backslash is literal)."""
    n = len(p)
    i += 1
    negate = False
    if i < n and p[i] == "^":
        negate, i = True, i + 1
    items: list[str] = []
    first = True
    while True:
        if i >= n:
            raise _PatternError("brackets ([ ]) not balanced")
        c = p[i]
        if c == "]" and not first:
            i += 1
            break
        first = False
        if c == "[" and i + 1 < n and p[i + 1] in ":.=":
            kind = p[i + 1]
            end = p.find(kind + "]", i + 2)
            if end < 0:
                raise _PatternError(f"unterminated [{kind} in bracket expression")
            name, i = p[i + 2 : end], end + 2
            if kind == ":":
                if name not in _POSIX_CLASSES:
                    raise _PatternError(f"invalid character class [:{name}:]")
                items.append(_POSIX_CLASSES[name])
                continue
            if len(name) != 1:
                raise _PatternError(f"collating element [{kind}{name}{kind}] is not supported")
            low = name
        else:
            low, i = c, i + 1
        if i + 1 < n and p[i] == "-" and p[i + 1] != "]":
            high, i = p[i + 1], i + 2
            items.append(_set_char(low) + "-" + _set_char(high))
        else:
            items.append(_set_char(low))
    body = "".join(items)
    if negate and newline:
        body += "\\n"  # REG_NEWLINE: a non-matching list never matches newline
    return "[" + ("^" if negate else "") + body + "]", i


def translate_posix_regex(p: str, *, newline: bool = False, basic: bool = False,
                          notes: list[str] | None = None) -> str:
    """POSIX (GNU) regcomp syntax -> Python re syntax.

    ``newline`` is REG_NEWLINE (the ``m`` flag of regexp tables: compile
    the result with re.MULTILINE, else with re.DOTALL); ``basic`` is a
    basic regular expression (the ``x`` flag turns REG_EXTENDED off).
    Escaped letters that POSIX takes literally (``\\d`` is ``d``) are
    reported in ``notes``.
    """
    out: list[str] = []
    n, i = len(p), 0
    at_start = True  # BRE: start of the RE or of a \( or \| branch
    while i < n:
        c = p[i]
        was_start, at_start = at_start, False
        if c == "\\":
            if i + 1 >= n:
                raise _PatternError("trailing backslash (\\)")
            d, i = p[i + 1], i + 2
            if basic and d in "(){}|+?":
                out.append(d)
                at_start = d in "(|"
            elif d in _GNU_ESCAPES:
                out.append(_GNU_ESCAPES[d])
            elif d in "123456789":
                out.append(f"(?:\\{d})")
            else:
                if notes is not None and d.isascii() and d.isalpha():
                    notes.append(f"\"\\{d}\" is a literal \"{d}\" in a POSIX regular expression")
                out.append(re.escape(d))
            continue
        if c == "[":
            text, i = _posix_bracket(p, i, newline)
            out.append(text)
            continue
        if basic:
            if c in "(){}|+?":
                out.append("\\" + c)
                i += 1
                continue
            if c == "^" and not was_start:
                out.append("\\^")
                i += 1
                continue
            if c == "^":
                out.append("^")
                at_start = True  # a '*' right after a leading '^' is literal
                i += 1
                continue
            if c == "*" and was_start:
                out.append("\\*")
                i += 1
                continue
            if c == "$" and not (i + 1 == n or p.startswith(("\\)", "\\|"), i + 1)):
                out.append("\\$")
                i += 1
                continue
        elif c == "(" and p.startswith("(?", i):
            raise _PatternError("'(?' is not POSIX regular expression syntax (use a pcre: table)")
        if c == "$":
            out.append("$" if newline else r"\Z")
        else:
            out.append(c)
        i += 1
    return "".join(out)


_PCRE_UNSUPPORTED_ESCAPES = {
    "G": "\\G", "K": "\\K", "X": "\\X", "C": "\\C", "p": "\\p", "P": "\\P",
}


def _pcre_escape(p: str, i: int, in_class: bool) -> tuple[str, int, bool]:
    """PCRE escape at p[i] == '\\' -> (python text, next index, single char?)."""
    n = len(p)
    if i + 1 >= n:
        raise _PatternError("\\ at end of pattern")
    d, j = p[i + 1], i + 2
    if d == "Q":
        k = p.find("\\E", j)
        literal = p[j:] if k < 0 else p[j:k]
        j = n if k < 0 else k + 2
        if in_class:
            return "".join(_set_char(ch) for ch in literal), j, len(literal) == 1
        return re.escape(literal), j, False
    if d == "E":
        return "", j, False
    if d == "x":
        if p[j : j + 1] == "{":
            k = p.find("}", j)
            digits = p[j + 1 : k] if k > 0 else ""
            if k < 0 or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise _PatternError("malformed \\x{...} escape")
            return _char_escape(int(digits, 16)), k + 1, True
        m = re.compile(r"[0-9a-fA-F]{0,2}").match(p, j)
        assert m is not None
        return _char_escape(int(m.group() or "0", 16)), m.end(), True
    if d == "o" and p[j : j + 1] == "{":
        k = p.find("}", j)
        digits = p[j + 1 : k] if k > 0 else ""
        if k < 0 or not re.fullmatch(r"[0-7]+", digits):
            raise _PatternError("malformed \\o{...} escape")
        return _char_escape(int(digits, 8)), k + 1, True
    if d == "c":
        if j >= n:
            raise _PatternError("\\c at end of pattern")
        return _char_escape(ord(p[j].upper()) ^ 0x40), j + 1, True
    if d == "e":
        return "\\x1b", j, True
    if d == "a":
        return "\\x07", j, True
    if in_class:
        if d == "b":
            return "\\x08", j, True
        if d == "h":
            return " \\t\\xa0", j, False
        if d == "v":
            return "\\n\\x0b\\x0c\\r\\x85", j, False
        if d in "HVRNXKGAzZBgkpPC":
            raise _PatternError(f"\\{d} is not supported inside a character class")
        return "\\" + d, j, d not in "dDsSwW"
    simple = {
        "z": r"\Z", "Z": r"(?=\n?\Z)", "A": r"\A",
        "h": r"[ \t\xa0]", "H": r"[^ \t\xa0]",
        "v": r"[\n\x0b\x0c\r\x85]", "V": r"[^\n\x0b\x0c\r\x85]",
        "R": r"(?:\r\n|[\n\x0b\x0c\r\x85])",
    }
    if d in simple:
        return simple[d], j, False
    if d == "N" and p[j : j + 1] != "{":
        return r"[^\n]", j, False
    if d == "g":
        m = re.compile(r"\{(\d+)\}|(\d+)|\{([A-Za-z_]\w*)\}").match(p, j)
        if m is None:
            raise _PatternError("\\g subroutine calls and relative references are not supported")
        if m.group(3):
            return f"(?P={m.group(3)})", m.end(), False
        return f"(?:\\{int(m.group(1) or m.group(2))})", m.end(), False
    if d == "k":
        m = re.compile(r"<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)'|\{([A-Za-z_]\w*)\}").match(p, j)
        if m is None:
            raise _PatternError("malformed \\k<name> reference")
        return f"(?P={m.group(1) or m.group(2) or m.group(3)})", m.end(), False
    if d in _PCRE_UNSUPPORTED_ESCAPES or d == "N":
        name = _PCRE_UNSUPPORTED_ESCAPES.get(d, "\\N{...}")
        raise _PatternError(f"{name} is not supported by Python re")
    return "\\" + d, j, False


def _pcre_bracket(p: str, i: int) -> tuple[str, int]:
    """PCRE character class at p[i] == '['."""
    n = len(p)
    i += 1
    out = ["["]
    if i < n and p[i] == "^":
        out.append("^")
        i += 1
    first, prev_single = True, False
    while True:
        if i >= n:
            raise _PatternError("missing terminating ] for character class")
        c = p[i]
        if c == "]" and not first:
            i += 1
            break
        first = False
        if c == "[":
            m = re.compile(r"\[:(\^?)([a-z]+):\]").match(p, i)
            if m:
                negated, name = m.group(1), m.group(2)
                if negated:
                    if name not in _PCRE_POSIX_NEGATED:
                        raise _PatternError(f"[:^{name}:] is not supported")
                    out.append(_PCRE_POSIX_NEGATED[name])
                elif name in _PCRE_POSIX_CLASSES:
                    out.append(_PCRE_POSIX_CLASSES[name])
                else:
                    raise _PatternError(f"unknown POSIX class name [:{name}:]")
                i, prev_single = m.end(), False
                continue
            if p.startswith(("[.", "[="), i):
                raise _PatternError("POSIX collating elements are not supported")
            out.append("\\[")
            i, prev_single = i + 1, True
            continue
        if c == "\\":
            text, i, prev_single = _pcre_escape(p, i, in_class=True)
            out.append(text)
            continue
        if c == "-":
            if prev_single and i + 1 < n and p[i + 1] != "]":
                out.append("-")
                i, prev_single = i + 1, False
                continue
            out.append("\\-")
            i, prev_single = i + 1, True
            continue
        out.append(_set_char(c))
        i, prev_single = i + 1, True
    out.append("]")
    return "".join(out), i


_RE_QUANTIFIER = re.compile(r"\{\d+(?:,\d*)?\}")
_RE_NAMED_GROUP = re.compile(r"\(\?(?:P?<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)')")
_RE_NAMED_BACKREF = re.compile(r"\(\?P=([A-Za-z_]\w*)\)")
_RE_FLAG_GROUP = re.compile(r"\(\?([A-Za-z]*)(?:-([A-Za-z]*))?([:)])")
_RE_UNSUPPORTED_GROUP = re.compile(r"\(\?(?:R|[+-]?\d|&|P>|\||C)")


def translate_pcre(p: str, *, extended: bool = False, ungreedy: bool = False,
                   dollar_endonly: bool = False) -> str:
    """PCRE syntax -> Python re syntax (raises _PatternError when impossible).

    ``ungreedy`` is the U flag (quantifiers swap greediness);
    ``dollar_endonly`` is the E flag without m (``$`` only at the very end).
    Mid-pattern option settings such as ``a(?i)b|c`` become scoped groups
    (``a(?i:b)|(?i:c)``), which is what PCRE means by them.
    """
    out: list[str] = []
    # One entry per open group: [scoped groups opened by (?flags), their flag strings]
    stack: list[list] = [[0, []]]
    n, i = len(p), 0
    verbose = extended

    def suffix(i: int) -> tuple[str, int]:
        if i < n and p[i] == "+":
            return "+", i + 1
        if i < n and p[i] == "?":
            return ("" if ungreedy else "?"), i + 1
        return ("?" if ungreedy else ""), i

    while i < n:
        c = p[i]
        if verbose and c in " \t\n\r\f\v":
            out.append(c)
            i += 1
            continue
        if verbose and c == "#":
            j = p.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "\\":
            text, i, _ = _pcre_escape(p, i, in_class=False)
            out.append(text)
            continue
        if c == "[":
            text, i = _pcre_bracket(p, i)
            out.append(text)
            continue
        if c == "(":
            if p.startswith("(*", i):
                raise _PatternError("(*VERB) control verbs are not supported")
            if p.startswith("(?#", i):
                j = p.find(")", i)
                if j < 0:
                    raise _PatternError("missing ) after (?# comment")
                i = j + 1
                continue
            if not p.startswith("(?", i):
                out.append("(")
                stack.append([0, []])
                i += 1
                continue
            for opener in ("(?<=", "(?<!", "(?:", "(?=", "(?!", "(?>"):
                if p.startswith(opener, i):
                    out.append(opener)
                    stack.append([0, []])
                    i += len(opener)
                    break
            else:
                m = _RE_NAMED_GROUP.match(p, i)
                if m:
                    out.append(f"(?P<{m.group(1) or m.group(2)}>")
                    stack.append([0, []])
                    i = m.end()
                    continue
                m = _RE_NAMED_BACKREF.match(p, i)
                if m:
                    out.append(m.group(0))
                    i = m.end()
                    continue
                if _RE_UNSUPPORTED_GROUP.match(p, i):
                    raise _PatternError(f"group syntax {p[i:i + 4]!r}... is not supported "
                                        "(recursion, subroutines, branch reset, callouts)")
                m = _RE_FLAG_GROUP.match(p, i)
                if m is None:
                    raise _PatternError(f"group syntax {p[i:i + 4]!r}... is not supported "
                                        "(recursion, subroutines, branch reset, callouts)")
                on, off, end = m.group(1), m.group(2) or "", m.group(3)
                bad = sorted(set(on + off) - set("imsx"))
                if bad:
                    raise _PatternError(f"inline option {''.join(bad)!r} in {m.group(0)!r} is not supported")
                if "x" in on:
                    verbose = True
                if "x" in off:
                    verbose = False
                flags = on + (f"-{off}" if off else "")
                if end == ":":
                    out.append(f"(?{flags}:" if flags else "(?:")
                    stack.append([0, []])
                elif flags:
                    out.append(f"(?{flags}:")
                    stack[-1][0] += 1
                    stack[-1][1].append(flags)
                i = m.end()
            continue
        if c == ")":
            if len(stack) == 1:
                raise _PatternError("unmatched closing parenthesis")
            wrap, _ = stack.pop()
            out.append(")" * wrap + ")")
            i += 1
            continue
        if c == "|":
            wrap, reopen = stack[-1]
            out.append(")" * wrap + "|" + "".join(f"(?{f}:" for f in reopen))
            i += 1
            continue
        if c in "*+?":
            out.append(c)
            text, i = suffix(i + 1)
            out.append(text)
            continue
        if c == "{":
            m = _RE_QUANTIFIER.match(p, i)
            if m:
                out.append(m.group(0))
                text, i = suffix(m.end())
                out.append(text)
            else:
                out.append("\\{")  # PCRE: not a quantifier, a literal brace
                i += 1
            continue
        if c == "$" and dollar_endonly:
            out.append(r"\Z")
            i += 1
            continue
        out.append(c)
        i += 1
    if len(stack) != 1:
        raise _PatternError("missing closing parenthesis")
    out.append(")" * stack[0][0])
    return "".join(out)


def _re_compile(pattern: str, flags: int) -> re.Pattern[str]:
    # Python warns (FutureWarning) about constructs whose meaning may
    # change; with filterwarnings=error those would escape as exceptions.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return re.compile(pattern, flags)
        except (re.error, Warning, OverflowError, RecursionError) as exc:
            raise _PatternError(str(exc)) from None


def compile_regexp_pattern(pattern: str, flags: str, kind: str,
                           notes: list[str] | None = None) -> tuple[re.Pattern[str], bool]:
    """Compile one table pattern with its flags -> (regex, anchored).

    Postfix defaults: regexp: REG_EXTENDED|REG_ICASE, flags i m x toggle
    ICASE, NEWLINE, EXTENDED.  pcre: CASELESS|DOTALL, flags i m s x A E U X
    toggle CASELESS, MULTILINE, DOTALL, EXTENDED, ANCHORED,
    DOLLAR_ENDONLY, UNGREEDY, (obsolete) EXTRA.  Raises _PatternError.
    """
    if kind == "regexp":
        icase, newline, extended = True, False, True
        for f in flags:
            if f == "i":
                icase = not icase
            elif f == "m":
                newline = not newline
            elif f == "x":
                extended = not extended
            else:
                raise _PatternError(f'unknown regexp option "{f}"')
        text = translate_posix_regex(pattern, newline=newline, basic=not extended, notes=notes)
        reflags = (re.IGNORECASE if icase else 0) | (re.MULTILINE if newline else re.DOTALL)
        return _re_compile(text, reflags), False
    caseless, multiline, dotall, extended = True, False, True, False
    anchored = dollar_endonly = ungreedy = False
    for f in flags:
        if f == "i":
            caseless = not caseless
        elif f == "m":
            multiline = not multiline
        elif f == "s":
            dotall = not dotall
        elif f == "x":
            extended = not extended
        elif f == "A":
            anchored = not anchored
        elif f == "E":
            dollar_endonly = not dollar_endonly
        elif f == "U":
            ungreedy = not ungreedy
        elif f == "X":
            pass  # obsolete PCRE_EXTRA; Postfix ignores it with PCRE2 too
        else:
            raise _PatternError(f'unknown regexp option "{f}"')
    text = translate_pcre(pattern, extended=extended, ungreedy=ungreedy,
                          dollar_endonly=dollar_endonly and not multiline)
    reflags = ((re.IGNORECASE if caseless else 0) | (re.MULTILINE if multiline else 0)
               | (re.DOTALL if dotall else 0) | (re.VERBOSE if extended else 0))
    return _re_compile(text, reflags), anchored


def parse_replacement(text: str) -> tuple[list[str | int], int]:
    """Postfix mac_parse() of a regexp/pcre result: ``$n ${n} $(n) $$``.

    Returns (parts, highest $n); parts are literal strings and group
    numbers.  Raises ValueError with Postfix's complaint.
    """
    parts: list[str | int] = []
    literal: list[str] = []
    max_sub, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c != "$":
            literal.append(c)
            i += 1
            continue
        if text[i + 1 : i + 2] == "$":
            literal.append("$")
            i += 2
            continue
        i += 1
        if i < n and text[i] in "{(":
            close = "}" if text[i] == "{" else ")"
            j = text.find(close, i + 1)
            if j < 0:
                raise ValueError(f"bad replacement syntax: unbalanced '{text[i]}'")
            name, i = text[i + 1 : j], j + 1
        else:
            j = i
            while j < n and (text[j].isascii() and (text[j].isalnum() or text[j] == "_")):
                j += 1
            name, i = text[i:j], j
        if not name:
            raise ValueError("bad replacement syntax: '$' without a name (write $$ for a dollar)")
        if not (name.isascii() and name.isdigit()):
            raise ValueError(f'non-numeric replacement index "{name}"')
        number = int(name)
        if number < 1:
            raise ValueError(f'out-of-range replacement index "{name}"')
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(number)
        max_sub = max(max_sub, number)
    if literal:
        parts.append("".join(literal))
    return parts, max_sub


_OP_MATCH, _OP_IF, _OP_ENDIF = 0, 1, 2


class _RegexpRule:
    __slots__ = ("op", "lineno", "test", "positive", "second", "second_positive",
                 "result", "parts", "jump")

    def __init__(self, op: int, lineno: int):
        self.op = op
        self.lineno = lineno
        self.test: Callable[[str], re.Match[str] | None] | None = None
        self.positive = True
        self.second: Callable[[str], re.Match[str] | None] | None = None
        self.second_positive = True
        self.result = ""
        self.parts: list[str | int] | None = None
        self.jump = 0


def _if_keyword(line: str, word: str) -> bool:
    return line[: len(word)].lower() == word and not (line[len(word) : len(word) + 1].isalnum())


class RegexpTable(_SourceTable):
    """``regexp:`` and ``pcre:`` tables: ordered rules, first match wins."""

    def __init__(self, spec: str, name: str, kind: str, warn: Warn = _no_warn):
        self.kind = kind
        self._rules: list[_RegexpRule] = []
        self._setup(spec, name, warn)

    def _get_pattern(self, line: str, pos: int, where: str) -> tuple[str, str, bool, int]:
        positive = True
        while pos < len(line) and (line[pos] == "!" or line[pos].isspace()):
            if line[pos] == "!":
                positive = not positive
            pos += 1
        if pos >= len(line):
            raise TableError(f"{where}: no regexp")
        delimiter = line[pos]
        pos += 1
        start = pos
        while pos < len(line):
            c = line[pos]
            if c == "\\" and pos + 1 < len(line):
                pos += 2
                continue
            if c == delimiter:
                break
            pos += 1
        if pos >= len(line):
            raise TableError(f'{where}: no closing regexp delimiter "{delimiter}"')
        pattern = line[start:pos]
        pos += 1
        flags_start = pos
        while pos < len(line) and not line[pos].isspace() and not (self.kind == "regexp" and line[pos] == "!"):
            pos += 1
        return pattern, line[flags_start:pos], positive, pos

    def _compile_pattern(self, pattern: str, flags: str, where: str) -> tuple[re.Pattern[str], Callable]:
        notes: list[str] = []
        try:
            regex, anchored = compile_regexp_pattern(pattern, flags, self.kind, notes)
        except _PatternError as exc:
            raise TableError(f"{where}: {self.kind} pattern /{pattern}/{flags}: {exc}") from None
        for note in notes:
            self.warn(f"warning: {where}: {note} (use a bracket expression or a pcre: table)")
        return regex, (regex.match if anchored else regex.search)

    def _parse_rule(self, lineno: int, line: str, where: str) -> _RegexpRule:
        if line[:1].isalnum():
            if _if_keyword(line, "if"):
                rule = _RegexpRule(_OP_IF, lineno)
                pattern, flags, rule.positive, pos = self._get_pattern(line, 2, where)
                if line[pos:].strip():
                    raise TableError(f"{where}: extra text after IF statement: \"{line[pos:].strip()}\" "
                                     "(do not indent rules between IF and ENDIF)")
                _, rule.test = self._compile_pattern(pattern, flags, where)
                return rule
            if _if_keyword(line, "endif"):
                if line[5:].strip():
                    raise TableError(f"{where}: extra text after ENDIF")
                return _RegexpRule(_OP_ENDIF, lineno)
            raise TableError(f"{where}: unrecognized request (a rule starts with /pattern/, IF or ENDIF)")
        rule = _RegexpRule(_OP_MATCH, lineno)
        pattern, flags, rule.positive, pos = self._get_pattern(line, 0, where)
        second = None
        if self.kind == "regexp" and line[pos : pos + 1] == "!":
            second = self._get_pattern(line, pos, where)  # /pattern1/!/pattern2/ (legacy)
            pos = second[3]
        result = line[pos:].strip()
        if not result:
            self.warn(f"warning: {where}: no replacement text: using empty string")
        try:
            parts, max_sub = parse_replacement(result)
        except ValueError as exc:
            raise TableError(f"{where}: {exc}") from None
        if max_sub and not rule.positive:
            raise TableError(f"{where}: $number found in negative match replacement text")
        regex, rule.test = self._compile_pattern(pattern, flags, where)
        if max_sub > regex.groups:
            raise TableError(f'{where}: out of range replacement index "{max_sub}"')
        if second is not None:
            _, rule.second = self._compile_pattern(second[0], second[1], where)
            rule.second_positive = second[2]
        if max_sub:
            rule.parts = parts
        else:
            rule.result = "".join(p for p in parts if isinstance(p, str))
        return rule

    def _compile(self, lines: list[tuple[int, str]], where: Callable[[int], str]) -> None:
        rules: list[_RegexpRule] = []
        open_ifs: list[_RegexpRule] = []
        for lineno, line in lines:
            rule = self._parse_rule(lineno, line, where(lineno))
            if rule.op == _OP_IF:
                open_ifs.append(rule)
            elif rule.op == _OP_ENDIF:
                if not open_ifs:
                    raise TableError(f"{where(lineno)}: ENDIF without matching IF")
                open_ifs.pop().jump = len(rules)
            rules.append(rule)
        if open_ifs:
            raise TableError(f"{where(open_ifs[-1].lineno)}: IF has no matching ENDIF")
        self._rules = rules

    def lookup(self, key: str) -> str | None:
        rules = self._rules
        i, n = 0, len(rules)
        while i < n:
            rule = rules[i]
            op = rule.op
            if op == _OP_MATCH:
                m = rule.test(key)  # type: ignore[misc]
                if (m is not None) is rule.positive and (
                        rule.second is None or (rule.second(key) is not None) is rule.second_positive):
                    if rule.parts is None:
                        return rule.result
                    assert m is not None
                    return "".join(p if isinstance(p, str) else (m.group(p) or "") for p in rule.parts)
            elif op == _OP_IF:
                if (rule.test(key) is not None) is not rule.positive:  # type: ignore[misc]
                    i = rule.jump
            i += 1
        return None

    def __len__(self) -> int:
        return len(self._rules)


# --------------------------------------------------------------------------
# cidr:
# --------------------------------------------------------------------------


def _parse_cidr_pattern(pattern: str, where: str) -> tuple[int, int, int, bool]:
    """cidr_match_parse(): -> (family, network, mask, positive)."""
    positive = True
    while pattern.startswith("!"):
        positive = not positive
        pattern = pattern[1:]
    if not pattern:
        raise TableError(f"{where}: no address pattern")
    if pattern.startswith("["):
        inner, sep, after = pattern[1:].partition("]")
        if not sep:
            raise TableError(f"{where}: missing ']' character after \"[{inner}\"")
        if after and not after.startswith("/"):
            raise TableError(f"{where}: garbage after \"[{inner}]\"")
        pattern = inner + after
    address, slash, length = pattern.partition("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    bits = 128 if family == socket.AF_INET6 else 32
    try:
        network = int.from_bytes(socket.inet_pton(family, address), "big")
    except (OSError, ValueError):
        network = -1
    if slash:
        if network < 0 or not (length.isascii() and length.isdigit()) or int(length) > bits:
            raise TableError(f"{where}: bad net/mask pattern: \"{address}/{length}\"")
        prefix = int(length)
    else:
        if network < 0:
            raise TableError(f"{where}: bad address pattern: \"{address}\"")
        prefix = bits
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
    if network & ~mask:
        fixed = socket.inet_ntop(family, (network & mask).to_bytes(bits // 8, "big"))
        raise TableError(f"{where}: non-null host address bits in \"{address}/{length}\", "
                         f"perhaps you should use \"{fixed}/{prefix}\" instead")
    return family, network, mask, positive


class CidrTable(_SourceTable):
    """``cidr:`` tables: ordered network blocks, first match wins."""

    kind = "cidr"

    def __init__(self, spec: str, name: str, warn: Warn = _no_warn):
        # entries: (op, family, network, mask, positive, value, jump)
        self._entries: list[list] = []
        self._setup(spec, name, warn)

    def _compile(self, lines: list[tuple[int, str]], where: Callable[[int], str]) -> None:
        entries: list[list] = []
        open_ifs: list[tuple[int, list]] = []
        for lineno, line in lines:
            w = where(lineno)
            if _if_keyword(line, "if"):
                words = line[2:].split()
                if len(words) > 1:
                    raise TableError(f"{w}: extra text after IF statement: \"{' '.join(words[1:])}\" "
                                     "(do not indent rules between IF and ENDIF)")
                family, network, mask, positive = _parse_cidr_pattern(words[0] if words else "", w)
                entry = [_OP_IF, family, network, mask, positive, None, 0]
                open_ifs.append((lineno, entry))
            elif _if_keyword(line, "endif"):
                if not open_ifs:
                    raise TableError(f"{w}: ENDIF without matching IF")
                if line[5:].strip():
                    raise TableError(f"{w}: extra text after ENDIF")
                open_ifs.pop()[1][6] = len(entries)
                entry = [_OP_ENDIF, 0, 0, 0, True, None, 0]
            else:
                parts = line.split(None, 1)
                if len(parts) != 2 or not parts[1].strip():
                    raise TableError(f"{w}: no lookup result")
                family, network, mask, positive = _parse_cidr_pattern(parts[0], w)
                entry = [_OP_MATCH, family, network, mask, positive, parts[1].strip(), 0]
            entries.append(entry)
        if open_ifs:
            raise TableError(f"{where(open_ifs[-1][0])}: IF has no matching ENDIF")
        self._entries = entries

    def lookup(self, key: str) -> str | None:
        family = socket.AF_INET6 if ":" in key else socket.AF_INET
        try:
            address = int.from_bytes(socket.inet_pton(family, key), "big")
        except (OSError, ValueError):
            return None  # not an address: no match, as Postfix
        entries = self._entries
        i, n = 0, len(entries)
        while i < n:
            op, fam, network, mask, positive, value, jump = entries[i]
            if op == _OP_MATCH:
                if fam == family and ((address & mask) == network) is positive:
                    return value
            elif op == _OP_IF:
                if not (fam == family and ((address & mask) == network) is positive):
                    i = jump
            i += 1
        return None

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------
# hash: — SQLite index compiled from the postmap/postalias source
# --------------------------------------------------------------------------

_SQLITE_MAGIC = b"SQLite format 3\x00"
_INDEX_VERSION = "1"
_INDEX_CREATOR = "mailserver"


SQLITE_BUSY_TIMEOUT = 0.05  # seconds a sqlite: lookup waits for another program's write lock


def _connect_ro(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """Open an SQLite database read-only (URI mode=ro, query_only)."""
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=timeout)
    try:
        conn.execute("PRAGMA query_only = 1")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _is_sqlite_file(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError:
        return False
    return head == _SQLITE_MAGIC or head == b""


def _read_index_meta(conn: sqlite3.Connection) -> dict[str, str] | None:
    try:
        rows = conn.execute("SELECT name, value FROM meta").fetchall()
    except sqlite3.Error:
        return None
    meta = {str(k): str(v) for k, v in rows}
    return meta if meta.get("creator") == _INDEX_CREATOR else None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_source(path: str, spec: str) -> tuple[str, os.stat_result]:
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as fh:
            st = os.fstat(fh.fileno())
            return fh.read(), st
    except OSError as exc:
        raise TableError(f"{spec}: cannot read {path}: {exc.strerror}") from None


def _write_index(db_path: str, data: dict[str, str], fmt: str, src: os.stat_result) -> None:
    """Write the index atomically: temp file, fsync, rename, fsync dir.

    Raises OSError or sqlite3.Error when the directory is not writable.
    """
    directory = os.path.dirname(db_path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(db_path) + ".tmp.", dir=directory)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = OFF")  # the rename is the commit
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("BEGIN")
            conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE map (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
            conn.executemany(
                "INSERT OR REPLACE INTO map (key, value) VALUES (?, ?)",
                ((k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                 for k, v in data.items()))
            conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", [
                ("creator", _INDEX_CREATOR), ("version", _INDEX_VERSION), ("format", fmt),
                ("source_mtime_ns", str(src.st_mtime_ns)), ("source_size", str(src.st_size)),
            ])
            conn.execute("COMMIT")
        finally:
            conn.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if os.geteuid() == 0:
            try:  # as postmap(1): the index belongs to the owner of the source
                os.chown(tmp, src.st_uid, src.st_gid)
            except OSError:
                pass
        os.replace(tmp, db_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _build_index(path: str, db_path: str, fmt: str, spec: str) -> None:
    text, st = _read_source(path, spec)
    data = _parse_source(text, path, fmt)  # TableError names path:line
    _write_index(db_path, data, fmt, st)


_SELECT_VALUE = "SELECT value FROM map WHERE key = ?"


class _OwnsConnection:
    """A table that holds a read-only SQLite connection (``_conn`` under
    ``_lock``): :meth:`close` closes it, and so does dropping the table
    (a reload replaces tables; Python 3.13 warns about a connection left
    to the garbage collector)."""

    _conn: sqlite3.Connection | None
    _lock: threading.Lock

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (half-built, or at interpreter exit)
            pass


class HashTable(_OwnsConnection):
    """``hash:/path``: lookups go to the SQLite index ``/path.db``."""

    def __init__(self, spec: str, path: str, fmt: str = "postmap", warn: Warn = _no_warn):
        self.spec = spec
        self.path = path
        self.db_path = path + ".db"
        self.fmt = fmt
        self.warn = warn
        self.missing = False
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._memory: dict[str, str] | None = None
        self._src_sig: tuple[int, int, int] | None = None
        self._db_sig: tuple[int, int, int] | None = None
        self._open()

    @property
    def in_memory(self) -> bool:
        """True when the index could not be used and the source was read instead."""
        return self._memory is not None

    def _open(self) -> None:
        src_sig, db_sig = _file_sig(self.path), _file_sig(self.db_path)
        conn: sqlite3.Connection | None = None
        memory: dict[str, str] | None = None
        missing = False
        if src_sig is None and db_sig is None:
            self.warn(f"warning: {self.spec}: table file does not exist: {self.path}")
            memory, missing = {}, True
        elif src_sig is None:
            # No source: the index is all there is (as Postfix, which never
            # looks at the source).
            conn = self._open_index()
            if conn is None:
                self.warn(f"warning: {self.spec}: {self.db_path} is not a readable index "
                          f"and {self.path} does not exist")
                memory = {}
        else:
            conn = self._open_index(expect=src_sig)
            if conn is None:
                foreign = db_sig is not None and db_sig[1] > 0 and not self._is_ours()
                if foreign:
                    self.warn(f"warning: {self.spec}: {self.db_path} was not written by mailserver; "
                              f"not replacing it: reading {self.path} into memory")
                    memory = self._read_memory()
                else:
                    try:
                        _build_index(self.path, self.db_path, self.fmt, self.spec)
                        conn = self._open_index()
                    except (OSError, sqlite3.Error) as exc:
                        reason = getattr(exc, "strerror", None) or str(exc)
                        self.warn(f"warning: {self.spec}: cannot update {self.db_path}: {reason}: "
                                  f"reading {self.path} into memory")
                        conn = None
                    if conn is None:
                        memory = self._read_memory()
            src_sig = _file_sig(self.path)
        with self._lock:
            old, self._conn, self._memory = self._conn, conn, memory
            self._src_sig, self._db_sig, self.missing = src_sig, _file_sig(self.db_path), missing
        if old is not None:
            old.close()

    def _read_memory(self) -> dict[str, str]:
        text, _ = _read_source(self.path, self.spec)
        return _parse_source(text, self.path, self.fmt)

    def _is_ours(self) -> bool:
        if not _is_sqlite_file(self.db_path):
            return False
        try:
            conn = _connect_ro(self.db_path)
        except sqlite3.Error:
            return False
        try:
            return _read_index_meta(conn) is not None
        finally:
            conn.close()

    def _open_index(self, expect: tuple[int, int, int] | None = None) -> sqlite3.Connection | None:
        """Open the index if it is ours, current for ``expect`` and this format."""
        if not _is_sqlite_file(self.db_path):
            return None
        try:
            conn = _connect_ro(self.db_path)
        except sqlite3.Error:
            return None
        meta = _read_index_meta(conn)
        ok = meta is not None and meta.get("version") == _INDEX_VERSION
        if ok and expect is not None:
            assert meta is not None
            ok = (meta.get("format") == self.fmt
                  and meta.get("source_mtime_ns") == str(expect[0])
                  and meta.get("source_size") == str(expect[1]))
        if not ok:
            conn.close()
            return None
        return conn

    def lookup(self, key: str) -> str | None:
        memory = self._memory
        if memory is not None:
            return memory.get(key.lower())
        try:
            k = key.lower().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
        with self._lock:
            conn = self._conn
            if conn is None:
                return None
            try:
                row = conn.execute(_SELECT_VALUE, (k,)).fetchone()
            except sqlite3.Error as exc:
                raise TableLookupError(f"{self.spec}: lookup failed: {exc}") from None
        return None if row is None else bytes(row[0]).decode("utf-8", "surrogateescape")

    def keys(self) -> list[str]:
        memory = self._memory
        if memory is not None:
            return list(memory)
        with self._lock:
            if self._conn is None:
                return []
            rows = self._conn.execute("SELECT key FROM map").fetchall()
        return [bytes(r[0]).decode("utf-8", "surrogateescape") for r in rows]

    def reload_if_changed(self) -> bool:
        src_sig, db_sig = _file_sig(self.path), _file_sig(self.db_path)
        if src_sig == self._src_sig and db_sig == self._db_sig:
            return False
        # Gone: the source and its index, or the source of a table read into
        # memory (an index that is not ours) -- lookups go on as they were.
        if src_sig is None and (db_sig is None or self._memory is not None) and _kept_when_gone(self, self.path):
            self._src_sig, self._db_sig = None, db_sig
            return False
        try:
            self._open()
        except TableError as exc:
            self.warn(f"warning: {self.spec}: {exc}; keeping the previous version")
            self._src_sig, self._db_sig = _file_sig(self.path), _file_sig(self.db_path)
        return True


# --------------------------------------------------------------------------
# sqlite: — sqlite_table(5)
# --------------------------------------------------------------------------

_SQLITE_PARAMS = {"dbpath", "query", "result_format", "domain", "expansion_limit",
                  "table", "select_field", "where_field", "additional_conditions"}
_QUERY_CODES = set("sudSUD123456789")


def _percent_pieces(text: str, where: str, what: str) -> list[str | tuple[str]]:
    """Split text on db_common %-expansions: literals and ('x',) codes."""
    pieces: list[str | tuple[str]] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "%":
            literal.append(c)
            i += 1
            continue
        if i + 1 >= n:
            raise TableError(f"{where}: {what}: '%' at end of text (write %% for a percent sign)")
        d, i = text[i + 1], i + 2
        if d == "%":
            literal.append("%")
            continue
        if d not in _QUERY_CODES:
            raise TableError(f"{where}: {what}: invalid %{d} expansion")
        if literal:
            pieces.append("".join(literal))
            literal = []
        pieces.append((d,))
    if literal:
        pieces.append("".join(literal))
    return pieces


def compile_sql_query(query: str, where: str = "<query>") -> tuple[str, list[list[str | tuple[str]]]]:
    """sqlite_table(5) query -> (SQL with ? placeholders, parameter pieces).

    Every %-expansion becomes a bound parameter.  A quoted literal that
    holds expansions (``'%u@%d'``) becomes ``(? || ? || ?)`` with every
    piece bound; ``%%`` is a percent sign everywhere.  Nothing from a
    lookup key ever becomes SQL text.
    """
    out: list[str] = []
    params: list[list[str | tuple[str]]] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == "'":
            j, chars = i + 1, []
            while True:
                if j >= n:
                    raise TableError(f"{where}: query: unterminated quoted string")
                if query[j] == "'":
                    if query[j + 1 : j + 2] == "'":
                        chars.append("'")
                        j += 2
                        continue
                    break
                chars.append(query[j])
                j += 1
            pieces = _percent_pieces("".join(chars), where, "query")
            i = j + 1
            if not any(isinstance(p, tuple) for p in pieces):
                literal = "".join(p for p in pieces if isinstance(p, str))
                out.append("'" + literal.replace("'", "''") + "'")
            elif len(pieces) == 1:
                out.append("?")
                params.append(pieces)
            else:
                out.append("(" + " || ".join("?" for _ in pieces) + ")")
                params.extend([p] for p in pieces)
            continue
        if c == '"' or c == "`":
            j = query.find(c, i + 1)
            if j < 0:
                raise TableError(f"{where}: query: unterminated quoted identifier")
            if "%" in query[i:j]:
                raise TableError(f"{where}: query: %-expansions inside a quoted identifier are not supported")
            out.append(query[i : j + 1])
            i = j + 1
            continue
        if query.startswith("--", i):
            j = query.find("\n", i)
            j = n if j < 0 else j
            out.append(query[i:j])
            i = j
            continue
        if query.startswith("/*", i):
            j = query.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(query[i:j])
            i = j
            continue
        if c == "%":
            if i + 1 >= n:
                raise TableError(f"{where}: query: '%' at end of text")
            d = query[i + 1]
            if d == "%":
                out.append("%")
            elif d in _QUERY_CODES:
                out.append("?")
                params.append([(d,)])
            else:
                raise TableError(f"{where}: query: invalid %{d} expansion")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out), params


def _key_expansions(key: str) -> dict[str, str | None]:
    """db_common: %s, %u, %d and %1..%9 of a lookup key (None = suppress)."""
    local, at, domain = key.rpartition("@")
    values: dict[str, str | None] = {"s": key, "S": key}
    if at:
        values["u"] = values["U"] = local or None
        values["d"] = values["D"] = domain or None
        labels = domain.split(".")[::-1] if domain else []
    else:
        values["u"] = values["U"] = key
        values["d"] = values["D"] = None
        labels = []
    for n in range(1, 10):
        values[str(n)] = labels[n - 1] if n <= len(labels) and labels[n - 1] else None
    return values


class SqliteTable(_OwnsConnection):
    """``sqlite:/etc/mailserver/x.cf``: a parameterised read-only query."""

    def __init__(self, spec: str, path: str, warn: Warn = _no_warn):
        self.spec = spec
        self.path = path
        self.warn = warn
        self.missing = False
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._sig: tuple[int, int, int] | None = None
        self._load()

    def _load(self) -> None:
        sig = _file_sig(self.path)
        try:
            with open(self.path, "r", encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except OSError as exc:
            raise TableError(f"{self.spec}: cannot read {self.path}: {exc.strerror}") from None
        params: dict[str, str] = {}
        where = lambda n: f"{self.path}:{n}"  # noqa: E731
        for lineno, line in _readllines(text, where, self.warn):
            name, sep, value = line.partition("=")
            if not sep:
                raise TableError(f"{where(lineno)}: missing '=' after parameter name")
            name = name.strip()
            if name not in _SQLITE_PARAMS:
                self.warn(f"warning: {where(lineno)}: unknown sqlite_table parameter \"{name}\": ignored")
            params[name] = value.strip()
        dbpath = params.get("dbpath", "")
        if not dbpath:
            raise TableError(f"{self.path}: missing dbpath parameter")
        query = params.get("query", "")
        if not query:
            if not (params.get("table") and params.get("select_field") and params.get("where_field")):
                raise TableError(f"{self.path}: missing query parameter")
            query = (f"SELECT {params['select_field']} FROM {params['table']} "
                     f"WHERE {params['where_field']} = '%s' {params.get('additional_conditions', '')}").strip()
        sql, pieces = compile_sql_query(query, self.path)
        result_format = _percent_pieces(params.get("result_format", "%s"), self.path, "result_format")
        try:
            limit = int(params.get("expansion_limit", "0") or "0")
        except ValueError:
            raise TableError(f"{self.path}: expansion_limit must be a number") from None
        domains: set[str] = set()
        domain_tables: list[Table] = []
        for item in re.split(r"[\s,]+", params.get("domain", "")):
            if not item:
                continue
            if ":" in item and not item.startswith("["):
                domain_tables.append(open_table(item, warn=self.warn))
            else:
                domains.add(item.lower())
        try:
            # Lookups run on the event loop: a database another program holds
            # locked must not stall every session for sqlite's default 5 s.
            # Past this wait the lookup is a temporary failure (4xx, as
            # Postfix's dict_sqlite "database is locked" is).
            conn = _connect_ro(dbpath, timeout=SQLITE_BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise TableError(f"{self.spec}: cannot open database {dbpath}: {exc}") from None
        try:
            conn.execute("EXPLAIN " + sql, ["x"] * len(pieces)).fetchall()  # compile, don't run
        except (sqlite3.Error, sqlite3.Warning) as exc:
            conn.close()
            raise TableError(f"{self.spec}: query {sql!r} on {dbpath}: {exc}") from None
        with self._lock:
            old, self._conn = self._conn, conn
            self.dbpath, self.sql, self._pieces = dbpath, sql, pieces
            self._result_format, self._limit = result_format, limit
            self._domains, self._domain_tables = domains, domain_tables
            self._has_domain_filter = bool(domains or domain_tables)
            self._sig, self.missing = sig, False
        if old is not None:
            old.close()

    def _domain_ok(self, key: str) -> bool:
        local, at, domain = key.rpartition("@")
        if not at or not domain:
            return False
        if domain in self._domains:
            return True
        return any(t.lookup(domain) is not None for t in self._domain_tables)

    def lookup(self, key: str) -> str | None:
        key = key.lower()
        if not key:
            return None
        if self._has_domain_filter and not self._domain_ok(key):
            return None
        values = _key_expansions(key)
        args: list[str] = []
        for param in self._pieces:
            text = []
            for piece in param:
                if isinstance(piece, tuple):
                    v = values[piece[0]]
                    if v is None:
                        return None  # sqlite_table(5): the query is suppressed
                    text.append(v)
                else:
                    text.append(piece)
            args.append("".join(text))
        with self._lock:
            conn = self._conn
            if conn is None:
                return None
            try:
                rows = conn.execute(self.sql, args).fetchall()
            except UnicodeEncodeError:
                return None
            except sqlite3.Error as exc:
                raise TableLookupError(f"{self.spec}: query failed: {exc}") from None
        results: list[str] = []
        for row in rows:
            if not row or row[0] is None:
                continue
            value = row[0]
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            value = str(value)
            if not value:
                continue
            expanded = self._format_result(value, values)
            if expanded is None:
                continue
            results.append(expanded)
            if self._limit and len(results) > self._limit:
                raise TableLookupError(f"{self.spec}: expansion limit {self._limit} exceeded for key {key}")
        return ",".join(results) if results else None

    def _format_result(self, value: str, key_values: dict[str, str | None]) -> str | None:
        out = []
        local, at, domain = value.rpartition("@")
        for piece in self._result_format:
            if isinstance(piece, str):
                out.append(piece)
                continue
            code = piece[0]
            if code == "s":
                out.append(value)
            elif code == "u":
                if at and not local:
                    return None
                out.append(local if at else value)
            elif code == "d":
                if not at or not domain:
                    return None
                out.append(domain)
            else:
                v = key_values[code]
                if v is None:
                    return None
                out.append(v)
        return "".join(out)

    def reload_if_changed(self) -> bool:
        return _reload_changed(self)


# --------------------------------------------------------------------------
# unionmap: and pipemap:
# --------------------------------------------------------------------------


def _split_composite(name: str, spec: str) -> list[str]:
    body = name.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TableError(f"{spec}: expected {spec.partition(':')[0]}:{{type:name, type:name, ...}}")
    items, depth, cur = [], 0, []
    for ch in body[1:-1]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        items.append("".join(cur))
    if not items:
        raise TableError(f"{spec}: no tables listed")
    return items


class CompositeTable:
    """``unionmap:{...}`` (all answers, comma-joined) or ``pipemap:{...}``."""

    def __init__(self, spec: str, kind: str, tables: list[Table]):
        self.spec = spec
        self.kind = kind
        self.tables = tables

    def lookup(self, key: str) -> str | None:
        if self.kind == "pipemap":
            value: str | None = key
            for table in self.tables:
                value = table.lookup(value)
                if value is None:
                    return None
            return value
        results = [v for v in (t.lookup(key) for t in self.tables) if v is not None]
        return ",".join(results) if results else None

    def reload_if_changed(self) -> bool:
        changed = False
        for table in self.tables:
            reload = getattr(table, "reload_if_changed", None)
            if reload is not None and reload():
                changed = True
        return changed

    @property
    def missing(self) -> bool:
        return any(getattr(t, "missing", False) for t in self.tables)


# --------------------------------------------------------------------------
# Opening tables
# --------------------------------------------------------------------------

_IN_MEMORY_TYPES = ("texthash", "lmdb", "cdb", "dbm", "sdbm")
_INDEXED_TYPES = ("hash", "btree")


def open_table(spec: str, *, fmt: str = "postmap", warn: Warn = _no_warn) -> Table:
    kind, sep, name = spec.partition(":")
    if not sep:
        raise TableError(f"bad table {spec!r}: expected type:name")
    if kind == "static":
        value = name[1:-1].strip() if name.startswith("{") and name.endswith("}") else name
        return StaticTable(spec, value)
    if kind == "inline":
        return DictTable(spec, parse_inline(name, spec))
    if kind in _IN_MEMORY_TYPES:
        return FileTable(spec, _abspath(name), fmt, warn)
    if kind in _INDEXED_TYPES:
        return HashTable(spec, _abspath(name), fmt, warn)
    if kind in ("regexp", "pcre"):
        return RegexpTable(spec, name, kind, warn)
    if kind == "cidr":
        return CidrTable(spec, name, warn)
    if kind == "sqlite":
        return SqliteTable(spec, _abspath(name), warn)
    if kind in ("unionmap", "pipemap"):
        return CompositeTable(spec, kind, [open_table(s, fmt=fmt, warn=warn)
                                           for s in _split_composite(name, spec)])
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


def open_tables(specs: Iterable[str], *, fmt: str = "postmap", warn: Warn = _no_warn) -> TableList:
    return TableList([open_table(spec, fmt=fmt, warn=warn) for spec in specs if spec])


def compile_table(spec: str, fmt: str = "postmap") -> str:
    """postmap(1) / postalias(1): (re)build the index of a ``hash:`` table.

    Always rebuilds (replacing whatever ``/path.db`` was there) and
    returns the index path.  For ``texthash``, ``regexp``, ``pcre``,
    ``cidr`` and ``sqlite`` the source is only checked and its path
    returned.  Raises TableError naming file:line for a bad source, or
    when the source is missing or the index cannot be written.
    """
    kind, sep, name = spec.partition(":")
    if not sep:
        raise TableError(f"bad table {spec!r}: expected type:name")
    if kind in _INDEXED_TYPES:
        path = _abspath(name)
        try:
            _build_index(path, path + ".db", fmt, spec)
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise TableError(f"{spec}: cannot write {path}.db: {reason}") from None
        return path + ".db"
    if kind in _IN_MEMORY_TYPES + ("regexp", "pcre", "cidr", "sqlite"):
        table = open_table(spec, fmt=fmt)
        path = getattr(table, "path", None)
        if getattr(table, "missing", False):
            raise TableError(f"{spec}: table file does not exist: {path}")
        close = getattr(table, "close", None)
        if close is not None:
            close()
        return path or spec
    raise TableError(f"{spec}: table type {kind!r} cannot be compiled")


def query_table(spec: str, key: str, fmt: str = "postmap", *, warn: Warn = _no_warn) -> str | None:
    """postmap -q KEY TABLE: one lookup; a missing table file is an error."""
    table = open_table(spec, fmt=fmt, warn=warn)
    try:
        if getattr(table, "missing", False):
            raise TableError(f"{spec}: table file does not exist: {getattr(table, 'path', spec)}")
        return table.lookup(key)
    finally:
        close = getattr(table, "close", None)
        if close is not None:
            close()
