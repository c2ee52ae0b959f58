"""SMTP access restrictions (Postfix: smtpd_check.c, access(5), postconf(5)).

Responsibility
    Evaluate Postfix restriction lists (``smtpd_client_restrictions``,
    ``smtpd_helo_restrictions``, ``smtpd_sender_restrictions``,
    ``smtpd_relay_restrictions``, ``smtpd_recipient_restrictions``,
    ``smtpd_data_restrictions``, ``smtpd_end_of_data_restrictions``,
    ``smtpd_etrn_restrictions``, restriction classes) against what the SMTP
    session knows (:class:`Facts`) and return a :class:`Decision`.  No socket
    I/O except the DNS lookups of the DNS-based checks (through the injected
    :class:`mailserver.dns.Resolver`) and ``check_policy_service`` (the
    Postfix policy delegation protocol).  No aiosmtpd.

Contract
    * :meth:`RestrictionChecker.check` evaluates one list; the ``check_*``
      stage methods (``check_client``, ``check_helo``, ``check_mail``,
      ``check_rcpt``, ``check_data``, ``check_eod``) are Postfix's
      ``smtpd_check_*`` drivers.  :meth:`~RestrictionChecker.check_rcpt`
      with ``smtpd_delay_reject = yes`` evaluates client, HELO and sender
      restrictions at RCPT time (a permit ends only its own list), then
      ``smtpd_relay_restrictions``, then ``smtpd_recipient_restrictions``
      (Postfix ``smtpd_relay_before_recipient_restrictions = yes``), then the
      implicit ``reject_unlisted_recipient``.  The first reject or defer
      wins; HOLD, DISCARD, PREPEND and FILTER side effects accumulate.
    * Reply codes come from the ``*_reject_code`` parameters; reply texts,
      enhanced codes and log lines are Postfix's, character for character
      (``<name[addr]>: Client host rejected: ...``, ``<helo>: Helo command
      rejected: ...``, ``<addr>: Sender address rejected: ...``,
      ``<addr>: Recipient address rejected: ...``, ``<addr>: Relay access
      denied``).  The SMTP code and the first digit of the enhanced code
      always agree (Postfix forces it).
    * Temporary-failure semantics are Postfix's: ``defer_if_permit`` /
      ``defer_if_reject``, ``warn_if_reject``, ``*_tempfail_action``.  A DNS
      failure never causes a 5xx: DNS-based checks either defer (4xx) or,
      for DNS lists, raise the ``defer_if_permit`` flag, which turns a final
      permit into ``450 4.7.1``.
    * Access tables are opened with :func:`mailserver.tables.open_tables`
      (one spec at a time, so pattern tables - regexp, pcre, cidr - are
      only asked full keys, as Postfix's ``DICT_FLAG_FIXED`` does) and
      searched in access(5) order.
    * Relaying is decided on the fully parsed address: any sender-specified
      routing (``%``, ``!``, quoted ``@``, source route) is never an
      authorized destination (Postfix ``allow_untrusted_routing = no``).

Failure modes
    Nothing here raises for a request.  A configuration error (unknown
    restriction, missing argument, table spec that cannot be opened, lookup
    table inside an access-table result, runaway recursion) answers
    ``451 4.3.5 Server configuration error`` and logs a warning; a table
    lookup that raises answers ``451 4.3.0 <name>: Temporary lookup
    failure``; a policy service or Python policy hook that fails or times out
    answers its default action ``451 4.3.5 Server configuration problem``.
    :meth:`RestrictionChecker.configuration_problems` lists configuration
    errors up front (for ``mailserver check``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from ..address import AddressSyntaxError, parse_address, quote_local
from ..config import Config, parse_time, split_list
from ..dns import DnsError, valid_hostname
from ..outbox import close as close_transport, cut as cut_transport
from ..reply import Reply
from ..resolve import DEFAULT, LOCAL, RELAY, VIRTUAL, VIRTUAL_ALIAS, AddressResolver, strip_extension
from ..tables import TableList, open_tables

__all__ = ["Decision", "Facts", "RestrictionChecker"]

# Results of one restriction (Postfix SMTPD_CHECK_*).
DUNNO, OK, REJECT = 0, 1, 2

# Reply classes (Postfix smtpd_check_int.h SMTPD_NAME_*).
CLIENT = "Client host"
REV_CLIENT = "Unverified Client host"
SASL_USER = "SASL login name"
HELO = "Helo command"
SENDER = "Sender address"
RECIPIENT = "Recipient address"
ETRN = "Etrn command"
DATA = "Data command"
EOD = "End-of-data"

# Error classes (Postfix MAIL_ERROR_*): only policy/protocol/bounce rejects
# may be turned into warnings by warn_if_reject.
_POLICY, _PROTOCOL, _BOUNCE, _SOFTWARE, _RESOURCE, _DATA = (
    "policy", "protocol", "bounce", "software", "resource", "data")
_NOT_WARNABLE = frozenset({_SOFTWARE, _RESOURCE, _DATA})

# postconf(5) defaults of parameters this module needs but Config does not
# (yet) declare; see the module report.
NULL_ACCESS_LOOKUP_KEY = "<>"  # smtpd_null_access_lookup_key
POLICY_DEFAULT_ACTION = "451 4.3.5 Server configuration problem"  # smtpd_policy_service_default_action
MULTI_RECIPIENT_BOUNCE_REJECT_CODE = 550  # multi_recipient_bounce_reject_code
DEFAULT_RBL_REPLY = ("$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using "
                     "$rbl_domain${rbl_reason?; $rbl_reason}")
RBL_TXT_LIMIT = 500
MAX_RECURSION = 100

# Table types that Postfix marks DICT_FLAG_PATTERN: asked full keys only.
_PATTERN_TABLES = frozenset({"regexp", "pcre", "cidr"})

# Restrictions that take the next list element as their argument.
_TABLE_ARG = frozenset({
    "check_client_access", "check_reverse_client_hostname_access", "check_helo_access",
    "check_sender_access", "check_recipient_access", "check_etrn_access", "check_sasl_access",
})
_OTHER_ARG = frozenset({
    "check_policy_service", "check_python_policy", "reject_rbl_client", "reject_rbl",
    "permit_dnswl_client", "reject_rhsbl_client", "reject_rhsbl_reverse_client", "permit_rhswl_client",
    "reject_rhsbl_helo", "reject_rhsbl_sender", "reject_rhsbl_recipient",
})
_SIMPLE = frozenset({
    "permit", "reject", "defer", "defer_if_permit", "defer_if_reject", "warn_if_reject",
    "reject_unauth_pipelining", "reject_plaintext_session",
    "reject_unknown_client_hostname", "reject_unknown_client", "reject_unknown_reverse_client_hostname",
    "permit_inet_interfaces", "permit_mynetworks", "permit_sasl_authenticated",
    "reject_invalid_helo_hostname", "reject_invalid_hostname", "reject_unknown_helo_hostname",
    "reject_unknown_hostname", "reject_non_fqdn_helo_hostname", "reject_non_fqdn_hostname",
    "reject_unknown_sender_domain", "reject_unknown_address", "reject_non_fqdn_sender",
    "reject_authenticated_sender_login_mismatch", "reject_known_sender_login_mismatch",
    "reject_unauthenticated_sender_login_mismatch", "reject_sender_login_mismatch",
    "reject_unlisted_sender", "permit_auth_destination", "reject_unauth_destination",
    "defer_unauth_destination", "reject_unknown_recipient_domain", "reject_non_fqdn_recipient",
    "reject_unlisted_recipient", "check_recipient_maps", "reject_multi_recipient_bounce",
})
# Postfix requires one of these in the relay or recipient restrictions.
_RCPT_REQUIRED = ("reject_unauth_destination", "defer_unauth_destination", "reject", "defer",
                  "defer_if_permit", "check_relay_domains")

# Which list is evaluated how: (reply class, default access restriction for
# a bare type:table element, whether defer_if_permit is resolved at the end).
_LISTS: dict[str, tuple[str, str | None, bool]] = {
    "smtpd_client_restrictions": (CLIENT, "check_client_access", False),
    "smtpd_helo_restrictions": (HELO, "check_helo_access", False),
    "smtpd_sender_restrictions": (SENDER, "check_sender_access", False),
    "smtpd_relay_restrictions": (RECIPIENT, "check_recipient_access", True),
    "smtpd_recipient_restrictions": (RECIPIENT, "check_recipient_access", True),
    "smtpd_etrn_restrictions": (ETRN, "check_etrn_access", True),
    "smtpd_data_restrictions": (DATA, None, True),
    "smtpd_end_of_data_restrictions": (EOD, None, True),
}
_STAGE_LIST = {"connect": "smtpd_client_restrictions", "helo": "smtpd_helo_restrictions",
               "mail": "smtpd_sender_restrictions", "rcpt": "smtpd_recipient_restrictions",
               "data": "smtpd_data_restrictions", "end-of-data": "smtpd_end_of_data_restrictions",
               "etrn": "smtpd_etrn_restrictions"}
_WHERE = {"connect": "CONNECT", "mail": "MAIL", "rcpt": "RCPT", "data": "DATA",
          "end-of-data": "END-OF-MESSAGE", "etrn": "ETRN", "vrfy": "VRFY"}

_DSN_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_HEADER_RE = re.compile(r"[!-9;-~]+[ \t]*:")
# smtpd_expand_filter default: what remote text (RBL TXT) may put in a reply.
_EXPAND_OK = frozenset("\t !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                       "[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~")


# --------------------------------------------------------------------------
# Values exchanged with the session


@dataclass
class Facts:
    """What the session knows at this point (Postfix SMTPD_STATE)."""

    client_addr: str  # "192.0.2.1"
    client_name: str = "unknown"  # verified reverse name or "unknown"
    reverse_client_name: str = "unknown"  # PTR result even if not forward-confirmed
    client_name_tempfail: bool = False  # PTR/forward lookup failed temporarily
    helo: str | None = None
    sender: str | None = None  # MAIL FROM address text ("" = null sender), None before MAIL
    recipient: str | None = None  # current RCPT TO address text
    sasl_username: str | None = None
    sasl_method: str | None = None
    tls: bool = False
    protocol: str = "ESMTP"
    queue_id: str | None = None
    stage: str = "rcpt"  # connect | helo | mail | rcpt | data | end-of-data | etrn
    pipelining_violation: bool = False  # for reject_unauth_pipelining
    rcpt_count: int = 0
    size: int | None = None
    # --- optional extras ---------------------------------------------------
    client_port: str = ""
    server_addr: str = ""
    server_port: str = ""
    instance: str = ""  # unique per mail transaction (policy protocol "instance")
    etrn_domain: str | None = None
    discard: bool = False  # the transaction already has DISCARD: Postfix skips further checks
    # defer_if_permit raised by an earlier stage (smtpd_delay_reject = no):
    # pass Decision.defer_if_permit of the previous stage here.
    defer_if_permit: Reply | None = None

    @property
    def namaddr(self) -> str:
        return f"{self.client_name}[{self.client_addr}]"


@dataclass
class Decision:
    """The outcome of one evaluation.

    ``action``: "permit" (a list ended with permit/OK), "dunno" (nothing
    matched; also an accept), "reject" (5xx) or "defer" (4xx).  Side effects
    (hold, discard, prepend, filter) are reported whatever the action: as in
    Postfix they belong to the mail transaction once triggered.
    """

    action: str
    reply: Reply | None = None
    hold: bool = False
    discard: bool = False
    prepend: list[str] = field(default_factory=list)
    filter: str | None = None
    log: str = ""  # the reject/defer line: "NOQUEUE: reject: RCPT from ...: 554 5.7.1 ...; from=<..> ..."
    logs: list[str] = field(default_factory=list)  # every line logged during the evaluation
    defer_if_permit: Reply | None = None  # pending after a client/helo/sender stage

    @property
    def accepted(self) -> bool:
        return self.action in ("permit", "dunno")


# --------------------------------------------------------------------------
# Internal state of one evaluation


class _Abort(Exception):
    """Postfix longjmp(smtpd_check_buf): abandon the current stage."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@dataclass
