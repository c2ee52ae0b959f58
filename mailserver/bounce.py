"""Delivery status notifications: the in-process equivalent of Postfix bounce(8).

Responsibility
    Build the bytes of an RFC 3464 delivery status notification (a
    ``multipart/report; report-type=delivery-status`` message, RFC 6522) for
    one original message and one or more failed or delayed recipients, in
    the layout and wording of Postfix (``bounce_notify_util.c``, built-in
    templates in ``bounce_templates.c``):

    1. ``text/plain`` human-readable notification (Postfix failure_template
       or delay_template text, then ``<rcpt>: reason`` per recipient);
    2. ``message/delivery-status``: per-message fields, then one block per
       recipient (RFC 3464 sections 2.2 and 2.3);
    3. the original: ``text/rfc822-headers`` (default) or ``message/rfc822``
       when ``return_full`` and the original fits ``bounce_size_limit``.

Contract
    * PURE: no I/O, no clock reads (``now``, ``arrival_time`` and the
      ``last_attempt`` times are passed in), no randomness (the caller
      passes ``boundary`` and ``message_id_suffix``).  Dates are rendered in
      the process time zone like Postfix mail_date().
    * Output is the stored form: CRLF lines, no dot-stuffing.  It is meant
      to be queued with the null envelope sender (:func:`dsn_sender`, RFC
      5321 section 4.5.5) to the original envelope sender.
    * Every value that comes from the envelope, the remote side or the
      caller (addresses, diagnostics, MTA names, ids) is sanitised with
      :func:`mailserver.cleanup.sanitize_header_value`: no CR/LF/NUL/control
      characters, so nothing can inject header lines or MIME structure.
    * The machine-readable part stays 7-bit as RFC 3464 requires: ASCII
      addresses use address type ``rfc822``; non-ASCII (SMTPUTF8) addresses
      use type ``utf-8`` with RFC 6533 section 3 ``utf-8-addr-xtext``
      encoding; other non-ASCII characters there become ``?``.  The human
      readable part is ``us-ascii``, or ``utf-8`` + ``8bit`` when needed.
      If the returned original contains 8-bit bytes its part and the
      top-level are labelled ``Content-Transfer-Encoding: 8bit`` (RFC 2045
      section 6.4: a multipart's encoding must reflect its parts).
    * If the boundary occurs in the returned original, it is extended
      deterministically (``.1``, ``.2``, ...) until it does not.

Failure modes (``ValueError``; all are caller programming errors)
    * ``kind`` is not ``"failure"``/``"delay"``; no recipients; a
      recipient's ``action`` does not match ``kind`` (``failed`` for a
      failure DSN, ``delayed`` for a delay DSN, like Postfix which reports
      only matching bounce-log records per notice); ``status`` is not an
      RFC 3463 ``class.subject.detail`` code with class 4 or 5;
    * ``sender`` is the null sender: never notify ``<>`` (RFC 3461 section
      6.2, RFC 5321 section 4.5.5) -- check :func:`should_bounce` first;
    * ``boundary`` is not a valid RFC 2046 boundary.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from mailserver.cleanup import (
    MAILER_DAEMON,
    header_section,
    quote_822_local,
    rfc5322_date,
    sanitize_header_value,
)

__all__ = [
    "FailedRecipient",
    "build_dsn",
    "dsn_sender",
    "should_bounce",
]

CRLF = "\r\n"

# Postfix MAIL_ADDR_POSTMASTER.
POSTMASTER = "postmaster"

# Postfix bounce_templates.c built-in texts (failure_template,
# delay_template).  $myhostname etc. are filled in by _notification_text.
_FAILURE_BODY = """\
This is the mail system at host {myhostname}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to <{postmaster}>

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system"""

_DELAY_BODY = """\
This is the mail system at host {myhostname}.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than {hours} hour(s).
It will be retried until it is {days} day(s) old.

