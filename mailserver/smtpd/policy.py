"""SMTP protocol policy as pure functions returning replies (Postfix: smtpd).

Nothing here does I/O or imports aiosmtpd: the session adapter
(:mod:`mailserver.smtpd.session`) gathers facts (client address, lookups,
what was read) and asks these functions what to answer.  Tests call them
directly.  Reply codes and texts are Postfix's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..address import CONTROL, Address
from ..reply import Reply
from ..resolve import DEFAULT, LOCAL, RELAY, VIRTUAL, VIRTUAL_ALIAS

# --- fixed replies -----------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
DATA_GO = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_REPLY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
BAD_HELO = Reply(501, "5.5.2", "Error: invalid characters in hostname")
UNKNOWN_COMMAND = Reply(502, "5.5.2", "Error: command not recognized")  # as smtpd(8)
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_LF = Reply(550, "5.5.2", "Error: bare <LF> received")
BARE_CR = Reply(550, "5.5.2", "Error: bare <CR> received")
NUL_IN_DATA = Reply(554, "5.6.0", "Error: message content contains NUL characters")
TOO_MANY_HOPS = Reply(554, "5.4.0", "Error: too many hops")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error")
QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
BAD_PIPELINING = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")  # Postfix 3.9+
UNSUPPORTED_BODY = Reply(501, "5.5.4", "Error: Unsupported BODY parameter")
BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
BDAT_UNSUPPORTED = Reply(502, "5.5.1", "Error: command not implemented")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
NEED_EHLO_FOR_AUTH = Reply(503, "5.5.1", "Error: send EHLO first")
FORBIDDEN_COMMAND = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")  # as smtpd(8)


def greeting(banner: str) -> Reply:
    return Reply(220, "", banner)


def timeout_reply(myhostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{myhostname} Error: timeout exceeded")


def too_many_errors(myhostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{myhostname} Error: too many errors")


def ehlo_reply(myhostname: str, *, size_limit: int, smtputf8: bool = True, starttls: bool = False,
               auth_mechanisms: tuple[str, ...] = ()) -> Reply:
    """EHLO keywords in Postfix's order; only what actually works."""
    lines = [myhostname, "PIPELINING", f"SIZE {size_limit}" if size_limit else "SIZE", "VRFY"]
    if starttls:
        lines.append("STARTTLS")
    if auth_mechanisms:
        lines.append("AUTH " + " ".join(auth_mechanisms))
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME"]
    if smtputf8:
        lines.append("SMTPUTF8")
    return Reply(250, "", "\n".join(lines))


def helo_reply(myhostname: str) -> Reply:
    return Reply(250, "", myhostname)


def check_helo_argument(arg: str | None, *, ehlo: bool) -> Reply | None:
    """EHLO/HELO need an argument without controls (header injection)."""
    if not arg or not arg.strip():
        return EHLO_SYNTAX if ehlo else HELO_SYNTAX
    if CONTROL.search(arg) or len(arg) > 255:
        return BAD_HELO
    return None


def unsupported_option(name: str) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported option: {name}")


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body_8bit: bool = False
    smtputf8: bool = False


def check_mail_params(params: dict[str, str | None], *, size_limit: int) -> tuple[MailParams | None, Reply | None]:
    """MAIL FROM parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8)."""
    size = None
    body_8bit = False
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                return None, BAD_SIZE
            size = int(value)
            if size_limit and size > size_limit:
                return None, SIZE_EXCEEDED
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return None, UNSUPPORTED_BODY
            body_8bit = value.upper() == "8BITMIME"
        elif key == "SMTPUTF8":
            if value is not None:
                return None, unsupported_option(f"{key}={value}")
            smtputf8 = True
        else:
            return None, unsupported_option(key)
    return MailParams(size, body_8bit, smtputf8), None


def check_address_charset(address: Address, smtputf8: bool) -> Reply | None:
    if not smtputf8 and not str(address).isascii():
        return NEED_SMTPUTF8
    return None


def check_rcpt_params(params: dict[str, str | None]) -> Reply | None:
    for key in params:
        return unsupported_option(key)
    return None


def relay_denied(address: str) -> Reply:
    return Reply(554, "5.7.1", f"<{address}>: Relay access denied")


def user_unknown(address: str, table: str) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown in {table}")


def is_postmaster(address: Address, local_domain: bool) -> bool:
    """RFC 5321 §4.5.1: ``postmaster`` and ``postmaster@<our domain>`` are always accepted."""
    return address.local.lower() == "postmaster" and (not address.domain or local_domain) and not address.routed


def check_recipient(address: Address, *, address_class: str, client_trusted: bool, known: bool | None,
                    rcpt_count: int, rcpt_limit: int) -> Reply | None:
    """RCPT TO decision with the safe defaults of Postfix's
    ``smtpd_relay_restrictions = permit_mynetworks, ..., reject_unauth_destination``
    and ``smtpd_reject_unlisted_recipient = yes``.

    ``known`` is the result of the recipient table lookup for local,
    virtual and virtual-alias classes (None when not looked up).
    Returns None to accept.
    """
    if rcpt_limit and rcpt_count >= rcpt_limit:
        return TOO_MANY_RCPTS
    text = str(address)
    # Sender-specified routing (user%host@us, host!user, "u@h"@us, source
    # routes) is relaying in disguise: only trusted clients may use it.
    if address.routed and not client_trusted:
        return relay_denied(text)
    if address_class in (RELAY, DEFAULT):
        if not client_trusted:
            return relay_denied(text)
        return None
    if known is False:
        table = {LOCAL: "local recipient table", VIRTUAL: "virtual mailbox table",
                 VIRTUAL_ALIAS: "virtual alias table"}.get(address_class, "local recipient table")
        return user_unknown(text, table)
    return None


def check_content(data_size: int, *, too_big: bool, has_nul: bool, bare_lf: bool, bare_cr: bool,
                  forbid_bare_newline: str, hops: int, hopcount_limit: int) -> Reply | None:
    """End-of-DATA checks, in Postfix's order of precedence."""
    if too_big:
        return SIZE_EXCEEDED
    if has_nul:
        return NUL_IN_DATA
    if forbid_bare_newline == "reject":
        if bare_lf:
            return BARE_LF
        if bare_cr:
            return BARE_CR
    if hopcount_limit and hops >= hopcount_limit:
        return TOO_MANY_HOPS
    return None


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