class _Pending:
    code: int
    dsn: str
    text: str
    error_class: str = _POLICY


@dataclass
class _State:
    facts: Facts
    helo: str | None
    sender: str | None
    recipient: str | None
    recursion: int = 0
    warn_if_reject: int = 0
    defer_if_permit: _Pending | None = None
    defer_if_reject: _Pending | None = None
    discard: bool = False
    hold: bool = False
    prepend: list[str] = field(default_factory=list)
    filter: str | None = None
    reply: Reply | None = None
    reply_log: str = ""
    logs: list[str] = field(default_factory=list)
    sender_rcptmap_checked: bool = False
    recipient_rcptmap_checked: bool = False
    policy_nesting: int = 0

    def reset(self) -> None:  # Postfix SMTPD_CHECK_RESET
        self.recursion = 0
        self.warn_if_reject = 0
        self.defer_if_reject = None


@dataclass(frozen=True)
class _Resolved:
    """A resolved address (Postfix smtpd_resolve_addr)."""

    address: str  # canonical, lower-cased, always with @domain
    local: str
    domain: str
    address_class: str
    routed: bool


class _Map:
    """One access table, opened from one spec."""

    def __init__(self, spec: str, tables: TableList | None, error: str | None):
        self.spec = spec
        self.kind = spec.partition(":")[0].strip().lower()
        self.tables = tables
        self.error = error

    def find(self, key: str, partial: bool) -> str | None:
        if self.tables is None or not key:
            return None
        if partial and self.kind in _PATTERN_TABLES:
            return None
        return self.tables.lookup(key)


# --------------------------------------------------------------------------
# Small Postfix helpers


def _dsn_valid(dsn: str) -> bool:
    return bool(_DSN_RE.fullmatch(dsn))


def _dsn_split(default: str, text: str) -> tuple[str, str]:
    """Postfix dsn_split(): an optional leading ``X.Y.Z`` in ``text``."""
    m = _DSN_RE.match(text)
    if m:
        return m.group(0), text[m.end():].lstrip()
    return default, text


def _dsn_fix(dsn: str, reply_class: str) -> str:
    """Postfix smtpd_dsn_fix(): make an address DSN fit what is rejected."""
    if not (dsn[:1].isdigit() and dsn[1:4] == ".1."):
        return dsn
    sender = {"1": "4.1.0", "2": "4.1.8", "3": "4.1.7", "4": "4.1.0", "5": "4.1.0", "6": "4.1.0",
              "7": "4.1.7", "8": "4.1.8"}
    rcpt = {"1": "4.1.1", "2": "4.1.2", "3": "4.1.3", "4": "4.1.4", "5": "4.1.5", "6": "4.1.6",
            "7": "4.1.3", "8": "4.1.2"}
    micro = dsn[4:]
    if reply_class == SENDER:
        return sender.get(micro, "4.1.0")
    if reply_class == RECIPIENT:
        return rcpt.get(micro, "4.1.0")
    return "4.0.0"


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _expand_filter(text: str) -> str:
    return "".join(ch if ch in _EXPAND_OK else "_" for ch in text)


def _dup_if_truncate(name: str) -> str:
    """Strip one trailing dot (but not from "..")."""
    if len(name) > 1 and name.endswith(".") and name[-2] != ".":
        return name[:-1]
    return name


