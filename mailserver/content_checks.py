"""Built-in content inspection: header_checks and body_checks.

Postfix's cleanup(8) compares each logical message header and each body
line with lookup tables (header_checks(5)); a match names an action.  This
module does the same for one message held in memory::

    checker = ContentChecker(["pcre:/etc/mailserver/header_checks"],
                             ["regexp:/etc/mailserver/body_checks"])
    result = checker.check(message, log_context=format_log_context(
        "unknown[1.2.3.4]", sender="a@b", recipient="c@d", proto="ESMTP", helo="h"))

Contract:

* ``check`` is pure, synchronous and fast: no I/O, no clock.  Table
  lookups are the only work per line.
* Header checks see one logical header at a time, as Postfix builds it:
  ``Name: value`` where a folded header keeps its line breaks as ``\\n``
  (``"Subject: a\\n b"``; CR is dropped) and ``Name : value`` becomes
  ``Name: value``.  They apply to the primary headers, to MIME part
  headers (``mime_header_checks``, default: the header_checks tables) and
  to the headers of attached messages (``nested_header_checks``, same
  default), as Postfix does unless disable_mime_input_processing is set.
* Body checks see every other line (MIME boundaries and the empty line
  after a header block included), in chunks of at most
  ``line_length_limit`` bytes, up to ``body_checks_size_limit`` bytes into
  each body segment (0 = no limit).
* Actions (case-insensitive): REJECT [text] (``550 5.7.1 text``; default
  ``5.7.1 message content rejected``; a text starting with ``4.x.x`` is a
  temporary ``451``), DISCARD [text], HOLD [text], WARN [text], INFO [text],
  IGNORE, PREPEND text, REPLACE text, DUNNO and OK.  FILTER, REDIRECT and
  BCC are not supported: they are ignored with a warning.  The first
  REJECT or DISCARD ends inspection (the returned message is then the
  original); HOLD does not.
* Edits never re-encode anything: every byte that no action touched is
  returned as it came in (when nothing was edited, the very same object).
  Inserted lines end like the line they were derived from (CRLF by default).
* Log lines follow cleanup's ``cleanup_act_log``: ``ACTION: header|body
  CONTENT from LOG_CONTEXT: TEXT`` with CONTENT cut at 200 characters and
  control characters shown as syslog shows them (``#012`` for a newline);
  the caller prefixes the queue ID.

Failure: table errors surface when the checker is built (TableError); a
table that fails at lookup time raises TableLookupError out of ``check``
(a temporary failure for the caller).  Problems with an action itself
(unknown command, PREPEND text that is not a header, unsupported FILTER)
are reported once per checker through ``warn`` and otherwise ignored, as
Postfix's msg_warn().
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .tables import TableList, open_tables

Warn = Callable[[str], None]


def _no_warn(text: str) -> None:
    pass


@dataclass
class ContentResult:
    action: str = "dunno"  # dunno | reject | discard | hold
    reply_text: str = ""  # reject: the text after the status code
    message: bytes = b""  # after IGNORE/PREPEND/REPLACE edits
    logs: list[str] = field(default_factory=list)
    status: str = ""  # reject: enhanced status code, "5.7.1" by default
    reply_code: int = 0  # reject: 550, or 451 when the status is 4.x.x
    edited: bool = False

    @property
    def reply(self) -> str:
        """The SMTP reply for a reject (``550 5.7.1 text``), else ''."""
        if self.action != "reject":
            return ""
        return f"{self.reply_code} {self.status} {self.reply_text}".rstrip()


def format_log_context(client: str, *, sender: str | None = None, recipient: str | None = None,
                       proto: str | None = None, helo: str | None = None) -> str:
    """The part of a cleanup log line after ``from ``.

    ``client`` is ``name[addr]`` (``local`` for local submission);
    ``sender`` "" is the null sender (``from=<>``), None omits the field.
    """
    text = f"{client or 'unknown'};"
    if sender is not None:
        text += f" from=<{sender}>"
    if recipient is not None:
        text += f" to=<{recipient}>"
    if proto:
        text += f" proto={proto}"
    if helo is not None:
        text += f" helo=<{helo}>"
    return text


# A header label as Postfix's is_header(): printable ASCII except ':',
# optional blanks, then ':'.
_HEADER_LABEL = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_HEADER_TEXT = re.compile(r"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_MIME_HEADERS = frozenset({b"content-type", b"content-transfer-encoding", b"content-disposition",
                           b"content-description", b"content-id", b"mime-version"})
_CONTENT_TYPE = re.compile(r"\s*([^\s/;()]+)\s*/\s*([^\s;()]+)")
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))', re.IGNORECASE)
_ACTION = re.compile(r"([^ \t]*)\s*(.*)", re.DOTALL)
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

_HEADER_CHECKS = "header_checks"
_MIME_HEADER_CHECKS = "mime_header_checks"
_NESTED_HEADER_CHECKS = "nested_header_checks"
_BODY_CHECKS = "body_checks"

_KEEP, _DROP, _REPLACE, _PREPEND = 0, 1, 2, 3


def _loggable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "replace").decode(
            "utf-8", "replace")
    return _CONTROL.sub(lambda m: f"#{ord(m.group()):03o}", text)


def _only_escapes(text: str) -> bool:
    return all(not ("\ud800" <= ch <= "\udfff") or "\udc80" <= ch <= "\udcff" for ch in text)


def _encode(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _as_tables(specs: Sequence[str] | TableList, warn: Warn) -> TableList:
    if isinstance(specs, TableList):
        return specs
    return open_tables(specs, warn=warn)


class ContentChecker:
    """header_checks / mime_header_checks / nested_header_checks / body_checks."""

    def __init__(self, header_checks: Sequence[str] | TableList, body_checks: Sequence[str] | TableList, *,
                 body_checks_size_limit: int = 51200, warn: Warn = _no_warn,
                 mime_header_checks: Sequence[str] | TableList | None = None,
                 nested_header_checks: Sequence[str] | TableList | None = None,
                 disable_mime_input_processing: bool = False,
                 line_length_limit: int = 2048, header_size_limit: int = 102400,
                 mime_nesting_limit: int = 100):
        self.warn = warn
        self.header_checks = _as_tables(header_checks, warn)
        self.mime_header_checks = (self.header_checks if mime_header_checks is None
                                   else _as_tables(mime_header_checks, warn))
        self.nested_header_checks = (self.header_checks if nested_header_checks is None
                                     else _as_tables(nested_header_checks, warn))
        self.body_checks = _as_tables(body_checks, warn)
        self.body_checks_size_limit = body_checks_size_limit
        self.disable_mime_input_processing = disable_mime_input_processing
        self.line_length_limit = max(1, line_length_limit)
        self.header_size_limit = header_size_limit
        self.mime_nesting_limit = mime_nesting_limit
        self._warned: set[str] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.header_checks or self.mime_header_checks
                    or self.nested_header_checks or self.body_checks)

    def reload_if_changed(self) -> None:
        seen: set[int] = set()
        for tables in (self.header_checks, self.mime_header_checks, self.nested_header_checks, self.body_checks):
            if id(tables) not in seen:
                seen.add(id(tables))
                tables.reload_if_changed()

    def warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self.warn(text)

    def check(self, message: bytes, *, log_context: str) -> ContentResult:
        if not self.enabled:
            return ContentResult(message=message)
        return _Inspection(self, message, log_context).run()


class _Inspection:
    """One pass over one message (the state of cleanup's mime_state)."""

    def __init__(self, checker: ContentChecker, message: bytes, log_context: str):
        self.c = checker
        self.msg = message
        self.log_context = log_context
        self.result = ContentResult(message=message)
        self.edits: list[tuple[int, int, bytes]] = []
        self.stopped = False
        self.hold = False

    # ------------------------------------------------------------------ scan

    def _line(self, pos: int) -> tuple[bytes, bytes, int]:
        msg = self.msg
        j = msg.find(b"\n", pos)
        if j < 0:
            return msg[pos:], b"", len(msg)
        if j > pos and msg[j - 1] == 13:
            return msg[pos : j - 1], b"\r\n", j + 1
        return msg[pos:j], b"\n", j + 1

    def run(self) -> ContentResult:
        c, msg = self.c, self.msg
        n = len(msg)
        mime = not c.disable_mime_input_processing
        body_checks = c.body_checks if c.body_checks else None
        limit = c.body_checks_size_limit
        in_headers, block = True, _HEADER_CHECKS
        ctype: tuple[str, str] = ("text", "plain")
        stack: list[tuple[bytes, tuple[str, str]]] = []  # (boundary, default part type)
        body_offset = 0
        pos = 0
        while pos < n and not self.stopped:
            content, eol, nxt = self._line(pos)
            nested_next = False
            if in_headers:
                m = _HEADER_LABEL.match(content)
                if m:
                    end, parts, last_eol = nxt, [content], eol
                    while end < n and msg[end] in (0x20, 0x09):
                        more, last_eol, end = self._line(end)
                        parts.append(more)
                    found = self._header(pos, end, parts, m, block, eol, last_eol)
                    if mime and found is not None:
                        ctype = found[0]
                        if found[1] is not None and len(stack) < c.mime_nesting_limit:
                            stack.append(found[1])
                    pos = end
                    continue
                # The end of a header block: this line starts a body.
                in_headers = False
                body_offset = 0
                nested_next = mime and content == b"" and ctype == ("message", "rfc822")
            if mime and stack and content.startswith(b"--"):
                for depth in range(len(stack) - 1, -1, -1):
                    boundary, part_type = stack[depth]
                    if content.startswith(boundary, 2):
                        del stack[depth + 1 :]
                        if content.startswith(b"--", 2 + len(boundary)):
                            stack.pop()
                            in_headers, ctype = False, ("other", "other")
                        else:
                            in_headers, block, ctype = True, _MIME_HEADER_CHECKS, part_type
                        nested_next = False
                        break
            if body_checks is not None and (limit <= 0 or body_offset < limit):
                self._body(pos, content, eol, body_checks)
            body_offset += len(content) + 1
            if nested_next:
                in_headers, block, ctype = True, _NESTED_HEADER_CHECKS, ("text", "plain")
            pos = nxt
            if (not in_headers and not stack
                    and (body_checks is None or (limit > 0 and body_offset >= limit))):
                break  # nothing left that any check could see
        return self._finish()

    def _finish(self) -> ContentResult:
        result = self.result
        if result.action in ("reject", "discard") or not self.edits:
            return result
        msg, pieces, last = self.msg, [], 0
        for start, end, data in self.edits:
            pieces.append(msg[last:start])
            pieces.append(data)
            last = end
        pieces.append(msg[last:])
        result.message = b"".join(pieces)
        result.edited = True
        return result

    # ------------------------------------------------------------------ headers

    def _header(self, start: int, end: int, parts: list[bytes], label: re.Match[bytes], block: str,
                first_eol: bytes, last_eol: bytes):
        """Check one logical header; return its MIME type info if Content-Type."""
        c = self.c
        name = label.group(1)
        first = parts[0]
        key_bytes = name + first[label.end() - 1 :]
        if len(parts) > 1:
            key_bytes += b"".join(b"\n" + p for p in parts[1:])
        key = _decode(key_bytes)
        if len(key) > c.header_size_limit:
            key = key[: c.header_size_limit]
        lname = name.lower()
        found = None
        if lname == b"content-type":
            found = _parse_content_type(key)
        if lname in _MIME_HEADERS or block == _MIME_HEADER_CHECKS:
            tables, map_class = c.mime_header_checks, _MIME_HEADER_CHECKS
        elif block == _NESTED_HEADER_CHECKS:
            tables, map_class = c.nested_header_checks, _NESTED_HEADER_CHECKS
        else:
            tables, map_class = c.header_checks, _HEADER_CHECKS
        if tables:
            value = tables.lookup(key)
            if value is not None:
                what, text = self._act("header", key, value, map_class)
                if what == _DROP:
                    self.edits.append((start, end, b""))
                elif what == _REPLACE:
                    self.edits.append((start, end, _encode(text) + (last_eol or b"\r\n")))
                elif what == _PREPEND:
                    self.edits.append((start, start, _encode(text) + (first_eol or b"\r\n")))
        return found

    # ------------------------------------------------------------------ body

    def _body(self, pos: int, content: bytes, eol: bytes, tables: TableList) -> None:
        size = self.c.line_length_limit
        if len(content) <= size:
            spans = [(0, len(content))]
        else:
            spans = [(i, min(i + size, len(content))) for i in range(0, len(content), size)]
        whole_line = len(spans) == 1
        for begin, end in spans:
            key = _decode(content[begin:end])
            value = tables.lookup(key)
            if value is None:
                continue
            what, text = self._act("body", key, value, _BODY_CHECKS)
            start, stop = pos + begin, pos + end
            if what == _DROP:
                self.edits.append((start, stop + (len(eol) if whole_line else 0), b""))
            elif what == _REPLACE:
                self.edits.append((start, stop, _encode(text)))
            elif what == _PREPEND:
                self.edits.append((start, start, _encode(text) + (eol or b"\r\n")))
            if self.stopped:
                return

    # ------------------------------------------------------------------ actions

    def _log(self, action: str, context: str, content: str, text: str) -> None:
        line = f"{action}: {context} {_loggable(content[:200])} from {self.log_context}"
        if text:
            line += f": {_loggable(text)}"
        self.result.logs.append(line)

    def _act(self, context: str, content: str, value: str, map_class: str) -> tuple[int, str]:
        """cleanup_act(): perform one table result on one header or line."""
        m = _ACTION.match(value)
        assert m is not None
        command, text = m.group(1).upper(), m.group(2)
        result = self.result
        if command == "REJECT":
            if text:
                reason = text if _DSN.match(text) else f"5.7.1 {text}"
                if reason[0] not in "45":
                    self.c.warn_once(f"warning: bad DSN action in {text} -- need 4.x.x or 5.x.x")
                    reason = "4" + reason[1:]
            else:
                reason = "5.7.1 message content rejected"
            self._log("reject", context, content, reason)
            status, _, reply_text = reason.partition(" ")
            result.action, result.status, result.reply_text = "reject", status, reply_text.strip()
            result.reply_code = 451 if status.startswith("4") else 550
            self.stopped = True
            return _KEEP, ""
        if command == "DISCARD":
            self._log("discard", context, content, text)
            result.action = "discard"
            self.stopped = True
            return _KEEP, ""
        if command == "HOLD":
            if not self.hold:
                self._log("hold", context, content, text)
                self.hold = True
                result.action = "hold"
            return _KEEP, ""
        if command == "WARN":
            self._log("warning", context, content, text)
            return _KEEP, ""
        if command == "INFO":
            self._log("info", context, content, text)
            return _KEEP, ""
        if command == "IGNORE":
            return _DROP, ""
        if command in ("DUNNO", "OK"):
            return _KEEP, ""
        if command in ("PREPEND", "REPLACE"):
            if not text:
                self.c.warn_once(f"warning: {command} action without text in {map_class} map")
                return _KEEP, ""
            if context == "header" and not _HEADER_TEXT.match(text):
                self.c.warn_once(f"warning: bad {command} header text \"{text}\" in {map_class} map -- "
                                 "need \"headername: headervalue\"")
                return _KEEP, ""
            self._log(command.lower(), context, content, text)
            return (_PREPEND if command == "PREPEND" else _REPLACE), text
        if command in ("FILTER", "REDIRECT", "BCC"):
            self.c.warn_once(f"warning: {map_class} map: {command} action is not supported: ignored")
            return _KEEP, ""
        self.c.warn_once(f"warning: unknown command in {map_class} map: {value}")
        return _KEEP, ""


def _parse_content_type(key: str) -> tuple[tuple[str, str], tuple[bytes, tuple[str, str]] | None]:
    """Content-Type header -> ((type, subtype), (boundary, part default) | None)."""
    value = key.partition(":")[2].replace("\n", "")
    m = _CONTENT_TYPE.match(value)
    if m is None:
        return ("text", "plain"), None
    ctype = (m.group(1).lower(), m.group(2).lower())
    if ctype[0] != "multipart":
        return ctype, None
    b = _BOUNDARY.search(value, m.end())
    if b is None:
        return ctype, None
    boundary = b.group(1) if b.group(1) is not None else b.group(2)
    if b.group(1) is not None:
        boundary = re.sub(r"\\(.)", r"\1", boundary)
    if not boundary:
        return ctype, None
    part_default = ("message", "rfc822") if ctype[1] == "digest" else ("text", "plain")
    return ctype, (_encode(boundary), part_default)
