"""Address resolution (Postfix: trivial-rewrite).

Given a recipient address, decide its *address class* and where it goes:

=============  =====================================  ==========================
class          domain is listed in                     transport (default)
=============  =====================================  ==========================
local          ``mydestination`` (or our IP literal)   ``local_transport``
virtual alias  ``virtual_alias_domains``               (expanded, never routed)
virtual        ``virtual_mailbox_domains``             ``virtual_transport``
relay          ``relay_domains``                       ``relay_transport``
default        anything else                           ``default_transport``
=============  =====================================  ==========================

``relayhost`` replaces the next hop of relay and default mail;
``transport_maps`` (full address, domain, ``.parent`` domains, ``*``)
overrides any of them with ``transport:nexthop``.

All lookups are in-memory (tables are loaded when the resolver is built),
so resolution is a pure, synchronous decision: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable

from .config import Config
from .tables import TableList, open_tables

LOCAL, VIRTUAL_ALIAS, VIRTUAL, RELAY, DEFAULT = "local", "alias", "virtual", "relay", "default"


@dataclass(frozen=True, slots=True)
class Route:
    address_class: str
    transport: str  # local, virtual, smtp, relay, lmtp, discard, error, retry, python:NAME
    nexthop: str
    address: str


def split_transport(spec: str) -> tuple[str, str]:
    """``smtp:[127.0.0.1]:2626`` → (smtp, [127.0.0.1]:2626); ``local:`` →
    (local, ""); ``error:5.1.1 text`` → (error, "5.1.1 text");
    ``python:NAME`` keeps the name as the transport (python:NAME, "")."""
    spec = spec.strip()
    transport, sep, nexthop = spec.partition(":")
    if transport == "python":
        return f"python:{nexthop.strip()}", ""
    return transport.strip(), nexthop.strip()


def split_address(address: str) -> tuple[str, str]:
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain.lower()


def _domain_set(items: Iterable[str], warn: Callable[[str], None]) -> tuple[frozenset[str], TableList]:
    names, specs = set(), []
    for item in items:
        if ":" in item and not item.startswith("["):
            specs.append(item)
        elif item:
            names.add(item.lower().rstrip("."))
    return frozenset(names), open_tables(specs, warn=warn)


class AddressResolver:
    """Routing decisions from one Config (rebuilt on reload)."""

    def __init__(self, config: Config, *, own_addresses: Iterable[str] = (),
                 warn: Callable[[str], None] = lambda s: None):
        self.config = config
        self.myhostname = config.myhostname.lower()
        self.myorigin = config.myorigin.lower()
        self.mydestination, self._mydest_tables = _domain_set(config.mydestination, warn)
        self.relay_domains, self._relay_tables = _domain_set(config.relay_domains, warn)
        self.virtual_mailbox_domains, self._vmd_tables = _domain_set(config.virtual_mailbox_domains, warn)
        self.virtual_alias_domains, self._vad_tables = _domain_set(config.virtual_alias_domains, warn)
        self.transport_maps = open_tables(config.transport_maps, warn=warn)
        self.virtual_alias_maps = open_tables(config.virtual_alias_maps, warn=warn)
        self.virtual_mailbox_maps = open_tables(config.virtual_mailbox_maps, warn=warn)
        self.alias_maps = open_tables(config.alias_maps, fmt="alias", warn=warn)
        self.own_addresses = frozenset(_normal_ip(a) for a in own_addresses if a) | {"127.0.0.1", "::1"}
        self.local_transport = split_transport(config.local_transport)
        self.virtual_transport = split_transport(config.virtual_transport)
        self.relay_transport = split_transport(config.relay_transport)
        self.default_transport = split_transport(config.default_transport)

    def reload_tables(self) -> None:
        """Re-read tables whose files changed (blocking: call in a thread)."""
        for tables in (self._mydest_tables, self._relay_tables, self._vmd_tables, self._vad_tables,
                       self.transport_maps, self.virtual_alias_maps, self.virtual_mailbox_maps, self.alias_maps):
            tables.reload_if_changed()

    # ------------------------------------------------------------ classes
    def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if not domain:
            return True
        if domain.startswith("["):
            return self._is_own_literal(domain)
        return domain in self.mydestination or (bool(self._mydest_tables) and
                                                self._mydest_tables.lookup(domain) is not None)

    def _is_own_literal(self, literal: str) -> bool:
        inner = literal[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        try:
            return _normal_ip(inner) in self.own_addresses
        except ValueError:
            return False

    def _in(self, domain: str, names: frozenset[str], tables: TableList, *, parents: bool = False) -> bool:
        if domain in names or (tables and tables.lookup(domain) is not None):
            return True
        if parents:
            parts = domain.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[i:])
                if parent in names or f".{parent}" in names:
                    return True
                if tables and (tables.lookup(parent) is not None or tables.lookup(f".{parent}") is not None):
                    return True
        return False

    def address_class(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        if self.is_local_domain(domain):
            return LOCAL
        if self._in(domain, self.virtual_alias_domains, self._vad_tables):
            return VIRTUAL_ALIAS
        if self._in(domain, self.virtual_mailbox_domains, self._vmd_tables):
            return VIRTUAL
        # parent_domain_matches_subdomains includes relay_domains by default.
        if self._in(domain, self.relay_domains, self._relay_tables, parents=True):
            return RELAY
        return DEFAULT

    # ------------------------------------------------------------ routing
    def resolve(self, address: str) -> Route:
        local, domain = split_address(address)
        if not domain:
            address, domain = f"{local}@{self.myorigin}", self.myorigin
        cls = self.address_class(domain)
        if cls == LOCAL:
            transport, nexthop = self.local_transport
        elif cls == VIRTUAL:
            transport, nexthop = self.virtual_transport
        elif cls == RELAY:
            transport, nexthop = self.relay_transport
        else:  # default, and virtual-alias domains without a matching alias (bounced by the agent)
            transport, nexthop = self.default_transport
        if cls in (RELAY, DEFAULT) and not nexthop:
            nexthop = self.config.relayhost or domain
        override = self._transport_lookup(address, domain)
        if override is not None:
            o_transport, o_nexthop = split_transport(override)
            if o_nexthop:
                nexthop = o_nexthop
            elif o_transport.startswith("python:"):
                nexthop = ""  # application transports get the whole message in one batch
            elif o_transport:
                # transport(5): a non-null transport with a null nexthop resets
                # the nexthop to the recipient domain.
                nexthop = domain
            transport = o_transport or transport
        if cls == VIRTUAL_ALIAS and override is None:
            transport, nexthop = "error", "5.1.1 User unknown in virtual alias table"
        if transport == "local" and not nexthop:
            nexthop = self.myhostname
        return Route(cls, transport, nexthop, address)

    def _transport_lookup(self, address: str, domain: str) -> str | None:
        if not self.transport_maps:
            return None
        for key in (address.lower(), domain):
            value = self.transport_maps.lookup(key)
            if value is not None:
                return value
        parts = domain.split(".")
        for i in range(1, len(parts)):
            value = self.transport_maps.lookup("." + ".".join(parts[i:]))
            if value is not None:
                return value
        return self.transport_maps.lookup("*")

    # ------------------------------------------------------------ directories
    def virtual_mailbox(self, address: str) -> str | None:
        """virtual_mailbox_maps: full address, then the ``@domain`` catch-all."""
        local, domain = split_address(address)
        value = self.virtual_mailbox_maps.lookup(address.lower())
        if value is None and domain:
            value = self.virtual_mailbox_maps.lookup("@" + domain)
        return value

    def virtual_alias(self, address: str) -> str | None:
        local, domain = split_address(address)
        value = self.virtual_alias_maps.lookup(address.lower()) if self.virtual_alias_maps else None
        if value is None and domain and self.virtual_alias_maps:
            value = self.virtual_alias_maps.lookup("@" + domain)
        return value

    def alias(self, local: str) -> str | None:
        return self.alias_maps.lookup(local.lower()) if self.alias_maps else None


def _normal_ip(text: str) -> str:
    return str(ipaddress.ip_address(text.strip("[]")))


def local_part_is_safe(local: str) -> bool:
    return bool(local) and "/" not in local and not local.startswith(".") and "\x00" not in local \
        and not any(ord(c) < 32 for c in local)


def strip_extension(local: str, delimiters: str) -> str:
    """``user+ext`` → ``user`` with ``recipient_delimiter = +``."""
    if not delimiters:
        return local
    for i, ch in enumerate(local):
        if ch in delimiters and i > 0:
            return local[:i]
    return local