For further assistance, please send mail to <{postmaster}>

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system"""

_KINDS = {
    # kind: (Subject, required recipient action, template)
    "failure": ("Undelivered Mail Returned to Sender", "failed", _FAILURE_BODY),
    "delay": ("Delayed Mail (still being retried)", "delayed", _DELAY_BODY),
}

# RFC 3463 section 2: class "." subject "." detail; class 4 or 5 in a DSN
# that reports failed/delayed (RFC 3464 section 2.3.4).
_STATUS_RE = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
# RFC 3464 section 2.3.6: diagnostic-type ";" *text.  Also used to detect an
# already typed address ("rfc822; a@b") or MTA name ("dns; mx.example").
_TYPED_RE = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*;[ \t]*(.*)", re.S)
_KNOWN_TYPES = frozenset({"rfc822", "utf-8", "dns", "smtp"})
_SMTP_REPLY_RE = re.compile(r"[2-5]\d\d(?:[ \t-]|$)")
# RFC 2046 section 5.1.1 bchars, 1..70 characters, no trailing space.
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

_MSGID_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    "!#$%&'*+/=?^_`{|}~-.")
_FOLD_WIDTH = 78          # RFC 5322 section 2.1.1 SHOULD limit
_TEXT_WIDTH = 79          # Postfix bounce_print_wrap() LENGTH
_TEXT_INDENT = "    "     # Postfix bounce_print_wrap() INDENT


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient to report.

    ``diagnostic`` is the reason text, e.g. ``550 5.1.1 user unknown`` (the
    remote SMTP reply) or ``mail for x loops back to myself``.  Its RFC 3464
    diagnostic-type is ``diagnostic_type`` when given, else ``smtp`` when
    the text starts with a 3-digit reply code, else ``x-unix`` (Postfix).
    A text that already carries a type (``smtp; 550 ...``) is used as is.
    ``remote_mta`` may be ``mx.example.com`` (type ``dns`` is added) or
    already typed (``dns; mx.example.com``).  ``original_recipient`` is the
    RFC 3461 ORCPT address (typed or not).
    """

    final_recipient: str
    original_recipient: str | None
    action: str                     # "failed" | "delayed"
    status: str                     # "5.1.1"
    diagnostic: str
    remote_mta: str | None = None
    last_attempt: float | None = None
    diagnostic_type: str | None = None


def dsn_sender() -> str:
    """Envelope sender for DSNs: the null reverse-path (RFC 5321 section
    4.5.5, RFC 3464 section 2), so a DSN can never cause another DSN."""
    return ""


def should_bounce(sender: str) -> bool:
    """False for the null sender: never send a DSN about a message whose
    envelope sender is ``<>`` (RFC 5321 section 4.5.5, RFC 3461 section
    6.2).  Every other sender gets notifications (Postfix does not treat
    ``MAILER-DAEMON`` specially at this level)."""
    return sender != ""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _clean(value: str, limit: int = 998) -> str:
    return sanitize_header_value(value, limit).strip()


def _ascii(value: str) -> str:
    """Machine-readable fields are 7-bit (RFC 3464 section 2.1)."""
    return "".join(ch if ord(ch) < 0x80 else "?" for ch in value)


def _xtext_utf8(address: str) -> str:
    """RFC 6533 section 3 utf-8-addr-xtext: QCHAR stays, everything else
    (non-ASCII, ``+``, ``=``, ``\\``, SP) becomes ``\\x{HEX}``."""
    out = []
    for ch in address:
        o = ord(ch)
        if 0x21 <= o <= 0x7E and ch not in "+=\\":
            out.append(ch)
        else:
            out.append("\\x{%X}" % o)
    return "".join(out)


