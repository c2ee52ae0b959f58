"""RFC 5321 envelope addresses: parsing, validation and canonical form.

Responsibility
    Turn the argument of ``MAIL FROM:`` / ``RCPT TO:`` (and bare addresses
    from configuration, alias targets and headers) into an :class:`Address`
    value plus the ESMTP parameters.  This module is pure: no I/O, no DNS, no
    policy, no aiosmtpd.  Relay/routing decisions belong to the caller; this
    module only reports the facts they need (``domain``, ``routed``).

Contract
    * ``parse_mail_from(arg)`` / ``parse_rcpt_to(arg)`` take everything after
      the command's colon (the caller has matched ``FROM:`` / ``TO:`` and
      stripped the CRLF).  Optional spaces before the path are allowed.  They
      return ``(Address, params)`` where ``params`` maps the upper-cased
      keyword to the value as given, or ``None`` when there is no ``=``.
    * Accepted paths (RFC 5321 section 4.1.2): ``<>`` (MAIL only),
      ``<local@domain>``, ``<local>``, a source route
      ``<@a,@b:local@domain>`` (the route is dropped, ``source_route`` set),
      and - like Postfix with ``strict_rfc821_envelopes = no`` - a path
      without angle brackets, which ends at the first space outside a quoted
      string.
    * The local part is kept in unquoted form; ``%``, ``!`` and a quoted
      ``@`` are never rewritten, they only make ``Address.routed`` true.
    * ``parse_address(text)`` parses a bare ``local@domain`` or ``local``.

Failure
    MAIL/RCPT parsing raises :class:`~mailserver.reply.ReplyError` carrying
    the reply to send:

    * empty argument: ``501 5.5.4 Syntax: MAIL FROM:<address>`` (or RCPT),
    * bad path: ``501 5.1.7 Bad sender address syntax`` (MAIL) or
      ``501 5.1.3 Bad recipient address syntax`` (RCPT); this includes any
      control character anywhere in the argument,
    * bad or duplicate ESMTP parameter: ``501 5.5.4 Syntax error in
      parameters``.

    The precise reason is kept as the exception's ``__cause__`` (an
    :class:`AddressSyntaxError`) for logging.  ``parse_address`` raises
    :class:`AddressSyntaxError`, a :class:`ValueError`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from .reply import Reply, ReplyError

__all__ = [
    "NULL",
    "Address",
    "AddressSyntaxError",
    "is_valid_domain",
    "parse_address",
    "parse_mail_from",
    "parse_rcpt_to",
    "quote_local",
]

# RFC 5321 section 4.5.3.1.1 / 4.5.3.1.2: size limits in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63  # RFC 1035 section 2.3.4

# RFC 5322 section 3.2.3 atext, minus ALPHA / DIGIT.
_ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~")
# Characters that make an address carry sender-specified routing
# (Postfix RESOLVE_FLAG_ROUTED): user@host@relay, user%host@relay, host!user.
_ROUTING_CHARS = frozenset("@%!")
# Non-ASCII characters we never accept even with SMTPUTF8: C1 controls,
# lone surrogates (from surrogateescape decoding), and Unicode white space /
# line and paragraph separators.
_BAD_UNICODE_CATEGORIES = frozenset({"Cc", "Cs", "Zs", "Zl", "Zp"})

_REPLY_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
_REPLY_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
_REPLY_BAD_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters")
_REPLY_EMPTY_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
_REPLY_EMPTY_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")


class AddressSyntaxError(ValueError):
    """An address (or ESMTP parameter) does not follow the grammar."""


# --------------------------------------------------------------------------
# The value type
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """One envelope address.

    ``local`` is unquoted (``"a b"@x`` gives ``a b``), ``domain`` is
    lower-cased ("" when absent; address literals keep their brackets, with the
    tag spelled ``IPv6:``).  ``str()`` gives the canonical addr-spec.
    """

    local: str
    domain: str
    source_route: bool = False

    def __str__(self) -> str:
        if self.is_null:
            return ""
        local = quote_local(self.local)
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>``."""
        return not self.local and not self.domain

    @property
    def routed(self) -> bool:
        """Sender-specified routing (``@ % !`` in the local part, or a source
        route).  Such an address must never be relayed for an untrusted
        client."""
        return self.source_route or any(ch in _ROUTING_CHARS for ch in self.local)

    def with_domain(self, domain: str) -> Address:
        """A copy qualified with ``domain`` (normalised like a parsed domain).

        Raises :class:`AddressSyntaxError` for an invalid domain or when
        called on the null address.
        """
        if self.is_null:
            raise AddressSyntaxError("cannot qualify the null address")
        return Address(self.local, _normalise_domain(domain, utf8=True), self.source_route)


