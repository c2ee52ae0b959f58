"""Message cleanup: the in-process equivalent of Postfix cleanup(8).

Responsibility
    Turn the message content received from a client (SMTP DATA/BDAT, local
    submission) into the form that is stored in the queue:

    * prepend our own ``Received:`` header (built by :func:`received_header`,
      Postfix builds it in smtpd(8), ``smtpd.c``);
    * find the primary header section exactly like Postfix' MIME state
      machine does (``is_header()`` + continuation lines) and count the
      ``Received:`` headers for the caller's ``hopcount_limit`` check;
    * for mail that is subject to header rewriting (Postfix:
      ``local_header_rewrite_clients`` / ``always_add_missing_headers``; here
      the *caller* decides and passes ``add_missing_headers``) append missing
      ``Message-ID:``, ``Date:``, ``From:`` and ``To:`` headers and qualify
      bare ``user`` addresses in address headers with ``@$myorigin``
      (Postfix ``append_at_myorigin``).

Contract
    * PURE: no I/O, no clock reads (``now``/``when`` are passed in), no
      randomness.  The only environmental input is the process time zone,
      used to render local-time RFC 5322 dates as Postfix' ``mail_date()``
      does.
    * Message bytes are the stored form: CRLF line endings, no dot-stuffing,
      header section, empty line, body.  The output always has that form,
      including the empty separator line, even when the input had none.
    * The body is never parsed or re-encoded: the bytes after the header
      section pass through byte-identical (8-bit, NULs, bare CR/LF and all).
    * Header fields that are not rewritten keep their original bytes; only
      their line terminators are normalised to CRLF (a no-op for stored-form
      input).
    * Every header value built from envelope or client data goes through
      :func:`sanitize_header_value`, so it can never introduce a line break
      (header injection) or a control character.

Failure modes
    * ``TypeError`` if ``message``/``received`` are not ``bytes``.
    * ``ValueError`` if ``received`` is not a well-formed header block (it is
      produced by our own code, so this is a programming error).
    * Nothing else raises: malformed content is handled the Postfix way (the
      first line that is neither a header nor a continuation starts the
      body).  Size and hop-count *limits* are the caller's policy; this
      module only reports ``hop_count`` and ``header_size``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, getaddresses

__all__ = [
    "CleanupResult",
    "cleanup_message",
    "count_received",
    "header_section",
    "quote_822_local",
    "received_header",
    "rfc5322_date",
    "sanitize_header_value",
]

CRLF = b"\r\n"

# Postfix MAIL_ADDR_MAIL_DAEMON; used as From: for the null sender.
MAILER_DAEMON = "MAILER-DAEMON"

# Postfix undisclosed_recipients_header default (mail_params.h,
# DEF_RCPT_WITHELD).
UNDISCLOSED_RECIPIENTS_HEADER = "To: undisclosed-recipients:;"

# Length limit for each client-supplied value in the Received: header.
RECEIVED_VALUE_LIMIT = 255

# Postfix is_header(): a header label is one or more printable ASCII
# characters other than SP and ":", optionally followed by whitespace (RFC
# 822 section 3.4.2 / RFC 5322 section 4.5 obsolete syntax), then ":".
_HEADER_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")

# RFC 5322 section 3.2.3 atext, extended with non-ASCII for RFC 6532.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM_RE = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_ATOM_B_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\xff]+"
                            rb"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\xff]+)*")

# Address headers whose bare "user" addresses are qualified with @myorigin
# (Postfix header_opts.c: HDR_OPT_SENDER / HDR_OPT_RECIP / HDR_OPT_XRECIP).
_ADDRESS_HEADERS = frozenset({
    b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc",
    b"resent-from", b"resent-sender", b"resent-reply-to",
    b"resent-to", b"resent-cc", b"resent-bcc",
})

# Headers whose presence suppresses undisclosed_recipients_header.  Postfix
# (cleanup_message.c, VISIBLE_RCPT) looks at (Resent-)To/Cc; it also drops
# Bcc via message_drop_headers.  We do not drop Bcc, so a Bcc-only message
# (legal per RFC 5322 section 3.6.3) is left alone as well.
_DESTINATION_HEADERS = frozenset({
    b"to", b"cc", b"bcc", b"resent-to", b"resent-cc", b"resent-bcc",
})

# Quick per-element shapes for address qualification (see _qualify_field).
_ANGLE_RE = re.compile(rb"(?P<name>[^<>]*)<(?P<addr>[^<>]*)>", re.S)
_BARE_RE = re.compile(rb"[^\s<>]+")
# Anything that makes an address header "odd": quoted strings, comments,
# groups, domain literals, quoted-pairs, encoded words.  Left untouched.
_ODD_BYTES = re.compile(rb'["()\\;:\[\]]')


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """Result of :func:`cleanup_message`."""

    message: bytes          # the cleaned message (CRLF, stored form)
    message_id: str         # Message-ID value (existing or added); "" if none
    hop_count: int          # Received: headers in the ORIGINAL message
    header_size: int        # bytes of the output header section (see header_section)


# ---------------------------------------------------------------------------
# Sanitising and quoting
# ---------------------------------------------------------------------------

def sanitize_header_value(value: str, limit: int = 998) -> str:
    """Make ``value`` safe to place inside one header line.

    * C0 controls (including CR, LF, NUL, TAB), DEL and C1 controls are
      removed, so a value can never start a new header line (RFC 5322
      section 2.2: a field body must not contain CR or LF except in folding).
    * Any other character that is not printable (lone surrogates from a
      ``surrogateescape`` decode, format characters such as bidi overrides,
      unassigned code points, non-SP separators) becomes ``?``.  Printable
      non-ASCII is kept (RFC 6532 UTF-8 headers).
    * The result is truncated to ``limit`` characters (RFC 5322 section
      2.1.1: 998 is the hard line length limit).
    """
    if value.isascii() and value.isprintable():
        return value[:limit]  # the common case: nothing to remove or replace
    out: list[str] = []
    for ch in value:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
            continue
        if ch == " " or ch.isprintable():
            out.append(ch)
        else:
            out.append("?")
        if len(out) >= limit:
            break
    return "".join(out)


def _comment_sanitize(text: str) -> str:
    """Balance parentheses so ``text`` cannot escape an RFC 5322 comment.

    Mirrors Postfix comment_sanitize(): unmatched ``)`` are dropped and
    missing ``)`` are appended.  A trailing backslash (quoted-pair opener)
    is dropped as well.
    """
    if "(" not in text and ")" not in text:
        return text.rstrip("\\")  # the common case (host names, addresses)
    depth = 0
    out: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                continue
            depth -= 1
        out.append(ch)
    result = "".join(out).rstrip("\\")
    return result + ")" * depth


def quote_822_local(address: str) -> str:
    """Quote the local part of ``address`` if it is not a dot-atom.

    Postfix quote_822_local(): internal (unquoted) address form to RFC 5322
    external form.  ``a b@x`` becomes ``"a b"@x``.  The null address stays
    empty.  An already quoted local part is left alone.
    """
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if not _DOT_ATOM_RE.fullmatch(local) and not (
        len(local) >= 2 and local.startswith('"') and local.endswith('"')
    ):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return local + at + domain


def rfc5322_date(when: float) -> str:
    """RFC 5322 section 3.3 date of ``when`` in the local time zone.

    Like Postfix mail_date() minus the trailing ``(TZ)`` comment, e.g.
    ``Sat, 21 Nov 2026 10:00:00 +0000``.
    """
    global _date_cache
    second = math.floor(when)
    cached = _date_cache
    if cached[0] == second and cached[2] == time.timezone and cached[3] == time.altzone:
        return cached[1]
    text = format_datetime(datetime.fromtimestamp(when, timezone.utc).astimezone())
    _date_cache = (second, text, time.timezone, time.altzone)
    return text


# rfc5322_date of the last second asked for (every message of a second has
# the same Date/Received time stamp); keyed by the time zone too (tzset()).
_date_cache: tuple = (None, "", None, None)


# ---------------------------------------------------------------------------
# Received: header (Postfix smtpd.c)
# ---------------------------------------------------------------------------

def _client_value(value: str) -> str:
    return sanitize_header_value(value, RECEIVED_VALUE_LIMIT).strip()


def received_header(
    *,
    helo: str,
    client_hostname: str,
    client_addr: str,
    myhostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: float,
    tls_comment: str = "",
    mail_name: str = "mailserver",
) -> bytes:
    """Build our ``Received:`` header exactly in the Postfix smtpd(8) layout.

    ::

        Received: from HELO (CLIENT-NAME [CLIENT-ADDR])
        \\t(using TLSv1.3 with cipher ... (256/256 bits))      <- tls_comment
        \\tby MYHOSTNAME (MAIL-NAME) with PROTOCOL id QUEUE-ID
        \\tfor <RCPT>; DATE

    Without exactly one recipient (``recipient is None``) the last two lines
    are ``by ... id QUEUE-ID;`` and ``\\tDATE`` (smtpd.c, ``rcpt_count == 1``).

    ``tls_comment`` goes where Postfix puts ``smtpd_tls_received_header``
    output: its own folded line(s) between the ``from`` and ``by`` lines.
    It may hold several lines separated by ``\\n``; each line is wrapped in
    parentheses unless it already is.

    Client-derived values (``helo``, ``client_hostname``, ``client_addr``,
    ``recipient``) are sanitised (:func:`sanitize_header_value`) and limited
    to 255 characters; an empty HELO is replaced by the client name and an
    empty client name by ``unknown`` (Postfix CLIENT_NAME_UNKNOWN).  The
    other values are sanitised too, so no argument can add a header line.
    """
    name = _comment_sanitize(_client_value(client_hostname)) or "unknown"
    addr = _comment_sanitize(_client_value(client_addr)) or "unknown"
    helo_v = _client_value(helo) or name
    host = sanitize_header_value(myhostname, RECEIVED_VALUE_LIMIT).strip()
    mname = _comment_sanitize(sanitize_header_value(mail_name, 64).strip())
    proto = sanitize_header_value(protocol, 32).strip()
    qid = sanitize_header_value(queue_id, 64).strip()
    date = rfc5322_date(when)

    lines = [f"Received: from {helo_v} ({name} [{addr}])"]
    for raw in tls_comment.splitlines():
        text = sanitize_header_value(raw, RECEIVED_VALUE_LIMIT).strip()
        if not text:
            continue
        if text.startswith("(") and text.endswith(")"):
            text = text[1:-1]
        lines.append(f"\t({_comment_sanitize(text)})")
    rcpt = _client_value(recipient) if recipient is not None else None
    if rcpt is not None:
        lines.append(f"\tby {host} ({mname}) with {proto} id {qid}")
        lines.append(f"\tfor <{quote_822_local(rcpt)}>; {date}")
    else:
        lines.append(f"\tby {host} ({mname}) with {proto} id {qid};")
        lines.append(f"\t{date}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


# ---------------------------------------------------------------------------
# Header section parsing (Postfix mime_state.c + is_header.c)
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class _Field:
    name: bytes                 # lower-cased label, without trailing blanks
    lines: list[bytes]          # physical lines WITHOUT line terminators


@dataclass(slots=True)
class _Parsed:
    fields: list[_Field]
    header_end: int             # offset just past the last header line
    body_start: int             # offset of the first body byte


def _parse(message: bytes) -> _Parsed:
    """Split ``message`` into header fields and the body offset.

    Rules (Postfix mime_state_update() for the primary headers):

    * a line that is empty (``CRLF``, or a bare ``LF``) ends the header
      section; it is the separator and not part of the body;
    * a line starting with SP/TAB continues the previous header;
    * a line for which is_header() holds starts a new header;
    * any other line -- including a leading SP/TAB line before the first
      header, and an mbox ``From `` line -- starts the body *without* a
      separator (the caller inserts one);
    * end of input without any of the above: everything is headers.
    """
    if not isinstance(message, (bytes, bytearray)):
        raise TypeError("message must be bytes")
    fields: list[_Field] = []
    pos = 0
    n = len(message)
    while pos < n:
        eol = message.find(b"\n", pos)
        nxt = n if eol < 0 else eol + 1
        line = message[pos:nxt if eol < 0 else eol]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return _Parsed(fields, pos, nxt)
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return _Parsed(fields, pos, pos)
            fields[-1].lines.append(line)
        elif m := _HEADER_RE.match(line):
            label = m.group(0)[:-1].rstrip(b" \t").lower()
            fields.append(_Field(label, [line]))
        else:
            return _Parsed(fields, pos, pos)
        pos = nxt
    return _Parsed(fields, n, n)


def _field_value(field: _Field) -> str:
    """Unfolded, stripped value of a field (RFC 5322 section 2.2.3)."""
    raw = b"".join(field.lines)
    value = raw[raw.index(b":") + 1:]
    return value.decode("utf-8", "replace").strip()


def header_section(message: bytes) -> bytes:
    """The bytes of the header section: up to, not including, the empty
    separator line (so the last header's CRLF is included).  For content
    without a separator this ends before the first non-header line."""
    return bytes(message[:_parse(message).header_end])


def count_received(message: bytes) -> int:
    """Number of ``Received:`` headers (case-insensitive) in the header
    section of ``message`` (Postfix cleanup hop_count)."""
    return sum(1 for f in _parse(message).fields if f.name == b"received")


# ---------------------------------------------------------------------------
# Address qualification (Postfix cleanup_rewrite_sender/recip, "local"
# rewrite context: append_at_myorigin)
# ---------------------------------------------------------------------------

def _qualify_field(raw: bytes, origin: bytes) -> bytes | None:
    """Return ``raw`` (one complete header field, CRLF-terminated lines)
    with bare ``user`` addresses qualified as ``user@origin``, or None when
    nothing needs to change or the value is too odd to touch safely.

    Only simple comma-separated lists of ``addr`` or ``Name <addr>`` are
    rewritten; quoted strings, comments, groups, domain literals and
    anything :func:`email.utils.getaddresses` disagrees with are left alone.
    Whitespace and folding are preserved (only the address token changes).
    """
    colon = raw.index(b":")
    head, value = raw[:colon + 1], raw[colon + 1:]
    if _ODD_BYTES.search(value) or b"=?" in value:
        return None
    pieces = value.split(b",")
    expected: list[bytes] = []
    out: list[bytes] = []
    changed = False
    for piece in pieces:
        core = piece.strip(b" \t\r\n")
        if not core:
            return None
        m = _ANGLE_RE.fullmatch(core)
        if m:
            addr = m.group("addr").strip(b" \t\r\n")
        elif _BARE_RE.fullmatch(core):
            addr = core
        else:
            return None
        if not addr or b"@" in addr:
            expected.append(addr)
            out.append(piece)
            continue
        if not _DOT_ATOM_B_RE.fullmatch(addr):
            return None
        expected.append(addr)
        new_addr = addr + b"@" + origin
        if m:
            a0 = m.start("addr") + m.group("addr").index(addr)
            new_core = core[:a0] + new_addr + core[a0 + len(addr):]
        else:
            new_core = new_addr
        idx = piece.index(core)
        out.append(piece[:idx] + new_core + piece[idx + len(core):])
        changed = True
    if not changed:
        return None
    # Cross-check our reading with the stdlib parser; disagree -> untouched.
    unfolded = value.replace(b"\r\n", b"").decode("utf-8", "surrogateescape")
    parsed = getaddresses([unfolded])
    if [a for _, a in parsed] != [a.decode("utf-8", "surrogateescape") for a in expected]:
        return None
    return head + b",".join(out)


# ---------------------------------------------------------------------------
# cleanup_message
# ---------------------------------------------------------------------------

def _valid_received_block(received: bytes) -> bytes:
    if not isinstance(received, (bytes, bytearray)):
        raise TypeError("received must be bytes")
    received = bytes(received)
    if not received:
        return received
    if not received.endswith(CRLF):
        received += CRLF
    lines = received[:-2].split(CRLF)
    if not _HEADER_RE.match(lines[0]) or any(
        not line or (line[:1] not in (b" ", b"\t") and not _HEADER_RE.match(line))
        or b"\n" in line or b"\r" in line
        for line in lines
    ):
        raise ValueError("received must be a well-formed CRLF header block")
    return received


def _qualified(address: str, domain: str) -> str:
    if "@" in address:
        return address
    return f"{address}@{domain}"


def cleanup_message(
    message: bytes,
    *,
    received: bytes,
    queue_id: str,
    myhostname: str,
    myorigin: str,
    sender: str,
    now: float,
    add_missing_headers: bool,
    recipients: list[str] | None = None,
) -> CleanupResult:
    """Clean one message; see the module docstring for the contract.

    ``received`` (may be empty) is prepended verbatim.  With
    ``add_missing_headers`` (Postfix: the client matches
    ``local_header_rewrite_clients``, or ``always_add_missing_headers``)
    missing headers are appended at the END of the header section, in
    Postfix order (cleanup_header_done_callback):

    * ``Message-ID: <YYYYmmddHHMMSS.QUEUEID@myhostname>`` (UTC time stamp);
    * ``Date: <RFC 5322 local date of now>``;
    * ``From: <sender>`` -- qualified with ``@myorigin`` if bare; the null
      sender becomes ``MAILER-DAEMON@myhostname``;
    * ``To: undisclosed-recipients:;`` when there is no To/Cc/Bcc (or
      Resent- variant);

    and bare ``user`` addresses in From/Sender/Reply-To/To/Cc/Bcc (and their
    Resent- variants) are qualified with ``@myorigin`` (simple cases only).

    ``recipients`` (the envelope recipients) is accepted for interface
    stability but deliberately never copied into headers (that would
    disclose Bcc recipients); it does not influence the result.

    ``hop_count`` counts ``Received:`` headers of the ORIGINAL message, not
    the one prepended here: Postfix' check ``++hop_count >= hopcount_limit``
    (which includes its own header) is ``hop_count + 1 >= limit`` here.
    """
    del recipients  # see docstring
    received = _valid_received_block(received)
    parsed = _parse(message)
    fields = parsed.fields
    names = {f.name for f in fields}
    hop_count = sum(1 for f in fields if f.name == b"received")

    message_id = ""
    for f in fields:
        if f.name == b"message-id":
            message_id = _field_value(f)
            break

    out = bytearray(received)
    origin = sanitize_header_value(myorigin, 255).strip()
    origin_b = origin.encode("utf-8")
    for f in fields:
        raw = b"".join(line + CRLF for line in f.lines)
        if add_missing_headers and origin and f.name in _ADDRESS_HEADERS:
            raw = _qualify_field(raw, origin_b) or raw
        out += raw

    if add_missing_headers:
        host = sanitize_header_value(myhostname, 255).strip()
        added: list[str] = []
        if b"message-id" not in names:
            stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d%H%M%S")
            qid = sanitize_header_value(queue_id, 64).strip()
            message_id = f"<{stamp}.{qid}@{host}>"
            added.append(f"Message-ID: {message_id}")
        if b"date" not in names:
            added.append(f"Date: {rfc5322_date(now)}")
        if b"from" not in names:
            env = sanitize_header_value(sender).strip()
            if env:
                from_addr = _qualified(env, origin or host)
            else:
                from_addr = f"{MAILER_DAEMON}@{host}"
            added.append(f"From: {quote_822_local(from_addr)}")
        if not names & _DESTINATION_HEADERS:
            added.append(UNDISCLOSED_RECIPIENTS_HEADER)
        for header in added:
            out += sanitize_header_value(header).encode("utf-8") + CRLF

    header_size = len(out)
    out += CRLF
    out += message[parsed.body_start:]
    return CleanupResult(
        message=bytes(out),
        message_id=message_id,
        hop_count=hop_count,
        header_size=header_size,
    )
