"""A real, authoritative-only UDP DNS server on loopback, for tests.

Responsibility
    Serve small zones given as zone-file style lines so that code under test
    (``mailserver.dns.Resolver`` and everything above it) talks real DNS over
    a real socket, never leaving 127.0.0.0/8.

Contract
    ``TestDNSServer(zones)`` listens on ``127.0.0.1:<ephemeral>`` once
    started (``await start()`` or ``async with``); ``nameserver`` is the
    ``"127.0.0.1:PORT"`` string to hand to the resolver.  Zones map an origin
    to lines relative to it::

        {"example.test": ["@ 300 IN MX 10 mx1.example.test.",
                          "mx1 300 IN A 127.0.0.2"]}

    TTL and class are optional (defaults 300, IN).  Records of an rrset
    are answered in zone order (``shuffle=True`` lets dnspython rotate them
    like a real server).  Answers are
    authoritative (AA): the exact rrset when it exists (in-zone CNAMEs are
    followed); NODATA (NOERROR, empty answer, SOA in authority) when the name
    exists with other types or is an empty non-terminal; NXDOMAIN (with SOA)
    when the name does not exist inside a served zone; REFUSED outside.  The
    SOA is the zone's own if one of the lines defines it, else a synthetic
    one with minimum 60.  ``fail(name, "SERVFAIL")`` makes queries for the
    name (any type) answer SERVFAIL, ``fail(name, "TIMEOUT")`` drops them;
    any other rcode mnemonic (``"REFUSED"``, ``"NXDOMAIN"``) is answered as
    such.  ``queries`` logs ``(qname, qtype)`` with the qname lower-case and
    without the trailing dot.

Failure modes
    Malformed zone lines raise ``ValueError`` from the constructor /
    ``set_zone``; undecodable datagrams are ignored.
"""

from __future__ import annotations

import asyncio
import re

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["TestDNSServer"]

_LINE_RE = re.compile(
    r"^(?P<name>\S+)\s+"
    r"(?:(?P<ttl>\d+)\s+)?"
    r"(?:(?P<cls>IN|CH|HS)\s+)?"
    r"(?:(?P<ttl2>\d+)\s+)?"
    r"(?P<type>[A-Za-z][A-Za-z0-9]*)\s+"
    r"(?P<rdata>.*\S)\s*$",
    re.IGNORECASE,
)
_MAX_CNAME_CHAIN = 8


class _Zone:
    def __init__(self, origin: str, lines: list[str]):
        self.origin = dns.name.from_text(origin)
        # name -> rdtype -> rrset
        self.data: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        for line in lines:
            self._add_line(line)
        soa = self.data.get(self.origin, {}).get(dns.rdatatype.SOA)
        if soa is None:
            soa = dns.rrset.from_text(
                self.origin,
                60,
                "IN",
                "SOA",
                f"ns.{self.origin} hostmaster.{self.origin} 1 3600 600 86400 60",
            )
        self.soa = soa

    def _add_line(self, line: str) -> None:
        line = line.strip()
        if not line or line.startswith(";"):
            return
        m = _LINE_RE.match(line)
        if not m:
            raise ValueError(f"bad zone line: {line!r}")
        owner = m["name"]
        if owner == "@":
            name = self.origin
        elif owner.endswith("."):
            name = dns.name.from_text(owner)
        else:
            name = dns.name.from_text(owner, origin=self.origin)
        if not name.is_subdomain(self.origin):
            raise ValueError(f"{name} is outside zone {self.origin}")
        ttl = int(m["ttl"] or m["ttl2"] or 300)
        rdclass = dns.rdataclass.from_text(m["cls"] or "IN")
        rdtype = dns.rdatatype.from_text(m["type"].upper())
        try:
            rdata = dns.rdata.from_text(
                rdclass, rdtype, m["rdata"], origin=self.origin, relativize=False
            )
        except dns.exception.DNSException as exc:
            raise ValueError(f"bad zone line {line!r}: {exc}") from exc
        rrsets = self.data.setdefault(name, {})
        rrset = rrsets.get(rdtype)
        if rrset is None:
            rrset = rrsets[rdtype] = dns.rrset.RRset(name, rdclass, rdtype)
        rrset.add(rdata, ttl)

    def name_exists(self, qname: dns.name.Name) -> bool:
        return any(n == qname or n.is_subdomain(qname) for n in self.data)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: "TestDNSServer"):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = self.server._answer(query)
        if response is None or self.transport is None:
            return
        try:
            wire = response.to_wire(
                max_size=max(512, query.payload), want_shuffle=self.server.shuffle
            )
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        self.transport.sendto(wire, addr)


class TestDNSServer:
    """See the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        zones: dict[str, list[str]] | None = None,
        host: str = "127.0.0.1",
        *,
        shuffle: bool = False,
    ):
        self.host = host
        self.shuffle = shuffle
        self.port = 0
        self._zones: dict[dns.name.Name, _Zone] = {}
        for origin, lines in (zones or {}).items():
            self.set_zone(origin, lines)
        self._failures: dict[dns.name.Name, str] = {}
        self.queries: list[tuple[str, str]] = []
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> "TestDNSServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- configuration -------------------------------------------------

    def set_zone(self, origin: str, lines: list[str]) -> None:
        zone = _Zone(origin, lines)
        self._zones[zone.origin] = zone

    def remove_zone(self, origin: str) -> None:
        self._zones.pop(dns.name.from_text(origin), None)

    def fail(self, name: str, rcode: str = "SERVFAIL") -> None:
        rcode = rcode.upper()
        if rcode != "TIMEOUT":
            dns.rcode.from_text(rcode)  # validate
        self._failures[dns.name.from_text(name)] = rcode

    def clear_failures(self) -> None:
        self._failures.clear()

    # -- answering -----------------------------------------------------

    def _find_zone(self, qname: dns.name.Name) -> _Zone | None:
        best = None
        for origin, zone in self._zones.items():
            if qname.is_subdomain(origin) and (
                best is None or len(origin) > len(best.origin)
            ):
                best = zone
        return best

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        if not query.question:
            return None
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        self.queries.append(
            (qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(qtype))
        )
        failure = self._failures.get(qname)
        if failure == "TIMEOUT":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if failure is not None:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.from_text(failure))
            return response
        zone = self._find_zone(qname)
        if zone is None:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
            return response
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            rrsets = zone.data.get(name, {})
            rrset = rrsets.get(qtype)
            if rrset is not None:
                response.answer.append(_renamed(rrset, name))
                return response
            cname = rrsets.get(dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                break
            response.answer.append(_renamed(cname, name))
            name = cname[0].target
            next_zone = self._find_zone(name)
            if next_zone is None:
                return response  # out-of-zone target: the resolver chases it
            zone = next_zone
        if not zone.name_exists(name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(zone.soa)
        return response


def _renamed(rrset: dns.rrset.RRset, name: dns.name.Name) -> dns.rrset.RRset:
    # Preserve the query's spelling (case) of the owner name.
    out = dns.rrset.RRset(name, rrset.rdclass, rrset.rdtype)
    out.update(rrset)
    return out