NULL = Address("", "")


# --------------------------------------------------------------------------
# Character classes
# --------------------------------------------------------------------------


def _utf8_ok(ch: str) -> bool:
    """A non-ASCII character acceptable under SMTPUTF8 (RFC 6531)."""
    return unicodedata.category(ch) not in _BAD_UNICODE_CATEGORIES


def _is_atext(ch: str, utf8: bool) -> bool:
    if ch.isascii():
        return ch.isalnum() or ch in _ATEXT_SPECIALS
    return utf8 and _utf8_ok(ch)


def _is_qtext(ch: str, utf8: bool) -> bool:
    # RFC 5321 qtextSMTP = %d32-33 / %d35-91 / %d93-126 (+ UTF8-non-ascii,
    # RFC 6531 section 3.3).
    if ch.isascii():
        return " " <= ch <= "~" and ch not in '"\\'
    return utf8 and _utf8_ok(ch)


def _is_control(ch: str) -> bool:
    return ch < " " or ch == "\x7f"


CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # what _is_control accepts, for a whole string at once


def _octets(text: str) -> int:
    # surrogatepass: never crash on lone surrogates; they are rejected anyway.
    return len(text.encode("utf-8", "surrogatepass"))


# ASCII atext (RFC 5321 section 4.1.2), for the fast paths below; anything
# else (UTF-8 under SMTPUTF8, errors) takes the character-by-character path.
_ASCII_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ASCII_DOT_ATOM = re.compile(rf"[{_ASCII_ATEXT}]+(?:\.[{_ASCII_ATEXT}]+)*")
_ASCII_DOT_STRING_RUN = re.compile(rf"[{_ASCII_ATEXT}.]*")


def _is_dot_atom(text: str, utf8: bool = True) -> bool:
    """RFC 5321 Dot-string: atoms of atext joined by single dots."""
    if not text:
        return False
    if _ASCII_DOT_ATOM.fullmatch(text):
        return True
    if text.isascii():
        return False
    return all(atom and all(_is_atext(ch, utf8) for ch in atom) for atom in text.split("."))


# --------------------------------------------------------------------------
# Local part
# --------------------------------------------------------------------------