@functools.lru_cache(maxsize=4096)
def _valid_hostaddr(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _valid_mailhost_addr(text: str) -> bool:
    """Postfix valid_mailhost_addr(): ``d.d.d.d`` or ``IPv6:...``."""
    if text[:5].lower() == "ipv6:":
        try:
            return isinstance(ipaddress.ip_address(text[5:]), ipaddress.IPv6Address)
        except ValueError:
            return False
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def _ascii_domain(name: str) -> str | None:
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _valid_hostname(name: str) -> bool:
    ascii_name = _ascii_domain(name)
    return ascii_name is not None and valid_hostname(ascii_name)


def _ip_match(pattern: str, address: str) -> bool:
    """Postfix ip_match(3): ``127.0.0.2``, ``127.0.0.[2;4]``, ``127.0.0.[2..11]``.

    Raises ValueError for a malformed pattern."""
    parts = re.findall(r"\[[^\]]*\]|[^.]+", pattern)
    if len(parts) != 4 or ".".join(parts) != pattern:
        raise ValueError(f"bad address pattern: {pattern!r}")
    octets = address.split(".")
    if len(octets) != 4 or not all(o.isdigit() for o in octets):
        return False
    for part, octet in zip(parts, octets):
        value = int(octet)
        if part.startswith("["):
            ok = False
            for item in part[1:-1].split(";"):
                lo, sep, hi = item.partition("..")
                if not lo.isdigit() or (sep and not hi.isdigit()):
                    raise ValueError(f"bad address pattern: {pattern!r}")
                if int(lo) <= value <= int(hi if sep else lo):
                    ok = True
            if not ok:
                return False
        else:
            if not part.isdigit() or int(part) > 255:
                raise ValueError(f"bad address pattern: {pattern!r}")
            if int(part) != value:
                return False
    return True


def _split_at_right(addr: str, delim: str) -> str | None:
    i = addr.rfind(delim)
    return addr[:i] if i >= 0 else None


def _lname(token: str) -> str:
    return token.lower()


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


# --------------------------------------------------------------------------
# The checker


class RestrictionChecker:
    """Postfix restriction lists over one Config (rebuilt on reload).

    ``resolver``: address classes (local/virtual/relay/...).  ``dns``: the
    async resolver for DNS-based checks (None: every DNS check counts as a
    temporary failure).  ``is_mynetworks(ip)``: ``permit_mynetworks``.
    ``recipient_known(address)``: the recipient table check (True known,
    False unknown, None not applicable) for ``reject_unlisted_*``.
    ``sender_login_owner(sender)``: optional replacement for
    ``smtpd_sender_login_maps`` returning the owning logins or None (may be
    async).  ``policy_hooks``: ``check_python_policy NAME`` calls
    ``policy_hooks[NAME](facts)``, an async callable returning an access(5)
    result.  ``log(line)`` receives every line as Postfix would log it
    (without the syslog prefix).  ``params``: per-service overrides
    (master.cf ``-o``) taking precedence over ``config``.
    ``supports_filter``: whether FILTER results are honoured (else they are
    ignored with a warning).
    """

    def __init__(self, config: Config, *, resolver: AddressResolver, dns: Any | None,
                 is_mynetworks: Callable[[str], bool],
                 recipient_known: Callable[[str], Awaitable[bool | None]] | None = None,
                 sender_login_owner: Callable[[str], Any] | None = None,
                 policy_hooks: Mapping[str, Callable[[Facts], Awaitable[str | None]]] | None = None,
                 log: Callable[[str], None] | None = None,
                 params: Mapping[str, Any] | None = None,
                 supports_filter: bool = False):
        self.config = config
        self.resolver = resolver
        self.dns = dns
        self.is_mynetworks = is_mynetworks
        self.recipient_known = recipient_known
        self.sender_login_owner = sender_login_owner
        self.policy_hooks = dict(policy_hooks or {})
        self._log = log
        self._params = dict(params or {})
        self.supports_filter = supports_filter
        self.myorigin = config.myorigin.lower()
        self._maps: dict[str, _Map] = {}
        self._warned: set[str] = set()
        # Postfix: parent_domain_matches_subdomains contains smtpd_access_maps
        # => "example.com" also matches subdomains; otherwise ".example.com".
        self.parent_style = "smtpd_access_maps" in self._param("parent_domain_matches_subdomains")
        self.classes = {name: tuple(self._param(name)) for name in self._param("smtpd_restriction_classes")}
        # Pre-open every table the lists mention (Postfix opens them at start).
        for name, tokens in self._all_lists():
            for kind, token in self._tokens(tokens):
                if kind == "table":
                    self._map(token)
        login_maps = self._param("smtpd_sender_login_maps")
        self._login_maps = [self._map(spec) for spec in login_maps]

    # ------------------------------------------------------------ config
    def _param(self, name: str) -> Any:
        if name in self._params:
            return self._params[name]
        return self.config[name]

    def _all_lists(self) -> Iterable[tuple[str, Sequence[str]]]:
        for name in _LISTS:
            yield name, tuple(self._param(name))
        yield from self.classes.items()

    def _tokens(self, tokens: Sequence[str]) -> Iterable[tuple[str, str]]:
        """Classify list elements: ("name", x), ("table", spec), ("arg", x)."""
        i = 0
        while i < len(tokens):
            token = tokens[i]
            low = _lname(token)
            if ":" in token and low not in _SIMPLE:
                yield "table", token
            elif low in _TABLE_ARG:
                yield "name", token
                if i + 1 < len(tokens):
                    i += 1
                    yield "table", tokens[i]
            elif low in _OTHER_ARG:
                yield "name", token
                if i + 1 < len(tokens):
                    i += 1
                    yield "arg", tokens[i]
            else:
                yield "name", token
            i += 1

    def _map(self, spec: str) -> _Map:
        cached = self._maps.get(spec)
        if cached is not None:
            return cached
        try:
            tables: TableList | None = open_tables([spec], warn=self._emit_warning)
            error = None
        except Exception as exc:  # TableError, OSError, a new table type's error: a config problem
            tables, error = None, f"{type(exc).__name__}: {exc}"
        entry = _Map(spec, tables, error)
        self._maps[spec] = entry
        return entry

    def reload_tables(self) -> None:
        """Re-read access tables whose files changed (blocking: call in a thread)."""
        for entry in list(self._maps.values()):
            tables = getattr(entry, "tables", None)
            if tables is not None:
                tables.reload_if_changed()

    def configuration_problems(self) -> list[str]:
        """Configuration errors Postfix would report at start-up (one line each)."""
        problems: list[str] = []
        for list_name, tokens in self._all_lists():
            items = list(tokens)
            for i, token in enumerate(items):
                low = _lname(token)
                if (low in _TABLE_ARG or low in _OTHER_ARG) and i + 1 >= len(items):
                    problems.append(f"{list_name}: restriction {token} needs an argument")
            for kind, token in self._tokens(items):
                if kind == "table":
                    entry = self._map(token)
                    if entry.error:
                        problems.append(f"{list_name}: cannot open table {token}: {entry.error}")
                elif kind == "name":
                    low = _lname(token)
                    if low not in _SIMPLE and low not in _TABLE_ARG and low not in _OTHER_ARG \
                            and token not in self.classes:
                        problems.append(f"{list_name}: unknown smtpd restriction: \"{token}\"")
            if list_name in self.classes and not items:
                problems.append(f"restriction class `{list_name}' needs a definition")
        for name, tokens in self._all_lists():
            items = list(tokens)
            for i, token in enumerate(items):
                if _lname(token) == "check_python_policy" and i + 1 < len(items) \
                        and items[i + 1] not in self.policy_hooks:
                    problems.append(f"{name}: no Python policy hook named {items[i + 1]!r}")
        if not (self._has_required(self._param("smtpd_recipient_restrictions"), set())
                or self._has_required(self._param("smtpd_relay_restrictions"), set())):
            problems.append("in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, "
                            "specify at least one working instance of: reject_unauth_destination, "
                            "defer_unauth_destination, reject, defer, defer_if_permit or check_relay_domains")
        for entry in self._login_maps:
            if entry.error:
                problems.append(f"smtpd_sender_login_maps: cannot open table {entry.spec}: {entry.error}")
        return problems

    def _has_required(self, tokens: Sequence[str], seen: set[str]) -> bool:
        items = list(tokens)
        i = 0
        while i < len(items):
            low = _lname(items[i])
            if low == "warn_if_reject" and i + 1 < len(items):
                i += 2
                continue
            if low == "permit":
                return False
            if low in _RCPT_REQUIRED:
                return True
            if items[i] in self.classes and items[i] not in seen:
                if self._has_required(self.classes[items[i]], seen | {items[i]}):
                    return True
            i += 1
        return False

    # ------------------------------------------------------------ logging
    def _emit(self, st: _State | None, line: str) -> None:
        if st is not None:
            st.logs.append(line)
        if self._log is not None:
            self._log(line)

    def _emit_warning(self, text: str) -> None:
        self._emit(None, text if text.startswith("warning:") else f"warning: {text}")

    def _warn(self, st: _State | None, text: str) -> None:
        self._emit(st, f"warning: {text}")

    def _warn_once(self, st: _State | None, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self._warn(st, text)

    def _where(self, facts: Facts) -> str:
        if facts.stage == "helo":
            return "EHLO" if facts.protocol.upper().startswith("ESMTP") else "HELO"
        return _WHERE.get(facts.stage, facts.stage.upper())

    def _whatsup(self, st: _State, whatsup: str, text: str) -> str:
        """Postfix log_whatsup()."""
        f = st.facts
        line = f"{f.queue_id or 'NOQUEUE'}: {whatsup}: {self._where(f)} from {f.namaddr}: {text};"
        if st.sender is not None:
            line += f" from=<{st.sender}>"
        if st.recipient is not None:
            line += f" to=<{st.recipient}>"
        if f.protocol:
            line += f" proto={f.protocol}"
        if st.helo is not None:
            line += f" helo=<{st.helo}>"
        self._emit(st, line)
        return line

    # ------------------------------------------------------------ replies
    def _reject(self, st: _State, code: int, dsn: str, text: str, error_class: str = _POLICY) -> int:
        """Postfix smtpd_check_reject()."""
        warn = bool(st.warn_if_reject) and error_class not in _NOT_WARNABLE
        whatsup = "reject_warning" if warn else "reject"
        if not 400 <= code <= 599:
            self._warn(st, f"SMTP reply code configuration error: {code} {dsn} {text}")
            code, dsn, text = 450, "4.7.1", "Service unavailable"
        if not _dsn_valid(dsn):
            self._warn(st, f"DSN detail code configuration error: {code} {dsn} {text}")
            code, dsn, text = 450, "4.7.1", "Service unavailable"
        # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with CRLF.
        text = _printable(text)[: max(0, 510 - len(f"{code} {dsn} "))]
        # An earlier temporary error may have prevented us from accepting:
        # report that instead of a permanent reject.
        if not warn and st.defer_if_reject is not None and code >= 500:
            pending = st.defer_if_reject
            st.warn_if_reject = 0
            st.defer_if_reject = None
            return self._reject(st, pending.code, pending.dsn, pending.text, pending.error_class)
        dsn = str(code)[0] + dsn[1:]
        line = self._whatsup(st, whatsup, f"{code} {dsn} {text}")
        if warn:
            return DUNNO
        st.reply = Reply(code, dsn, text)
        st.reply_log = line
        return REJECT

    def _server_error(self, st: _State) -> None:
        raise _Abort(self._reject(st, 451, "4.3.5", "Server configuration error", _SOFTWARE))

    def _dict_retry(self, st: _State, reply_name: str) -> None:
        raise _Abort(self._reject(st, 451, "4.3.0", f"<{reply_name}>: Temporary lookup failure", _DATA))

    def _defer_if_permit(self, st: _State, code: int, dsn: str, text: str, *, action: str = "defer_if_permit",
                         error_class: str = _POLICY) -> int:
        """Postfix DEFER_IF_PERMIT: remember unless warning or tempfail action is "defer"."""
        if st.warn_if_reject == 0 and action != "defer":
            if st.defer_if_permit is None:
                st.defer_if_permit = _Pending(code, dsn, text, error_class)
            return DUNNO
        return self._reject(st, code, dsn, text, error_class)

    def _defer_if_reject(self, st: _State, code: int, dsn: str, text: str) -> int:
        if st.defer_if_reject is None:
            st.defer_if_reject = _Pending(code, dsn, text)
        return DUNNO

    def _tempfail_action(self, st: _State, param: str) -> str:
        value = str(self._param(param)).strip().lower()
        if value not in ("defer", "defer_if_permit"):
            self._warn_once(st, f"bad configuration: {param} = {value}; using defer_if_permit")
            return "defer_if_permit"
        return value

    # ------------------------------------------------------------ address helpers
    def _resolve(self, text: str) -> _Resolved:
        """Postfix smtpd_resolve_addr(): qualify with $myorigin, classify, flag routing."""
        t = text
        routed = False
        if t.startswith("@"):  # a source route the session did not strip
            depth, cut = 0, -1
            for i, ch in enumerate(t):
                if ch == "[":
                    depth += 1
                elif ch == "]":
                    depth = max(0, depth - 1)
                elif ch == ":" and depth == 0:
                    cut = i
                    break
            t = t[cut + 1:] if cut >= 0 else t.lstrip("@")
            routed = True
        try:
            parsed = parse_address(t)
            local, domain = parsed.local, parsed.domain
            routed = routed or parsed.routed
        except AddressSyntaxError:
            local, sep, domain = t.rpartition("@")
            if not sep:
                local, domain = t, ""
            domain = domain.lower()
            routed = True  # unparsable: never an authorized destination
        if not domain:
            domain = self.myorigin
        try:
            cls = self.resolver.address_class(domain)
        except Exception:  # a table problem in the resolver: not final, not relay
            cls = DEFAULT
        address = f"{quote_local(local) if local else local}@{domain}".lower()
        return _Resolved(address, local.lower(), domain, cls, routed)

    def _is_final(self, cls: str) -> bool:
        return cls in (LOCAL, VIRTUAL, VIRTUAL_ALIAS)

    # ------------------------------------------------------------ access tables
    def _lookup(self, st: _State, entry: _Map, key: str, partial: bool, reply_name: str) -> str | None:
        try:
            return entry.find(key, partial)
        except Exception as exc:  # unknown means temporary
            self._warn(st, f"{entry.spec}: table lookup error for \"{key}\": {exc}")
            self._dict_retry(st, reply_name)
            return None

    def _access_map(self, st: _State, spec: str) -> _Map:
        entry = self._map(spec)
        if entry.error:
            self._warn(st, f"{spec}: cannot open table: {entry.error}")
            self._server_error(st)
        return entry

    async def _check_access(self, st: _State, spec: str, keys: Sequence[tuple[str, bool]], datum: str,
                            reply_name: str, reply_class: str, def_acl: str | None) -> tuple[int, bool]:
        """Look keys up in order; the first key found decides (status, found)."""
        entry = self._access_map(st, spec)
        for key, partial in keys:
            value = self._lookup(st, entry, key, partial, reply_name)
            if value is not None:
                return await self._table_result(st, spec, value, datum, reply_name, reply_class, def_acl), True
        return DUNNO, False

    def _parents(self, domain: str) -> list[str]:
        """Parent domains: bare names when parent_domain_matches_subdomains
        lists smtpd_access_maps (Postfix default), else ``.parent`` names."""
        out = []
        name = domain
        while True:
            i = name.find(".", 1)
            if i < 0:
                break
            name = name[i + 1:] if self.parent_style else name[i:]
            if not name:
                break
            out.append(name)
        return out

    def _domain_keys(self, domain: str) -> list[tuple[str, bool]]:
        """Postfix check_domain_access(): name, then parent domains."""
        if not domain:
            return []
        if _valid_hostaddr(domain):  # no subdomain magic for numerical names
            return [(domain, False)]
        return [(domain, False)] + [(parent, True) for parent in self._parents(domain)]

    @staticmethod
    def _addr_keys(addr: str) -> list[tuple[str, bool]]:
        """Postfix check_addr_access(): 1.2.3.4, 1.2.3, 1.2, 1 (IPv6 by ':')."""
        delim = ":" if ":" in addr else "."
        keys = [(addr, False)]
        current: str | None = addr
        while True:
            current = _split_at_right(current, delim)
            if current is None:
                break
            keys.append((current, True))
        return keys

    def _mail_keys(self, resolved: _Resolved) -> list[tuple[str, bool]]:
        """access(5) address lookup order (Postfix check_mail_access strategy)."""
        local, domain = resolved.local, resolved.domain
        delim = self._param("recipient_delimiter")
        qlocal = quote_local(local).lower() if local else ""
        keys = [(resolved.address, False)]
        bare_local = strip_extension(local, delim) if delim else local
        if bare_local != local:
            keys.append((f"{quote_local(bare_local).lower()}@{domain}", True))
        keys.append((domain, True))
        if not domain.startswith("["):
            keys.extend((parent, True) for parent in self._parents(domain))
        keys.append((f"{qlocal}@", True))
        if bare_local != local:
            keys.append((f"{quote_local(bare_local).lower()}@", True))
        return keys

    async def _check_mail_access(self, st: _State, spec: str, addr: str, reply_name: str, reply_class: str,
                                 def_acl: str | None) -> int:
        resolved = self._resolve(addr)
        status, found = await self._check_access(st, spec, self._mail_keys(resolved), resolved.address,
                                                 reply_name, reply_class, def_acl)
        # Source-routed recipients are too suspicious for an OK.
        if status == OK and resolved.routed and reply_class == RECIPIENT:
            return DUNNO
        return status

    async def _check_namadr_access(self, st: _State, spec: str, name: str, addr: str, reply_name: str,
                                   reply_class: str, def_acl: str | None) -> int:
        status, found = await self._check_access(st, spec, self._domain_keys(name.lower()), name,
                                                 reply_name, reply_class, def_acl)
        if status != DUNNO or found:
            return status
        status, found = await self._check_access(st, spec, self._addr_keys(addr.lower()), addr,
                                                 reply_name, reply_class, def_acl)
        return status

    async def _table_result(self, st: _State, table: str, value: str, datum: str, reply_name: str,
                            reply_class: str, def_acl: str | None) -> int:
        """Postfix check_table_result(): an access(5) result."""
        value = value.strip()
        cmd, _, cmd_text = value.partition(" ")
        if "\t" in cmd:
            cmd, _, rest = cmd.partition("\t")
            cmd_text = f"{rest} {cmd_text}"
        cmd_text = cmd_text.strip()
        word = cmd.upper()

        if word == "DUNNO":
            return DUNNO
        if word == "REJECT":
            dsn, text = _dsn_split("5.7.1", cmd_text)
            return self._reject(st, self._param("access_map_reject_code"), _dsn_fix(dsn, reply_class),
                                f"<{reply_name}>: {reply_class} rejected: {text or 'Access denied'}")
        if word == "DEFER":
            dsn, text = _dsn_split("4.7.1", cmd_text)
            return self._reject(st, self._param("access_map_defer_code"), _dsn_fix(dsn, reply_class),
                                f"<{reply_name}>: {reply_class} rejected: {text or 'Access denied'}")
        if word == "INFO":
            self._whatsup(st, "info", cmd_text)
            return DUNNO
        if word == "WARN":
            self._whatsup(st, "warn", cmd_text)
            return DUNNO
        if word == "FILTER":
            if not self._can_delegate(st, table, "FILTER"):
                return DUNNO
            if not cmd_text:
                self._warn(st, f"access table {table} entry \"{datum}\" has FILTER entry without value")
                return DUNNO
            if ":" not in cmd_text:
                self._warn(st, f"access table {table} entry \"{datum}\" requires transport:destination")
                return DUNNO
            if not self.supports_filter:
                self._warn(st, f"access table {table}: action FILTER is not supported by this server; "
                               f"ignoring \"FILTER {cmd_text}\"")
                return DUNNO
            self._whatsup(st, "filter", f"<{reply_name}>: {reply_class} triggers FILTER {cmd_text}")
            st.filter = cmd_text
            return DUNNO
        if word == "HOLD":
            if not self._can_delegate(st, table, "HOLD") or st.hold:
                return DUNNO
            self._whatsup(st, "hold", f"<{reply_name}>: {reply_class} {cmd_text or 'triggers HOLD action'}")
            st.hold = True
            return DUNNO
        if word == "DISCARD":
            if not self._can_delegate(st, table, "DISCARD"):
                return DUNNO
            self._whatsup(st, "discard", f"<{reply_name}>: {reply_class} {cmd_text or 'triggers DISCARD action'}")
            st.discard = True
            return OK
        if word in ("REDIRECT", "BCC"):
            if not self._can_delegate(st, table, word):
                return DUNNO
            self._warn(st, f"access table {table}: action {word} is not supported by this server; "
                           f"ignoring \"{word} {cmd_text}\"")
            return DUNNO
        if word == "DEFER_IF_PERMIT":
            dsn, text = _dsn_split("4.7.1", cmd_text)
            return self._defer_if_permit(st, self._param("access_map_defer_code"), _dsn_fix(dsn, reply_class),
                                         f"<{reply_name}>: {reply_class} rejected: {text or 'Service unavailable'}")
        if word == "DEFER_IF_REJECT":
            dsn, text = _dsn_split("4.7.1", cmd_text)
            return self._defer_if_reject(st, self._param("access_map_defer_code"), _dsn_fix(dsn, reply_class),
                                         f"<{reply_name}>: {reply_class} rejected: {text or 'Service unavailable'}")
        if word == "PREPEND":
            if not self._not_in_client_helo(st, table, "PREPEND"):
                return DUNNO
            if st.facts.stage == "end-of-data":
                self._warn(st, f"access table {table}: action PREPEND must be used before "
                               f"smtpd_end_of_data_restrictions")
                return DUNNO
            if not cmd_text or not _HEADER_RE.match(cmd_text):
                self._warn(st, f"access table {table} entry \"{datum}\" requires header: text")
                return DUNNO
            st.prepend.append(cmd_text)
            return DUNNO
        if value.isdigit():
            # Some out-of-band authentication stores time stamps: means OK.
            return OK
        if len(cmd) == 3 and cmd_text and cmd[0] in "45" and cmd[1:].isdigit():
            dsn, text = _dsn_split(f"{cmd[0]}.7.1", cmd_text)
            return self._reject(st, int(cmd), _dsn_fix(dsn, reply_class),
                                f"<{reply_name}>: {reply_class} rejected: {text or 'Access denied'}")
        if word in ("OK", "RELAY"):
            return OK
        if ":" in value:
            self._warn(st, f"access table {table} has entry with lookup table: {value}")
            self._warn(st, "do not specify lookup tables inside SMTPD access maps")
            self._warn(st, "define a restriction class and specify its name instead.")
            self._server_error(st)
        if st.recursion > MAX_RECURSION:
            self._warn(st, f"access table {table} entry {value} causes unreasonable recursion")
            self._server_error(st)
        restrictions = split_list(value)
        if not restrictions:
            self._warn(st, f"access table {table} entry {value} has empty value")
            return OK
        return await self._generic_checks(st, restrictions, reply_name, reply_class, def_acl)

    def _not_in_client_helo(self, st: _State, table: str, action: str) -> bool:
        # smtpd_delay_reject = no: client/HELO actions cannot affect a mail
        # transaction that does not exist yet.
        if st.sender is None:
            self._warn(st, f"access table {table}: with smtpd_delay_reject=no, action {action} is always "
                           f"skipped in {CLIENT} or {HELO} restrictions")
            return False
        return True

    def _can_delegate(self, st: _State, table: str, action: str) -> bool:
        if st.facts.stage == "etrn":
            self._warn(st, f"access table {table}: action {action} is unavailable in smtpd_etrn_restrictions")
            return False
        return self._not_in_client_helo(st, table, action)

    # ------------------------------------------------------------ DNS
    async def _dns(self, st: _State, name: str, rdtype: str) -> list[str] | None:
        """Records, [] for NXDOMAIN/NODATA/malformed name, None for a temporary failure."""
        if self.dns is None:
            self._warn_once(st, "no DNS resolver configured: DNS-based restrictions fail temporarily")
            return None
        try:
            return await self.dns.lookup(name, rdtype)
        except DnsError as exc:
            return None if exc.temporary else []
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # unknown means temporary
            self._warn(st, f"DNS lookup error for {name}/{rdtype}: {type(exc).__name__}: {exc}")
            return None

    async def _reject_unknown_hostname(self, st: _State, name: str, reply_name: str, reply_class: str) -> int:
        """Postfix reject_unknown_hostname(): no A, AAAA or MX record."""
        lookup_name = _ascii_domain(name.rstrip(".")) or name
        results = await asyncio.gather(*(self._dns(st, lookup_name, t) for t in ("A", "AAAA", "MX")))
        if any(results):  # found something (an MTA name may have a null MX)
            return DUNNO
        if any(r is None for r in results):
            return self._defer_if_permit(st, 450, "4.7.1", f"<{reply_name}>: {reply_class} rejected: Host not found",
                                         action=self._tempfail_action(st, "unknown_helo_hostname_tempfail_action"))
        return self._reject(st, self._param("unknown_hostname_reject_code"), "4.7.1",
                            f"<{reply_name}>: {reply_class} rejected: Host not found")

    async def _reject_unknown_mailhost(self, st: _State, name: str, reply_name: str, reply_class: str) -> int:
        """Postfix reject_unknown_mailhost(): MX, then A/AAAA; null MX (RFC 7505)."""
        is_sender = reply_class == SENDER
        lookup_name = _ascii_domain(name) or name
        mx = await self._dns(st, lookup_name, "MX")
        if mx and len(mx) == 1 and mx[0].split()[-1] == ".":
            return self._reject(st, 550 if is_sender else 556, "4.7.27" if is_sender else "4.1.10",
                                f"<{reply_name}>: {reply_class} rejected: Domain {name} "
                                f"does not accept mail (nullMX)")
        if mx:
            return DUNNO
        a, aaaa = await asyncio.gather(self._dns(st, lookup_name, "A"), self._dns(st, lookup_name, "AAAA"))
        if a or aaaa:
            return DUNNO
        dsn = "4.1.8" if is_sender else "4.1.2"
        if mx is None or a is None or aaaa is None:
            return self._defer_if_permit(st, 450, dsn, f"<{reply_name}>: {reply_class} rejected: Domain not found",
                                         action=self._tempfail_action(st, "unknown_address_tempfail_action"))
        return self._reject(st, self._param("unknown_address_reject_code"), dsn,
                            f"<{reply_name}>: {reply_class} rejected: Domain not found")

    async def _reject_unknown_address(self, st: _State, addr: str, reply_name: str, reply_class: str) -> int:
        resolved = self._resolve(addr)
        if self._is_final(resolved.address_class) or resolved.domain.startswith("["):
            return DUNNO
        return await self._reject_unknown_mailhost(st, resolved.domain, reply_name, reply_class)

    # --- DNS lists -----------------------------------------------------------
    async def _dnsxl(self, st: _State, query: str, reply_filter: str | None) -> str | tuple[str, str]:
        """Look up one DNSxL name: "miss", "soft" or ("hit", TXT text)."""
        addrs = await self._dns(st, query, "A")
        if addrs is None:
            self._warn(st, f"{query}: RBL lookup error: Host or domain name not found. "
                           f"Name service error for name={query} type=A: Host not found, try again")
            return "soft"
        if not addrs:
            return "miss"
        if reply_filter is not None:
            try:
                if not any(_ip_match(reply_filter, a) for a in addrs):
                    return "miss"
            except ValueError as exc:
                self._warn(st, f"RBL reply error: {exc}")
                self._server_error(st)
        txts = await self._dns(st, query, "TXT") or []
        txt = ""
        for n, record in enumerate(txts):
            space = RBL_TXT_LIMIT - len(txt)
            if space <= 0:
                break
            txt += record[:space]
            if n + 1 < len(txts) and RBL_TXT_LIMIT - len(txt) > 3:
                txt += " / "
        return ("hit", txt)

    @staticmethod
    def _split_zone(zone: str) -> tuple[str, str | None]:
        name, sep, reply_filter = zone.partition("=")
        return name.rstrip("."), (reply_filter if sep else None)

    @staticmethod
    def _reverse_ip(addr: str) -> str | None:
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if isinstance(ip, ipaddress.IPv4Address):
            return ".".join(reversed(str(ip).split(".")))
        return ip.reverse_pointer[: -len(".ip6.arpa")]

    def _rbl_reply(self, st: _State, zone: str, what: str, reply_class: str, txt: str) -> int:
        """Postfix rbl_reject_reply() with the default_rbl_reply template."""
        code = self._param("maps_rbl_reject_code")
        domain = self._split_zone(zone)[0]
        reason = f"; {_expand_filter(txt)}" if txt else ""
        text = f"Service unavailable; {reply_class} [{_expand_filter(what)}] blocked using {domain}{reason}"
        if not (isinstance(code, int) and 400 <= code <= 599):
            self._warn(st, f"rbl response code configuration error: {code} {text}")
            return self._reject(st, 450, "4.7.1", "Service unavailable")
        dsn, text = _dsn_split("4.7.1", text)
        return self._reject(st, code, _dsn_fix(dsn, reply_class), text or "Service unavailable")

    async def _reject_rbl_addr(self, st: _State, zone: str, addr: str, reply_class: str) -> int:
        reverse = self._reverse_ip(addr)
        if reverse is None:
            return DUNNO
        name, reply_filter = self._split_zone(zone)
        result = await self._dnsxl(st, f"{reverse}.{name}", reply_filter)
        if result == "soft":
            # We can't block all email because a DNS list is unavailable, and
            # must not accept it unchecked either: turn a permit into 4xx.
            return self._defer_if_permit(st, 450, "4.7.1", f"<{addr}>: {reply_class} rejected: Service unavailable")
        if result == "miss":
            return DUNNO
        return self._rbl_reply(st, zone, addr, reply_class, result[1])

    def _rhsbl_domain(self, what: str) -> str | None:
        domain = what.rpartition("@")[2] if "@" in what else what
        if not domain or domain.startswith("["):
            return None
        suffix = domain.rpartition(".")[2]
        if suffix.isdigit():  # Spamhaus refuses "IP queries"; Postfix skips them
            return None
        ascii_name = _ascii_domain(domain.rstrip("."))
        if not ascii_name or not valid_hostname(ascii_name):
            return None
        return ascii_name.lower()

    async def _reject_rbl_domain(self, st: _State, zone: str, what: str, reply_class: str) -> int:
        domain = self._rhsbl_domain(what)
        if domain is None:
            return DUNNO
        name, reply_filter = self._split_zone(zone)
        result = await self._dnsxl(st, f"{domain}.{name}", reply_filter)
        if result == "soft":
            return self._defer_if_permit(st, 450, "4.7.1", f"<{what}>: {reply_class} rejected: Service unavailable")
        if result == "miss":
            return DUNNO
        return self._rbl_reply(st, zone, what, reply_class, result[1])

    async def _permit_dnswl(self, st: _State, query: str | None, reply_filter: str | None, what: str,
                            reply_class: str) -> int:
        # Safety: never allowlist an unauthorized recipient.
        if st.facts.stage == "rcpt" and st.recipient is not None \
                and self._permit_auth_destination(st.recipient) != OK:
            return DUNNO
        if query is None:
            return DUNNO
        result = await self._dnsxl(st, query, reply_filter)
        if result == "soft":
            return self._defer_if_reject(st, 450, "4.7.1", f"<{what}>: {reply_class} rejected: Service unavailable")
        return DUNNO if result == "miss" else OK

    # ------------------------------------------------------------ relay
    def _permit_auth_destination(self, recipient: str) -> int:
        """Postfix permit_auth_destination(): final or relay class, not routed."""
        resolved = self._resolve(recipient)
        if resolved.routed:  # allow_untrusted_routing = no
            return DUNNO
        if self._is_final(resolved.address_class) or resolved.address_class == RELAY:
            return OK
        return DUNNO

    def _reject_unauth_destination(self, st: _State, recipient: str, code: int, dsn: str) -> int:
        if self._permit_auth_destination(recipient) == OK:
            return DUNNO
        return self._reject(st, code, dsn, f"<{recipient}>: Relay access denied")

    # ------------------------------------------------------------ recipient tables
    async def _check_rcpt_maps(self, st: _State, address: str, reply_class: str) -> int:
        """Postfix check_rcpt_maps() through the recipient_known callback."""
        if self.recipient_known is None:
            return DUNNO
        if reply_class == RECIPIENT:
            if st.recipient_rcptmap_checked:
                return DUNNO
            if st.warn_if_reject == 0:
                st.recipient_rcptmap_checked = True
        else:
            if st.sender_rcptmap_checked:
                return DUNNO
            if st.warn_if_reject == 0:
                st.sender_rcptmap_checked = True
        try:
            known = await _maybe_await(self.recipient_known(address))
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # unknown means temporary
            self._warn(st, f"recipient table lookup for {address}: {type(exc).__name__}: {exc}")
            self._dict_retry(st, address)
            return DUNNO
        if known is None or known:
            return DUNNO
        cls = self._resolve(address).address_class
        table = {
            LOCAL: ("local recipient table", "unknown_local_recipient_reject_code"),
            VIRTUAL: ("virtual mailbox table", "unknown_virtual_mailbox_reject_code"),
            VIRTUAL_ALIAS: ("virtual alias table", "unknown_virtual_alias_reject_code"),
            RELAY: ("relay recipient table", "unknown_relay_recipient_reject_code"),
        }.get(cls)
        if table is None:  # default class: nothing to check against
            return DUNNO
        name, code_param = table
        return self._reject(st, self._param(code_param), "5.1.0" if reply_class == SENDER else "5.1.1",
                            f"<{address}>: {reply_class} rejected: User unknown in {name}", _BOUNCE)

    # ------------------------------------------------------------ SASL sender ownership
    async def _sender_owners(self, st: _State, sender: str) -> list[str] | None:
        if self.sender_login_owner is not None:
            try:
                owners = await _maybe_await(self.sender_login_owner(sender))
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:
                self._warn(st, f"sender login owner lookup for {sender}: {type(exc).__name__}: {exc}")
                self._dict_retry(st, sender)
                return None
            if owners is None:
                return None
            return [owners] if isinstance(owners, str) else list(owners)
        if not self._login_maps:
            self._warn_once(st, "smtpd_sender_login_maps is empty: no sender address has an owner")
            return None
        resolved = self._resolve(sender)
        local, domain = resolved.local, resolved.domain
        delim = self._param("recipient_delimiter")
        bare = strip_extension(local, delim) if delim else local
        keys = [(resolved.address, False)]
        if bare != local:
            keys.append((f"{quote_local(bare).lower()}@{domain}", True))
        if domain == self.myorigin or resolved.address_class == LOCAL:
            keys.append((quote_local(local).lower(), True))
            if bare != local:
                keys.append((quote_local(bare).lower(), True))
        keys.append((f"@{domain}", True))
        for entry in self._login_maps:
            if entry.error:
                self._warn(st, f"smtpd_sender_login_maps: cannot open table {entry.spec}: {entry.error}")
                self._server_error(st)
        for key, partial in keys:
            for entry in self._login_maps:
                value = self._lookup(st, entry, key, partial, sender)
                if value is not None:
                    return split_list(value)
        return None

    async def _reject_auth_sender_login_mismatch(self, st: _State, sender: str, allow_unknown: bool) -> int:
        username = st.facts.sasl_username
        if not username:
            return DUNNO
        owners = await self._sender_owners(st, sender)
        if owners is None:
            if allow_unknown:
                return DUNNO
            found = False
        else:
            found = any(o.casefold() == username.casefold() for o in owners)
        if not found:
            return self._reject(st, 553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {username}")
        return DUNNO

    async def _reject_unauth_sender_login_mismatch(self, st: _State, sender: str) -> int:
        if st.facts.sasl_username:
            return DUNNO
        if await self._sender_owners(st, sender) is not None:
            return self._reject(st, 553, "5.7.1", f"<{sender}>: Sender address rejected: not logged in")
        return DUNNO

    # ------------------------------------------------------------ policy delegation
    def _policy_attributes(self, st: _State) -> dict[str, str]:
        f = st.facts
        where = self._where(f)
        counted = f.stage in ("data", "end-of-data")
        return {
            "request": "smtpd_access_policy",
            "protocol_state": where,
            "protocol_name": f.protocol,
            "client_address": f.client_addr,
            "client_name": f.client_name,
            "client_port": f.client_port,
            "reverse_client_name": f.reverse_client_name,
            "server_address": f.server_addr,
            "server_port": f.server_port,
            "helo_name": st.helo or "",
            "sender": st.sender or "",
            "recipient": st.recipient or "",
            "recipient_count": str(f.rcpt_count if counted else 0),
            "queue_id": f.queue_id or "",
            "instance": f.instance,
            "size": str(f.size or 0),
            "etrn_domain": f.etrn_domain or "",
            "stress": "",
            "sasl_method": f.sasl_method or "",
            "sasl_username": f.sasl_username or "",
            "sasl_sender": "",
            "ccert_subject": "",
            "ccert_issuer": "",
            "ccert_fingerprint": "",
            "ccert_pubkey_fingerprint": "",
            "encryption_protocol": "",
            "encryption_cipher": "",
            "encryption_keysize": "0",
            "policy_context": "",
        }

    def _parse_policy_spec(self, spec: str) -> tuple[str, float, str, str]:
        """``inet:host:port`` or ``{ inet:host:port, timeout=10s, default_action=DUNNO }``."""
        timeout = float(self._param("smtpd_policy_service_timeout"))
        default_action = POLICY_DEFAULT_ACTION
        context = ""
        server = spec.strip()
        if server.startswith("{") and server.endswith("}"):
            items = split_list(server[1:-1])
            if not items:
                raise ValueError(f"empty policy service: \"{spec}\"")
            server = items[0]
            for item in items[1:]:
                if item.startswith("{") and item.endswith("}"):
                    item = item[1:-1].strip()
                key, sep, value = item.partition("=")
                key, value = key.strip().lower(), value.strip()
                if not sep:
                    raise ValueError(f"missing '=' in policy service attribute {item!r}")
                if key == "timeout":
                    timeout = parse_time(value, "s")
                elif key == "default_action":
                    default_action = value
                elif key == "policy_context":
                    context = value
                elif key in ("max_idle", "max_ttl", "request_limit", "try_limit", "retry_delay"):
                    pass  # connection management: one connection per request here
                else:
                    raise ValueError(f"unknown policy service attribute {key!r}")
        return server, timeout, default_action, context

    async def _policy_request(self, server: str, attrs: Mapping[str, str], timeout: float) -> str | None:
        """One policy delegation request; the action or None (failure)."""
        transport, _, endpoint = server.partition(":")
        transport = transport.lower()
        payload = "".join(f"{k}={_policy_value(v)}\n" for k, v in attrs.items()) + "\n"
        writer = None
        try:
            async with asyncio.timeout(timeout):
                if transport == "inet":
                    host, sep, port = endpoint.rpartition(":")
                    if not sep or not port.isdigit():
                        raise ValueError(f"bad policy service address {server!r}")
                    reader, writer = await asyncio.open_connection(host.strip("[]") or "127.0.0.1", int(port))
                elif transport == "unix":
                    # Postfix: a relative name (unix:private/policy) is under queue_directory.
                    path = endpoint if endpoint.startswith("/") else \
                        f"{str(self._param('queue_directory')).rstrip('/')}/{endpoint}"
                    reader, writer = await asyncio.open_unix_connection(path)
                else:
                    raise ValueError(f"unsupported policy service transport {server!r}")
                writer.write(payload.encode("utf-8", "surrogateescape"))
                await writer.drain()
                action = None
                while True:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("connection closed before the end of the reply")
                    text = line.decode("utf-8", "strict").rstrip("\r\n")
                    if text == "":
                        break
                    key, sep, value = text.partition("=")
                    if sep and key == "action":
                        action = value
                return action
        finally:
            if writer is not None:  # (a server that stopped reading: cut, not waited for)
                unsent = close_transport(writer.transport)
                if unsent is not None:
                    cut_transport(unsent)

    async def _check_policy_service(self, st: _State, spec: str, reply_name: str, reply_class: str,
                                    def_acl: str | None) -> int:
        try:
            server, timeout, default_action, context = self._parse_policy_spec(spec)
        except ValueError as exc:
            self._warn(st, f"policy service syntax error: {exc}")
            self._server_error(st)
            return DUNNO
        attrs = self._policy_attributes(st)
        attrs["policy_context"] = context
        action: str | None = None
        try:
            action = await self._policy_request(server, attrs, timeout)
            if action is None:
                self._warn(st, f"problem talking to server {server}: no action attribute in reply")
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except TimeoutError:
            self._warn(st, f"timeout talking to server {server}")
        except (OSError, ValueError, UnicodeError) as exc:
            self._warn(st, f"problem talking to server {server}: {exc}")
        return await self._policy_result(st, server, action, default_action, reply_name, reply_class, def_acl)

    async def _check_python_policy(self, st: _State, name: str, reply_name: str, reply_class: str,
                                   def_acl: str | None) -> int:
        hook = self.policy_hooks.get(name)
        if hook is None:
            self._warn(st, f"check_python_policy: no policy hook named \"{name}\"")
            self._server_error(st)
            return DUNNO
        timeout = float(self._param("smtpd_policy_service_timeout"))
        action: str | None = None
        failed = False
        try:
            async with asyncio.timeout(timeout):
                action = await _maybe_await(hook(st.facts))
            if action is None:
                action = "DUNNO"
            elif not isinstance(action, str):
                self._warn(st, f"python policy {name}: result is {type(action).__name__}, not an access(5) string")
                action, failed = None, True
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except TimeoutError:
            self._warn(st, f"python policy {name}: timeout after {timeout:g}s")
            failed = True
        except Exception as exc:  # a bug in the hook is temporary, never a bounce
            self._warn(st, f"python policy {name}: {type(exc).__name__}: {exc}")
            failed = True
        return await self._policy_result(st, f"python:{name}", None if failed else action, POLICY_DEFAULT_ACTION,
                                         reply_name, reply_class, def_acl)

    async def _policy_result(self, st: _State, server: str, action: str | None, default_action: str,
                             reply_name: str, reply_class: str, def_acl: str | None) -> int:
        if action is not None:
            return await self._table_result(st, server, action, "policy query", reply_name, reply_class, def_acl)
        # Safety against recursive execution of the default action.
        st.policy_nesting += 1
        try:
            value = default_action if st.policy_nesting == 1 else POLICY_DEFAULT_ACTION
            return await self._table_result(st, server, value, "policy query", reply_name, reply_class, def_acl)
        finally:
            st.policy_nesting -= 1

    # ------------------------------------------------------------ the generic loop
    async def _generic_checks(self, st: _State, restrictions: Sequence[str], reply_name: str, reply_class: str,
                              def_acl: str | None) -> int:
        """Postfix generic_checks(): apply restrictions in order."""
        saved_recursion = st.recursion
        st.recursion += 1
        if st.recursion > MAX_RECURSION:
            self._warn(st, "restriction class nesting causes unreasonable recursion")
            self._server_error(st)
        status = DUNNO
        argv = list(restrictions)
        i = 0
        try:
            while i < len(argv):
                if st.discard:
                    break
                name = argv[i]
                if _lname(name) == "warn_if_reject":
                    if st.warn_if_reject == 0:
                        st.warn_if_reject = st.recursion
                    i += 1
                    continue
                if ":" in name and _lname(name) not in _SIMPLE:
                    # A bare type:table is short for the list's check_*_access.
                    if def_acl is None:
                        self._warn(st, f"specify one of (check_client_access, check_reverse_client_hostname_access, "
                                       f"check_helo_access, check_sender_access, check_recipient_access, "
                                       f"check_etrn_access) before {reply_class} restriction \"{name}\"")
                        self._server_error(st)
                    argv.insert(i, def_acl)  # type: ignore[arg-type]
                    name = argv[i]
                status, i = await self._apply(st, argv, i, reply_name, reply_class, def_acl)
                if st.warn_if_reject >= st.recursion:
                    st.warn_if_reject = 0
                if status != DUNNO:
                    break
                if st.defer_if_permit is not None and st.defer_if_reject is not None:
                    break
        finally:
            st.recursion = saved_recursion
            if st.warn_if_reject >= st.recursion:
                st.warn_if_reject = 0
        return status

    def _arg(self, st: _State, argv: list[str], i: int, name: str, *, table: bool) -> str | None:
        """The argument of argv[i]; warns (and for tables fails) when missing."""
        if i + 1 < len(argv) and (not table or ":" in argv[i + 1]):
            return argv[i + 1]
        if table:
            bad = argv[i + 1] if i + 1 < len(argv) else ""
            self._warn(st, f"restriction {name}: bad argument \"{bad}\": need maptype:mapname")
            self._server_error(st)
        return None

    async def _apply(self, st: _State, argv: list[str], i: int, reply_name: str, reply_class: str,
                     def_acl: str | None) -> tuple[int, int]:
        """Apply argv[i]; return (status, index of the next restriction)."""
        name = argv[i]
        low = _lname(name)
        f = st.facts
        nxt = i + 1

        # --- generic --------------------------------------------------------
        if low == "permit":
            if nxt < len(argv):
                self._warn(st, f"restriction `{argv[nxt]}' after `permit' is ignored")
            return OK, nxt
        if low == "defer":
            if nxt < len(argv) and st.warn_if_reject == 0:
                self._warn(st, f"restriction `{argv[nxt]}' after `defer' is ignored")
            return self._reject(st, self._param("defer_code"), "4.3.2",
                                f"<{reply_name}>: {reply_class} rejected: Try again later"), nxt
        if low == "reject":
            if nxt < len(argv) and st.warn_if_reject == 0:
                self._warn(st, f"restriction `{argv[nxt]}' after `reject' is ignored")
            return self._reject(st, self._param("reject_code"), "5.7.1",
                                f"<{reply_name}>: {reply_class} rejected: Access denied"), nxt
        if low == "reject_unauth_pipelining":
            if f.pipelining_violation:
                return self._reject(st, 503, "5.5.0", f"<{reply_name}>: {reply_class} rejected: "
                                                      f"Improper use of SMTP command pipelining", _PROTOCOL), nxt
            return DUNNO, nxt
        if low == "check_policy_service":
            if nxt >= len(argv) or ":" not in argv[nxt]:
                self._warn(st, "restriction check_policy_service must be followed by transport:server")
                self._server_error(st)
            return await self._check_policy_service(st, argv[nxt], reply_name, reply_class, def_acl), nxt + 1
        if low == "check_python_policy":
            if nxt >= len(argv):
                self._warn(st, "restriction check_python_policy must be followed by a hook name")
                self._server_error(st)
            return await self._check_python_policy(st, argv[nxt], reply_name, reply_class, def_acl), nxt + 1
        if low == "defer_if_permit":
            return self._defer_if_permit(st, 450, "4.7.0",
                                         f"<{reply_name}>: {reply_class} rejected: defer_if_permit requested"), nxt
        if low == "defer_if_reject":
            return self._defer_if_reject(st, 450, "4.7.0",
                                         f"<{reply_name}>: {reply_class} rejected: defer_if_reject requested"), nxt
        if low == "reject_plaintext_session":
            if not f.tls:
                return self._reject(st, self._param("plaintext_reject_code"), "4.7.1",
                                    "Session encryption is required"), nxt
            return DUNNO, nxt

        # --- client name/address ---------------------------------------------
        if low in ("reject_unknown_client_hostname", "reject_unknown_client"):
            if f.client_name.lower() == "unknown":
                code = 450 if f.client_name_tempfail else self._param("unknown_client_reject_code")
                return self._reject(st, code, "4.7.25",
                                    f"Client host rejected: cannot find your hostname, [{f.client_addr}]"), nxt
            return DUNNO, nxt
        if low == "reject_unknown_reverse_client_hostname":
            if f.reverse_client_name.lower() == "unknown":
                code = 450 if f.client_name_tempfail else self._param("unknown_client_reject_code")
                return self._reject(st, code, "4.7.25",
                                    f"Client host rejected: cannot find your reverse hostname, [{f.client_addr}]"), nxt
            return DUNNO, nxt
        if low == "permit_inet_interfaces":
            try:
                own = str(ipaddress.ip_address(f.client_addr)) in self.resolver.own_addresses
            except ValueError:
                own = False
            return (OK if own else DUNNO), nxt
        if low == "permit_mynetworks":
            return (OK if self.is_mynetworks(f.client_addr) else DUNNO), nxt
        if low == "check_client_access":
            spec = self._arg(st, argv, i, name, table=True)
            return await self._check_namadr_access(st, spec, f.client_name, f.client_addr, f.namaddr,
                                                   CLIENT, def_acl), nxt + 1
        if low == "check_reverse_client_hostname_access":
            spec = self._arg(st, argv, i, name, table=True)
            status = await self._check_namadr_access(st, spec, f.reverse_client_name, f.client_addr,
                                                     f.reverse_client_name, REV_CLIENT, def_acl)
            self._forbid_allowlist(st, name, status, f.reverse_client_name)
            return status, nxt + 1
        if low in ("reject_rbl_client", "reject_rbl"):
            zone = self._arg(st, argv, i, name, table=False)
            if zone is None:
                self._warn(st, f"restriction {name} requires domain name argument")
                return DUNNO, nxt
            return await self._reject_rbl_addr(st, zone, f.client_addr, CLIENT), nxt + 1
        if low == "permit_dnswl_client":
            zone = self._arg(st, argv, i, name, table=False)
            if zone is None:
                self._warn(st, f"restriction {name} requires domain name argument")
                return DUNNO, nxt
            reverse = self._reverse_ip(f.client_addr)
            zname, zfilter = self._split_zone(zone)
            query = f"{reverse}.{zname}" if reverse else None
            return await self._permit_dnswl(st, query, zfilter, f.client_addr, CLIENT), nxt + 1
        if low in ("reject_rhsbl_client", "reject_rhsbl_reverse_client", "permit_rhswl_client"):
            zone = self._arg(st, argv, i, name, table=False)
            if zone is None:
                self._warn(st, f"restriction {name} requires domain name argument")
                return DUNNO, nxt
            host = f.reverse_client_name if low == "reject_rhsbl_reverse_client" else f.client_name
            if host.lower() == "unknown":
                return DUNNO, nxt + 1
            if low == "permit_rhswl_client":
                domain = self._rhsbl_domain(host)
                zname, zfilter = self._split_zone(zone)
                return await self._permit_dnswl(st, f"{domain}.{zname}" if domain else None, zfilter, host,
                                                CLIENT), nxt + 1
            cls = REV_CLIENT if low == "reject_rhsbl_reverse_client" else CLIENT
            return await self._reject_rbl_domain(st, zone, host, cls), nxt + 1
        if low == "check_sasl_access":
            spec = self._arg(st, argv, i, name, table=True)
            if f.sasl_username:
                username = _printable(f.sasl_username).replace(" ", "_")
                status, _found = await self._check_access(st, spec, [(f.sasl_username, False)], f.sasl_username,
                                                          username, SASL_USER, def_acl)
                return status, nxt + 1
            return DUNNO, nxt + 1

        # --- HELO ------------------------------------------------------------
        if low == "check_helo_access":
            spec = self._arg(st, argv, i, name, table=True)
            if st.helo is not None:
                status, _found = await self._check_access(st, spec, self._domain_keys(st.helo.lower()), st.helo,
                                                          st.helo, HELO, def_acl)
                return status, nxt + 1
            return DUNNO, nxt + 1
        if low in ("reject_invalid_helo_hostname", "reject_invalid_hostname"):
            if st.helo is not None:
                if st.helo.startswith("["):
                    return self._reject_invalid_hostaddr(st, st.helo, st.helo, HELO), nxt
                test = _dup_if_truncate(st.helo)
                if not (test.isascii() and valid_hostname(test)) and not _valid_hostaddr(test):
                    return self._reject(st, self._param("invalid_hostname_reject_code"), "5.5.2",
                                        f"<{st.helo}>: {HELO} rejected: Invalid name"), nxt
            return DUNNO, nxt
        if low in ("reject_unknown_helo_hostname", "reject_unknown_hostname"):
            if st.helo is not None:
                if st.helo.startswith("["):
                    return self._reject_invalid_hostaddr(st, st.helo, st.helo, HELO), nxt
                return await self._reject_unknown_hostname(st, st.helo, st.helo, HELO), nxt
            return DUNNO, nxt
        if low in ("reject_non_fqdn_helo_hostname", "reject_non_fqdn_hostname"):
            if st.helo is not None:
                if st.helo.startswith("["):
                    return self._reject_invalid_hostaddr(st, st.helo, st.helo, HELO), nxt
                test = _dup_if_truncate(st.helo)
                if not _valid_hostname(test) or "." not in test:
                    return self._reject(st, self._param("non_fqdn_reject_code"), "5.5.2",
                                        f"<{st.helo}>: {HELO} rejected: need fully-qualified hostname"), nxt
            return DUNNO, nxt
        if low == "reject_rhsbl_helo":
            zone = self._arg(st, argv, i, name, table=False)
            if zone is None:
                self._warn(st, f"restriction {name} requires domain name argument")
                return DUNNO, nxt
            if st.helo is not None:
                return await self._reject_rbl_domain(st, zone, st.helo, HELO), nxt + 1
            return DUNNO, nxt + 1

        # --- sender ------------------------------------------------------------
        if low == "check_sender_access":
            spec = self._arg(st, argv, i, name, table=True)
            if st.sender:
                return await self._check_mail_access(st, spec, st.sender, st.sender, SENDER, def_acl), nxt + 1
            if st.sender == "":
                status, _found = await self._check_access(st, spec, [(NULL_ACCESS_LOOKUP_KEY, False)],
                                                          NULL_ACCESS_LOOKUP_KEY, st.sender, SENDER, def_acl)
                return status, nxt + 1
            return DUNNO, nxt + 1
        if low in ("reject_unknown_sender_domain", "reject_unknown_address"):
            if st.sender:
                return await self._reject_unknown_address(st, st.sender, st.sender, SENDER), nxt
            return DUNNO, nxt
        if low == "reject_non_fqdn_sender":
            if st.sender:
                return self._reject_non_fqdn_address(st, st.sender, st.sender, SENDER), nxt
            return DUNNO, nxt
        if low == "reject_sender_login_mismatch":
            if st.sender:
                status = await self._reject_auth_sender_login_mismatch(st, st.sender, allow_unknown=False)
                if status == DUNNO:
                    status = await self._reject_unauth_sender_login_mismatch(st, st.sender)
                return status, nxt
            return DUNNO, nxt
        if low == "reject_authenticated_sender_login_mismatch":
            if st.sender:
                return await self._reject_auth_sender_login_mismatch(st, st.sender, allow_unknown=False), nxt
            return DUNNO, nxt
        if low == "reject_known_sender_login_mismatch":
            if st.sender:
                if f.sasl_username:
                    return await self._reject_auth_sender_login_mismatch(st, st.sender, allow_unknown=True), nxt
                return await self._reject_unauth_sender_login_mismatch(st, st.sender), nxt
            return DUNNO, nxt
        if low == "reject_unauthenticated_sender_login_mismatch":
            if st.sender:
                return await self._reject_unauth_sender_login_mismatch(st, st.sender), nxt
            return DUNNO, nxt
        if low == "reject_rhsbl_sender":
            zone = self._arg(st, argv, i, name, table=False)
            if zone is None:
                self._warn(st, f"restriction {name} requires domain name argument")
                return DUNNO, nxt
            if st.sender:
                return await self._reject_rbl_domain(st, zone, st.sender, SENDER), nxt + 1
            return DUNNO, nxt + 1
        if low == "reject_unlisted_sender":
            if st.sender:
                return await self._check_rcpt_maps(st, st.sender, SENDER), nxt
            return DUNNO, nxt

        # --- recipient ---------------------------------------------------------
        if low == "check_recipient_access":
            spec = self._arg(st, argv, i, name, table=True)
            if st.recipient is not None:
                return await self._check_mail_access(st, spec, st.recipient, st.recipient, RECIPIENT,
                                                     def_acl), nxt + 1
            return DUNNO, nxt + 1
        if low == "permit_auth_destination":
            if st.recipient is not None:
                return self._permit_auth_destination(st.recipient), nxt
            return DUNNO, nxt
        if low == "reject_unauth_destination":
            if st.recipient is not None:
                return self._reject_unauth_destination(st, st.recipient, self._param("relay_domains_reject_code"),
                                                       "5.7.1"), nxt
            return DUNNO, nxt
        if low == "defer_unauth_destination":
            if st.recipient is not None:
                return self._reject_unauth_destination(
                    st, st.recipient, self._param("relay_domains_reject_code") - 100, "4.7.1"), nxt
            return DUNNO, nxt
        if low == "permit_sasl_authenticated":
            return (OK if f.sasl_username else DUNNO), nxt
        if low == "reject_unknown_recipient_domain":
            if st.recipient is not None:
                return await self._reject_unknown_address(st, st.recipient, st.recipient, RECIPIENT), nxt
            return DUNNO, nxt
        if low == "reject_non_fqdn_recipient":
            if st.recipient is not None:
                return self._reject_non_fqdn_address(st, st.recipient, st.recipient, RECIPIENT), nxt
            return DUNNO, nxt
        if low == "reject_rhsbl_recipient":
            zone = self._arg(st, argv, i, name, table=False)
            if zone is None:
                self._warn(st, f"restriction {name} requires domain name argument")
                return DUNNO, nxt
            if st.recipient is not None:
                return await self._reject_rbl_domain(st, zone, st.recipient, RECIPIENT), nxt + 1
            return DUNNO, nxt + 1
        if low in ("reject_unlisted_recipient", "check_recipient_maps"):
            if st.recipient:
                return await self._check_rcpt_maps(st, st.recipient, RECIPIENT), nxt
            return DUNNO, nxt
        if low == "reject_multi_recipient_bounce":
            if st.sender == "" and f.rcpt_count > (0 if f.stage == "rcpt" else 1):
                return self._reject(st, MULTI_RECIPIENT_BOUNCE_REJECT_CODE, "5.5.3",
                                    f"<{reply_name}>: {reply_class} rejected: Multi-recipient bounce"), nxt
            return DUNNO, nxt

        # --- ETRN --------------------------------------------------------------
        if low == "check_etrn_access":
            spec = self._arg(st, argv, i, name, table=True)
            if f.etrn_domain:
                status, _found = await self._check_access(st, spec, self._domain_keys(f.etrn_domain.lower()),
                                                          f.etrn_domain, f.etrn_domain, ETRN, def_acl)
                return status, nxt + 1
            return DUNNO, nxt + 1

        # --- restriction classes -------------------------------------------------
        if name in self.classes:
            restrictions = self.classes[name]
            if not restrictions:
                self._warn(st, f"restriction class `{name}' needs a definition")
                self._server_error(st)
            return await self._generic_checks(st, restrictions, reply_name, reply_class, def_acl), nxt

        self._warn(st, f"unknown smtpd restriction: \"{name}\"")
        self._server_error(st)
        return DUNNO, nxt

    def _forbid_allowlist(self, st: _State, name: str, status: int, target: str) -> None:
        if not st.discard and status == OK:
            self._warn(st, f"restriction {name} returns OK for {target}")
            self._warn(st, "this is not allowed for security reasons")
            self._warn(st, "use DUNNO instead of OK if you want to make an exception")
            self._server_error(st)

    def _reject_invalid_hostaddr(self, st: _State, addr: str, reply_name: str, reply_class: str) -> int:
        inner = addr[1:-1] if addr.startswith("[") and addr.endswith("]") and len(addr) > 2 else addr
        if not _valid_mailhost_addr(inner):
            return self._reject(st, self._param("invalid_hostname_reject_code"), "5.5.2",
                                f"<{reply_name}>: {reply_class} rejected: invalid ip address")
        return DUNNO

    def _reject_non_fqdn_address(self, st: _State, addr: str, reply_name: str, reply_class: str) -> int:
        domain = addr.rpartition("@")[2] if "@" in addr else ""
        if domain.startswith("[") and domain.endswith("]"):
            return DUNNO
        test = _dup_if_truncate(domain)
        if not test or not _valid_hostname(test) or "." not in test:
            return self._reject(st, self._param("non_fqdn_reject_code"), "4.5.2",
                                f"<{reply_name}>: {reply_class} rejected: need fully-qualified address")
        return DUNNO

    # ------------------------------------------------------------ stages
    def _new_state(self, facts: Facts) -> _State:
        st = _State(facts, helo=facts.helo, sender=facts.sender, recipient=facts.recipient, discard=facts.discard)
        if facts.defer_if_permit is not None:
            r = facts.defer_if_permit
            st.defer_if_permit = _Pending(r.code, r.enhanced, r.text)
        return st

    async def _run(self, st: _State, restrictions: Sequence[str], reply_name: str, reply_class: str,
                   def_acl: str | None, *, reset: bool = True) -> int:
        if reset:
            st.reset()
        if not restrictions:
            return DUNNO
        try:
            return await self._generic_checks(st, restrictions, reply_name, reply_class, def_acl)
        except _Abort as abort:
            return abort.status

    def _resolve_defer_if_permit(self, st: _State, status: int) -> int:
        """Force a permit into a deferral after an earlier temporary error."""
        if status != REJECT and st.defer_if_permit is not None:
            p = st.defer_if_permit
            st.defer_if_permit = None
            st.warn_if_reject = 0
            return self._reject(st, p.code, p.dsn, p.text, p.error_class)
        return status

    def _decision(self, st: _State, status: int, permitted: bool) -> Decision:
        if status == REJECT and st.reply is not None:
            action = "defer" if st.reply.code < 500 else "reject"
            reply, log = st.reply, st.reply_log
        else:
            action, reply, log = ("permit" if permitted else "dunno"), None, ""
        pending = None
        if st.defer_if_permit is not None:
            p = st.defer_if_permit
            pending = Reply(p.code, str(p.code)[0] + p.dsn[1:], p.text)
        return Decision(action, reply, hold=st.hold, discard=st.discard, prepend=list(st.prepend),
                        filter=st.filter, log=log, logs=list(st.logs), defer_if_permit=pending)

    async def _client_stage(self, st: _State) -> int:
        st.defer_if_permit = None  # Postfix resets it before the client restrictions
        return await self._run(st, self._param("smtpd_client_restrictions"), st.facts.namaddr, CLIENT,
                               "check_client_access")

    async def _helo_stage(self, st: _State) -> int:
        if st.helo is None:
            return DUNNO
        return await self._run(st, self._param("smtpd_helo_restrictions"), st.helo, HELO, "check_helo_access")

    async def _mail_stage(self, st: _State) -> int:
        if st.sender is None:
            return DUNNO
        st.sender_rcptmap_checked = False
        status = await self._run(st, self._param("smtpd_sender_restrictions"), st.sender, SENDER,
                                 "check_sender_access")
        if (self._param("smtpd_reject_unlisted_sender") and status != REJECT and not st.sender_rcptmap_checked
                and not st.discard and st.sender):
            st.reset()
            try:
                status = await self._check_rcpt_maps(st, st.sender, SENDER)
            except _Abort as abort:
                status = abort.status
        return status

    async def check_client(self, facts: Facts) -> Decision:
        """CONNECT-time smtpd_client_restrictions (smtpd_delay_reject = no)."""
        st = self._new_state(facts)
        status = await self._client_stage(st)
        return self._decision(st, status, status == OK)

    async def check_helo(self, facts: Facts) -> Decision:
        """HELO-time smtpd_helo_restrictions (smtpd_delay_reject = no)."""
        st = self._new_state(facts)
        status = await self._helo_stage(st)
        return self._decision(st, status, status == OK)

    async def check_mail(self, facts: Facts) -> Decision:
        """MAIL-time smtpd_sender_restrictions plus smtpd_reject_unlisted_sender."""
        st = self._new_state(facts)
        status = await self._mail_stage(st)
        return self._decision(st, status, status == OK)

    async def check_rcpt(self, facts: Facts) -> Decision:
        """RCPT-time evaluation (Postfix smtpd_check_rcpt)."""
        st = self._new_state(facts)
        recipient = facts.recipient
        if recipient is None:
            return self._decision(st, DUNNO, False)
        # RFC 5321 4.5.1: "postmaster" without a domain is always accepted.
        if recipient.lower() == "postmaster":
            return Decision("permit")
        if self._param("smtpd_delay_reject"):
            for stage in (self._client_stage, self._helo_stage, self._mail_stage):
                status = await stage(st)
                if status == REJECT:
                    return self._decision(st, status, False)
        permitted = False
        status = DUNNO
        st.recipient_rcptmap_checked = False
        st.reset()  # once for both lists, as Postfix
        for list_name in ("smtpd_relay_restrictions", "smtpd_recipient_restrictions"):
            status = await self._run(st, self._param(list_name), recipient, RECIPIENT, "check_recipient_access",
                                     reset=False)
            if status == REJECT:
                break
            permitted = permitted or status == OK
        status = self._resolve_defer_if_permit(st, status)
        if (self._param("smtpd_reject_unlisted_recipient") and status != REJECT
                and not st.recipient_rcptmap_checked and not st.discard):
            st.reset()
            try:
                status = await self._check_rcpt_maps(st, recipient, RECIPIENT)
            except _Abort as abort:
                status = abort.status
        return self._decision(st, status, permitted)

    async def check_data(self, facts: Facts) -> Decision:
        """DATA-time smtpd_data_restrictions."""
        return await self._check_final(facts, "smtpd_data_restrictions", "DATA", DATA)

    async def check_eod(self, facts: Facts) -> Decision:
        """End-of-data smtpd_end_of_data_restrictions."""
        return await self._check_final(facts, "smtpd_end_of_data_restrictions", "END-OF-MESSAGE", EOD)

    async def _check_final(self, facts: Facts, list_name: str, reply_name: str, reply_class: str,
                           restrictions: Sequence[str] | None = None) -> Decision:
        if not (self._param(list_name) if restrictions is None else restrictions):
            # The common case (both lists are empty by default): nothing can
            # match and a pending defer_if_permit is dropped below anyway.
            return Decision("dunno", discard=facts.discard)
        st = self._new_state(facts)
        st.defer_if_permit = None  # "necessary when some recipients were accepted but the last one was rejected"
        if facts.rcpt_count > 1:
            st.recipient = None  # the restriction applies to all recipients alike
        status = await self._run(st, self._param(list_name) if restrictions is None else restrictions,
                                 reply_name, reply_class, None)
        permitted = status == OK
        status = self._resolve_defer_if_permit(st, status)
        return self._decision(st, status, permitted)

    async def check(self, list_name: str, facts: Facts, restrictions: Sequence[str] | None = None) -> Decision:
        """Evaluate one restriction list (a parameter name, a restriction
        class name, or any name with an explicit ``restrictions`` list).

        The list is evaluated with the reply name and class Postfix uses for
        it; for names that are not smtpd_*_restrictions the session stage
        (``facts.stage``) decides.  For relay/recipient/data/end-of-data/ETRN
        lists a pending defer_if_permit turns a non-reject into a deferral;
        for client/HELO/sender lists it is returned in
        ``Decision.defer_if_permit`` for the next stage.
        """
        if restrictions is None:
            try:
                restrictions = self.classes[list_name] if list_name in self.classes else self._param(list_name)
            except KeyError:
                raise ValueError(f"unknown restriction list {list_name!r}") from None
        restrictions = tuple(restrictions)
        kind = list_name if list_name in _LISTS else _STAGE_LIST.get(facts.stage, "smtpd_recipient_restrictions")
        reply_class, def_acl, final = _LISTS[kind]
        if reply_class == DATA:
            return await self._check_final(facts, kind, "DATA", DATA, restrictions)
        if reply_class == EOD:
            return await self._check_final(facts, kind, "END-OF-MESSAGE", EOD, restrictions)
        st = self._new_state(facts)
        if reply_class == CLIENT:
            reply_name: str | None = facts.namaddr
        elif reply_class == HELO:
            reply_name = facts.helo
        elif reply_class == SENDER:
            reply_name = facts.sender
        elif reply_class == ETRN:
            reply_name = facts.etrn_domain
        else:
            reply_name = facts.recipient
        if reply_name is None:  # Postfix skips a stage whose argument is absent
            return self._decision(st, DUNNO, False)
        status = await self._run(st, restrictions, reply_name, reply_class, def_acl)
        permitted = status == OK
        if final:
            status = self._resolve_defer_if_permit(st, status)
        return self._decision(st, status, permitted)


def _policy_value(value: str) -> str:
    # The policy protocol is line based: no value may break a line.
    return "".join(" " if ch in "\r\n" or ch == "\x00" else ch for ch in str(value))