def _typed_address(address: str) -> str:
    """``rfc822; addr`` for ASCII, ``utf-8; xtext`` for SMTPUTF8 addresses
    (RFC 3464 section 2.3.2, RFC 6533 section 3)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_xtext_utf8(address)}"


def _split_typed(value: str) -> tuple[str | None, str]:
    """Split ``type; rest`` when ``type`` is a known or ``x-`` type."""
    m = _TYPED_RE.fullmatch(value)
    if m:
        typ = m.group(1).lower()
        if typ in _KNOWN_TYPES or typ.startswith("x-"):
            return m.group(1), m.group(2)
    return None, value


def _diagnostic(rcpt: FailedRecipient) -> tuple[str, str]:
    """(diagnostic-type, text) for one recipient."""
    text = _clean(rcpt.diagnostic)
    dtype, rest = _split_typed(text)
    if rcpt.diagnostic_type:
        return _clean(rcpt.diagnostic_type, 64).replace(";", ""), text
    if dtype is not None:
        return dtype, rest
    return ("smtp" if _SMTP_REPLY_RE.match(text) else "x-unix"), text


def _fold(name: str, value: str) -> str:
    """``Name: value`` CRLF, folded at spaces to ~78 columns (RFC 5322
    section 2.2.3).  The space at a fold point becomes the folding white
    space, so unfolding restores the value exactly."""
    line = f"{name}: {value}"
    if len(line) <= _FOLD_WIDTH:
        return line + CRLF
    out: list[str] = []
    current = ""
    for i, word in enumerate(line.split(" ")):
        if i == 0:
            current = word
        elif len(current) + 1 + len(word) > _FOLD_WIDTH and current.strip():
            out.append(current)
            current = " " + word
        else:
            current += " " + word
    out.append(current)
    return CRLF.join(out) + CRLF


def _wrap_text(text: str) -> list[str]:
    """Postfix bounce_print_wrap(): wrap at 79 columns, continuation lines
    indented by 4 spaces, never breaking words."""
    return textwrap.wrap(
        text, width=_TEXT_WIDTH, subsequent_indent=_TEXT_INDENT,
        break_long_words=False, break_on_hyphens=False,
    ) or [""]


def _pick_boundary(boundary: str, contents: list[bytes]) -> str:
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise ValueError(f"invalid MIME boundary: {boundary!r}")

    def collides(b: str) -> bool:
        marker = b"--" + b.encode("ascii")
        return any(marker in c for c in contents)

    candidate, n = boundary, 0
    while collides(candidate):
        n += 1
        suffix = f".{n}"
        candidate = boundary[: 70 - len(suffix)] + suffix
    return candidate


def _returned_headers(original: bytes, limit: int) -> bytes:
    """Header section of the original, cut at ``limit`` bytes on a line
    boundary like Postfix bounce_original() (0 = no limit)."""
    headers = header_section(original)
    if limit <= 0 or len(headers) <= limit:
        return headers
    out = bytearray()
    for line in headers.splitlines(keepends=True):
        if len(out) >= limit:
            break
        out += line
    return bytes(out)


# ---------------------------------------------------------------------------
# build_dsn
# ---------------------------------------------------------------------------

def build_dsn(
    *,
    original: bytes,
    queue_id: str,
    sender: str,
    recipients: list[FailedRecipient],
    myhostname: str,
    arrival_time: float,
    now: float,
    boundary: str,
    message_id_suffix: str,
    kind: str = "failure",
    return_full: bool = False,
    bounce_size_limit: int = 50000,
    mail_name: str = "mailserver",
    maximal_queue_lifetime: float = 5 * 86400,
) -> bytes:
    """Build a complete DSN message (stored form) for ``recipients``.

    ``kind`` is ``"failure"`` (Postfix bounce notice) or ``"delay"``
    (``delay_warning_time`` notice).  ``return_full`` returns the whole
    original as ``message/rfc822`` when ``len(original) <=
    bounce_size_limit`` (Postfix ``bounce_size_limit``, default 50000);
    otherwise only its header section is returned, as
    ``text/rfc822-headers`` (also cut at ``bounce_size_limit``, on a line
    boundary).  ``bounce_size_limit <= 0`` means no limit.  The delay
    text reports the hours elapsed since ``arrival_time`` and the
    ``maximal_queue_lifetime`` in days (Postfix default 5d), which also sets
    ``Will-Retry-Until`` for delayed recipients (RFC 3464 section 2.3.9).
    ``mail_name`` is accepted for symmetry with :func:`received_header`;
    Postfix' built-in templates no longer mention it, so it is unused.
    """
    del mail_name  # see docstring
    if kind not in _KINDS:
        raise ValueError(f"unknown DSN kind: {kind!r}")
    subject, want_action, template = _KINDS[kind]
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not should_bounce(sender):
        raise ValueError("never send a DSN to the null sender")
    for rcpt in recipients:
        if rcpt.action != want_action:
            raise ValueError(
                f"{kind} DSN cannot report action {rcpt.action!r} "
                f"(need {want_action!r})")
        if not _STATUS_RE.fullmatch(rcpt.status.strip()):
            raise ValueError(f"invalid DSN status: {rcpt.status!r}")
        # "failed" may carry a 4.x.x status: mail that expired in the queue
        # after temporary failures (Postfix reports e.g. Status: 4.4.1).
        if rcpt.status.strip()[0] not in (("4", "5") if want_action == "failed" else ("4",)):
            raise ValueError(
                f"status {rcpt.status!r} does not match action {rcpt.action!r}")

    host = _clean(myhostname, 255)
    env_sender = _clean(sender)
    qid = _clean(queue_id, 64)
    # id-left of the Message-ID is dot-atom-text (RFC 5322 section 3.6.4):
    # keep only atext and ".", so the caller cannot break the msg-id.
    msgid_left = "".join(
        ch for ch in message_id_suffix if ch in _MSGID_CHARS)[:255]
    msgid_left = re.sub(r"\.{2,}", ".", msgid_left).strip(".") or "dsn"

    # --- part 3 content: the original (decided first: it fixes the boundary)
    full = return_full and (bounce_size_limit <= 0 or len(original) <= bounce_size_limit)
    returned = bytes(original) if full else _returned_headers(original, bounce_size_limit)
    eight_bit_original = any(b >= 0x80 for b in returned)

    # --- part 1: human-readable notification (Postfix template + log)
    hours = max(0, int((now - arrival_time) // 3600))
    days = int(maximal_queue_lifetime // 86400)
    text_lines = template.format(
        myhostname=host, postmaster=POSTMASTER, hours=hours, days=days,
    ).split("\n")
    for rcpt in recipients:
        final = _clean(rcpt.final_recipient)
        orig = None
        if rcpt.original_recipient:
            _, orig = _split_typed(_clean(rcpt.original_recipient))
        _, reason = _diagnostic(rcpt)
        who = f"<{final}>"
        if orig and orig.lower() != final.lower():
            who += f" (expanded from <{orig}>)"
        text_lines.append("")
        text_lines.extend(_wrap_text(f"{who}: {reason}"))
    human = CRLF.join(text_lines) + CRLF
    human_ascii = human.isascii()

    # --- part 2: machine-readable delivery status (RFC 3464 section 2)
    status = [_fold("Reporting-MTA", f"dns; {_ascii(host)}")]
    status.append(_fold("X-Postfix-Queue-ID", _ascii(qid)))
    status.append(_fold("X-Postfix-Sender", _typed_address(env_sender)))
    if arrival_time > 0:
        status.append(_fold("Arrival-Date", rfc5322_date(arrival_time)))
    for rcpt in recipients:
        status.append(CRLF)
        status.append(_fold("Final-Recipient", _typed_address(_clean(rcpt.final_recipient))))
        if rcpt.original_recipient:
            otype, oaddr = _split_typed(_clean(rcpt.original_recipient))
            if otype is not None and oaddr.isascii():
                status.append(_fold("Original-Recipient", f"{otype}; {oaddr}"))
            else:
                status.append(_fold("Original-Recipient", _typed_address(oaddr)))
        status.append(_fold("Action", rcpt.action))
        status.append(_fold("Status", rcpt.status.strip()))
        if rcpt.remote_mta:
            mtype, mname = _split_typed(_clean(rcpt.remote_mta, 255))
            status.append(_fold("Remote-MTA", f"{mtype or 'dns'}; {_ascii(mname)}"))
        dtype, dtext = _diagnostic(rcpt)
        status.append(_fold("Diagnostic-Code", f"{_ascii(dtype)}; {_ascii(dtext)}"))
        if rcpt.last_attempt is not None:
            status.append(_fold("Last-Attempt-Date", rfc5322_date(rcpt.last_attempt)))
        if rcpt.action == "delayed" and arrival_time > 0:
            status.append(_fold("Will-Retry-Until",
                                rfc5322_date(arrival_time + maximal_queue_lifetime)))
    delivery_status = "".join(status)

    bnd = _pick_boundary(
        boundary, [returned, human.encode("utf-8"), delivery_status.encode("ascii")])

    # --- top-level headers (Postfix bounce_header())
    eight_bit = eight_bit_original or not human_ascii
    head = [
        _fold("From", f"{MAILER_DAEMON}@{host} (Mail Delivery System)"),
        _fold("Subject", subject),
        _fold("To", quote_822_local(env_sender)),
        _fold("Date", rfc5322_date(now)),
        _fold("Message-ID", f"<{msgid_left}@{host}>"),
        _fold("Auto-Submitted", "auto-replied"),   # RFC 3834 section 5
        _fold("MIME-Version", "1.0"),
        f"Content-Type: multipart/report; report-type=delivery-status;{CRLF}"
        f'\tboundary="{bnd}"{CRLF}',
        _fold("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
        CRLF,
        "This is a MIME-encapsulated message." + CRLF,
    ]

    parts = [
        CRLF + f"--{bnd}" + CRLF,
        _fold("Content-Description", "Notification"),
        _fold("Content-Type",
              "text/plain; charset=us-ascii" if human_ascii else "text/plain; charset=utf-8"),
    ]
    if not human_ascii:
        parts.append(_fold("Content-Transfer-Encoding", "8bit"))
    parts += [
        CRLF,
        human,
        CRLF + f"--{bnd}" + CRLF,
        _fold("Content-Description", "Delivery report"),
        _fold("Content-Type", "message/delivery-status"),
        CRLF,
        delivery_status,
        CRLF + f"--{bnd}" + CRLF,
        _fold("Content-Description",
              "Undelivered Message" if full else "Undelivered Message Headers"),
        _fold("Content-Type", "message/rfc822" if full else "text/rfc822-headers"),
    ]
    if eight_bit_original:
        parts.append(_fold("Content-Transfer-Encoding", "8bit"))
    parts.append(CRLF)

    out = bytearray("".join(head + parts).encode("utf-8"))
    # The CRLF before the closing delimiter belongs to the delimiter (RFC
    # 2046 section 5.1.1), so the returned content is exactly ``returned``.
    out += returned
    out += f"{CRLF}--{bnd}--{CRLF}".encode("ascii")
    return bytes(out)