def quote_local(local: str) -> str:
    """The local part as it must appear on the wire (RFC 5321 section 4.1.2).

    A valid Dot-string is returned unchanged; anything else becomes a
    Quoted-string with ``"`` and ``\\`` escaped.
    """
    if _is_dot_atom(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _scan_local(text: str, pos: int, utf8: bool) -> tuple[str, int]:
    """Scan a Local-part starting at ``pos``; return (unquoted, end).

    Local-part = Dot-string / Quoted-string   (RFC 5321 section 4.1.2)
    """
    start = pos
    n = len(text)
    if pos < n and text[pos] == '"':
        # Quoted-string = DQUOTE *QcontentSMTP DQUOTE
        # QcontentSMTP = qtextSMTP / quoted-pairSMTP ; pair = "\" %d32-126
        out: list[str] = []
        pos += 1
        while True:
            if pos >= n:
                raise AddressSyntaxError("unterminated quoted string")
            ch = text[pos]
            if ch == '"':
                pos += 1
                break
            if ch == "\\":
                if pos + 1 >= n:
                    raise AddressSyntaxError("unterminated quoted string")
                nxt = text[pos + 1]
                if not (nxt.isascii() and " " <= nxt <= "~"):
                    raise AddressSyntaxError(f"bad quoted-pair \\{nxt!r} in local part")
                out.append(nxt)
                pos += 2
                continue
            if not _is_qtext(ch, utf8):
                raise AddressSyntaxError(f"bad character {ch!r} in quoted local part")
            out.append(ch)
            pos += 1
        local = "".join(out)
        # An empty quoted local part ("") is legal in RFC 5321 but would make
        # <""> indistinguishable from the null path; Postfix-class MTAs have
        # no use for it, so we refuse it.
        if not local:
            raise AddressSyntaxError("empty local part")
    else:
        pos = _ASCII_DOT_STRING_RUN.match(text, pos).end()
        while pos < n and (text[pos] == "." or _is_atext(text[pos], utf8)):
            pos += 1
        local = text[start:pos]
        if not local:
            if pos < n and text[pos] != "@":
                raise AddressSyntaxError(f"bad character {text[pos]!r} in local part")
            raise AddressSyntaxError("empty local part")
        if local.startswith(".") or local.endswith(".") or ".." in local:
            raise AddressSyntaxError("misplaced dot in local part")
    # RFC 5321 section 4.5.3.1.1: at most 64 octets, counted as on the wire.
    if _octets(text[start:pos]) > MAX_LOCAL_PART:
        raise AddressSyntaxError(f"local part longer than {MAX_LOCAL_PART} octets")
    return local, pos


# --------------------------------------------------------------------------
# Domain
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _domain_problem(name: str, utf8: bool, literal_ok: bool) -> str | None:
    """Why ``name`` is not a valid Domain / address-literal, or None.
    (Remembered: the same few domains come in message after message.)"""
    if not name:
        return "empty domain"
    # RFC 5321 section 4.5.3.1.2: at most 255 octets.
    if _octets(name) > MAX_DOMAIN:
        return f"domain longer than {MAX_DOMAIN} octets"
    if name.startswith("["):
        if not literal_ok:
            return "address literal not allowed here"
        return _literal_problem(name)
    # Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str]
    # (RFC 5321 section 4.1.2; U-labels allowed under SMTPUTF8, RFC 6531).
    # A trailing dot (empty last label) is not allowed.
    for label in name.split("."):
        if not label:
            return "empty label in domain"
        for ch in label:
            if ch.isascii():
                if not (ch.isalnum() or ch == "-"):
                    return f"bad character {ch!r} in domain"
            elif not (utf8 and _utf8_ok(ch)):
                return f"bad character {ch!r} in domain"
        if label[0] == "-" or label[-1] == "-":
            return "misplaced hyphen in domain"
        if _octets(label) > MAX_LABEL:
            return f"domain label longer than {MAX_LABEL} octets"
    # Like Postfix valid_hostname(): a name made only of digits and dots looks
    # like an IP address; it must be written as an address literal [d.d.d.d].
    if all(ch.isdigit() and ch.isascii() for ch in name.replace(".", "")):
        return "numeric domain (use an address literal)"
    return None


def _literal_problem(name: str) -> str | None:
    """Validate ``[d.d.d.d]`` or ``[IPv6:...]`` (RFC 5321 section 4.1.3)."""
    if len(name) < 3 or not name.endswith("]"):
        return "malformed address literal"
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        addr = inner[5:]
        # ipaddress also accepts scope ids ("fe80::1%eth0"); RFC 5321 does not.
        if not addr or not all(ch in "0123456789abcdefABCDEF:." for ch in addr):
            return "malformed IPv6 address literal"
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return "malformed IPv6 address literal"
        return None
    parts = inner.split(".")
    if len(parts) != 4:
        return "malformed address literal"
    for part in parts:
        # Snum = 1*3DIGIT, 0..255.  Leading zeros are refused: some stacks
        # read them as octal, so they are ambiguous.
        if not (1 <= len(part) <= 3 and part.isascii() and part.isdigit()):
            return "malformed IPv4 address literal"
        if int(part) > 255 or (len(part) > 1 and part[0] == "0"):
            return "malformed IPv4 address literal"
    return None


def _normalise_domain(name: str, utf8: bool) -> str:
    """Validate and normalise a domain or address literal; raise if bad."""
    problem = _domain_problem(name, utf8, literal_ok=True)
    if problem:
        raise AddressSyntaxError(problem)
    if name.startswith("[") and name[1:6].lower() == "ipv6:":
        return "[IPv6:" + name[6:].lower()
    return name.lower()


def is_valid_domain(
    name: str, *, smtputf8_allowed: bool = True, address_literal: bool = False
) -> bool:
    """True when ``name`` is a syntactically valid domain name.

    Address literals (``[1.2.3.4]``, ``[IPv6:::1]``) count only when
    ``address_literal`` is true.  A bare dotted quad is *not* a valid domain
    (like Postfix ``valid_hostname()``), nor is a name with a trailing dot.
    """
    return _domain_problem(name, smtputf8_allowed, address_literal) is None


# --------------------------------------------------------------------------
# Mailbox and path
# --------------------------------------------------------------------------


def _parse_mailbox(text: str, utf8: bool) -> tuple[str, str]:
    """Mailbox = Local-part "@" ( Domain / address-literal ), or a bare
    Local-part (``<postmaster>``).  Returns (local, normalised domain)."""
    local, pos = _scan_local(text, 0, utf8)
    if pos == len(text):
        return local, ""
    if text[pos] != "@":
        raise AddressSyntaxError(f"bad character {text[pos]!r} in local part")
    domain_text = text[pos + 1 :]
    if not domain_text:
        raise AddressSyntaxError("missing domain after '@'")
    return local, _normalise_domain(domain_text, utf8)


def _parse_path_content(content: str, utf8: bool) -> Address:
    """The text between ``<`` and ``>``: [ A-d-l ":" ] Mailbox.

    A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain
    (RFC 5321 section 4.1.2).  The route is validated and dropped (RFC 5321
    section 3.3 and appendix C); address literals are tolerated in it.
    """
    pos = 0
    source_route = False
    if content.startswith("@"):
        source_route = True
        while True:
            if pos >= len(content) or content[pos] != "@":
                raise AddressSyntaxError("malformed source route")
            end = pos + 1
            if content[end : end + 1] == "[":
                # An IPv6 literal contains ':', so skip to the bracket first.
                close = content.find("]", end)
                end = len(content) if close < 0 else close + 1
            else:
                while end < len(content) and content[end] not in ",:":
                    end += 1
            _normalise_domain(content[pos + 1 : end], utf8)
            if end >= len(content):
                raise AddressSyntaxError("source route without mailbox")
            sep = content[end]
            pos = end + 1
            if sep == ":":
                break
            if sep != ",":
                raise AddressSyntaxError("malformed source route")
    local, domain = _parse_mailbox(content[pos:], utf8)
    return Address(local, domain, source_route)


def _split_path(arg: str) -> tuple[str, bool, str]:
    """Split the command argument into (path text, bracketed, rest).

    ``rest`` is "" or starts with a space.  Quoted strings are honoured, so a
    ``>`` or space inside quotes does not end the path.
    """
    pos = 0
    while pos < len(arg) and arg[pos] == " ":
        pos += 1
    bracketed = arg.startswith("<", pos)
    start = pos + 1 if bracketed else pos
    in_quote = False
    i = start
    while i < len(arg):
        ch = arg[i]
        if in_quote:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == ">":
            if not bracketed:
                raise AddressSyntaxError("unbalanced '>'")
            rest = arg[i + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressSyntaxError("garbage after '>'")
            return arg[start:i], True, rest
        elif ch == "<":
            raise AddressSyntaxError("unbalanced '<'")
        elif ch == " " and not bracketed:
            break
        i += 1
    if in_quote:
        raise AddressSyntaxError("unterminated quoted string")
    if bracketed:
        raise AddressSyntaxError("missing '>'")
    return arg[start:i], False, arg[i:]


# --------------------------------------------------------------------------
# ESMTP parameters
# --------------------------------------------------------------------------


def _parse_params(rest: str, utf8: bool) -> dict[str, str | None]:
    """Mail-parameters = esmtp-param *(SP esmtp-param)  (RFC 5321 4.1.2).

    esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
    esmtp-value   = 1*(%d33-60 / %d62-126)   (+ UTF-8 under SMTPUTF8)
    Runs of spaces are tolerated.  A repeated keyword is refused.
    """
    params: dict[str, str | None] = {}
    for word in rest.split(" "):
        if not word:
            continue
        keyword, eq, value = word.partition("=")
        if not (
            keyword
            and keyword.isascii()
            and keyword[0].isalnum()
            and all(ch.isalnum() or ch == "-" for ch in keyword)
        ):
            raise ReplyError(_REPLY_BAD_PARAMS)
        key = keyword.upper()
        if key in params:
            raise ReplyError(_REPLY_BAD_PARAMS)
        if not eq:
            params[key] = None
            continue
        if not value or not all(_is_esmtp_value_char(ch, utf8) for ch in value):
            raise ReplyError(_REPLY_BAD_PARAMS)
        params[key] = value
    return params


def _is_esmtp_value_char(ch: str, utf8: bool) -> bool:
    if ch.isascii():
        return "!" <= ch <= "~" and ch != "="
    return utf8 and _utf8_ok(ch)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def _parse_command_arg(
    arg: str, *, utf8: bool, null_ok: bool, bad: Reply, empty: Reply
) -> tuple[Address, dict[str, str | None]]:
    if not arg.strip(" "):
        raise ReplyError(empty)
    try:
        if CONTROL.search(arg):
            raise AddressSyntaxError("control character in command argument")
        path, bracketed, rest = _split_path(arg)
        if not utf8 and not path.isascii():
            raise AddressSyntaxError("non-ASCII address without SMTPUTF8")
        if bracketed and not path:
            if not null_ok:
                raise AddressSyntaxError("null address not allowed here")
            address = NULL
        else:
            address = _parse_path_content(path, utf8)
    except AddressSyntaxError as exc:
        raise ReplyError(bad) from exc
    return address, _parse_params(rest, utf8)


def parse_mail_from(
    arg: str, *, smtputf8_allowed: bool = True
) -> tuple[Address, dict[str, str | None]]:
    """Parse the argument of ``MAIL FROM:``; ``<>`` gives :data:`NULL`."""
    return _parse_command_arg(
        arg,
        utf8=smtputf8_allowed,
        null_ok=True,
        bad=_REPLY_BAD_SENDER,
        empty=_REPLY_EMPTY_MAIL,
    )


def parse_rcpt_to(
    arg: str, *, smtputf8_allowed: bool = True
) -> tuple[Address, dict[str, str | None]]:
    """Parse the argument of ``RCPT TO:``; ``<>`` is a syntax error."""
    return _parse_command_arg(
        arg,
        utf8=smtputf8_allowed,
        null_ok=False,
        bad=_REPLY_BAD_RECIPIENT,
        empty=_REPLY_EMPTY_RCPT,
    )


@functools.lru_cache(maxsize=1024)
def parse_address_or_none(text: str) -> Address | None:
    """:func:`parse_address`, remembered (the same recipients come in
    message after message); None for an address that does not parse."""
    try:
        return parse_address(text)
    except (AddressSyntaxError, ReplyError):
        return None


def parse_address(text: str, *, smtputf8_allowed: bool = True) -> Address:
    """Parse a bare ``local@domain`` or ``local`` (no brackets, no route,
    no surrounding white space).  Raises :class:`AddressSyntaxError`."""
    if not text:
        raise AddressSyntaxError("empty address")
    if CONTROL.search(text):
        raise AddressSyntaxError("control character in address")
    if not smtputf8_allowed and not text.isascii():
        raise AddressSyntaxError("non-ASCII address without SMTPUTF8")
    local, domain = _parse_mailbox(text, smtputf8_allowed)
    return Address(local, domain)
