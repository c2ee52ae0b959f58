"""mailserver.dns against a real UDP DNS server on 127.0.0.1 (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import random

import dns.message
import dns.query
import dns.rcode
import pytest

from dnsserver import TestDNSServer
from mailserver.dns import DnsError, MxHost, Resolver, parse_nameserver, valid_hostname

ZONES = {
    "example.test": [
        "@ 300 IN MX 10 mx1.example.test.",
        "@ 300 IN MX 20 mx2",
        "mx1 300 IN A 127.0.0.2",
        "mx1 300 IN AAAA ::2",
        "mx2 60 IN A 127.0.0.3",
        "www 300 IN CNAME mx1",
        'txt 300 IN TXT "v=spf1 " "-all"',
        "sub.deep 300 IN A 127.0.0.9",  # makes deep.example.test an empty non-terminal
    ],
    "equal.test": [
        "@ MX 10 a.equal.test.",
        "@ MX 10 b.equal.test.",
        "@ MX 10 c.equal.test.",
        "@ MX 20 z.equal.test.",
        "a A 127.0.0.11",
        "b A 127.0.0.12",
        "c A 127.0.0.13",
        "z A 127.0.0.19",
    ],
    "implicit.test": ["@ 300 IN A 127.0.0.5", "@ 300 IN AAAA ::5"],
    "null.test": ["@ 300 IN MX 0 ."],
    "bad.test": [
        "@ MX 10 127.0.0.1.",
        "@ MX 20 bad_-host-.bad.test.",
    ],
    "mixed.test": [
        "@ MX 5 1.2.3.4.",
        "@ MX 10 good.mixed.test.",
        "good A 127.0.0.7",
    ],
    "noaddr.test": [
        "@ MX 10 gone.noaddr.test.",
        "@ MX 20 empty.noaddr.test.",
        "@ MX 30 ok.noaddr.test.",
        "empty TXT hello",
        "ok A 127.0.0.8",
    ],
    "many.test": [
        "@ MX 10 m1.many.test.",
        "@ MX 20 m2.many.test.",
        "@ MX 30 m3.many.test.",
        "m1 A 127.0.1.1",
        "m1 A 127.0.1.2",
        "m1 A 127.0.1.3",
        "m2 A 127.0.2.1",
        "m2 A 127.0.2.2",
        "m3 A 127.0.3.1",
    ],
    "soa.test": [
        "@ 300 IN SOA ns.soa.test. hostmaster.soa.test. 1 3600 600 86400 30",
        "@ 300 IN A 127.0.0.4",
    ],
    "2.0.0.127.in-addr.arpa": ["@ PTR mx1.example.test."],
}


@pytest.fixture
async def server():
    async with TestDNSServer(ZONES) as s:
        yield s


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(server, **kw) -> Resolver:
    kw.setdefault("timeout", 2)
    return Resolver([server.nameserver], **kw)


# --------------------------------------------------------------------------
# The test server itself


async def test_server_answers_like_an_authoritative_server(server):
    def ask(name, rdtype):
        q = dns.message.make_query(name, rdtype)
        return dns.query.udp(q, server.host, port=server.port, timeout=2)

    # dns.query.udp is synchronous; run it in a thread to keep the loop free.
    r = await asyncio.to_thread(ask, "mx1.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "127.0.0.2"
    r = await asyncio.to_thread(ask, "mx1.example.test", "MX")  # NODATA
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    r = await asyncio.to_thread(ask, "deep.example.test", "A")  # empty non-terminal
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    r = await asyncio.to_thread(ask, "nope.example.test", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN
    r = await asyncio.to_thread(ask, "example.org", "A")
    assert r.rcode() == dns.rcode.REFUSED
    assert server.queries[0] == ("mx1.example.test", "A")


async def test_set_zone_at_runtime(server):
    r = resolver(server)
    with pytest.raises(DnsError) as info:  # not served: REFUSED, temporary
        await r.lookup("new.test", "A")
    assert info.value.temporary
    server.set_zone("new.test", ["@ A 127.0.0.50"])
    assert await r.lookup("new.test", "A") == ["127.0.0.50"]


# --------------------------------------------------------------------------
# lookup()


async def test_lookup_types(server):
    r = resolver(server)
    assert await r.lookup("mx1.example.test", "A") == ["127.0.0.2"]
    assert await r.lookup("mx1.example.test", "AAAA") == ["::2"]
    assert await r.lookup("txt.example.test", "TXT") == ["v=spf1 -all"]
    assert await r.lookup("2.0.0.127.in-addr.arpa", "PTR") == ["mx1.example.test"]
    assert await r.lookup("www.example.test", "A") == ["127.0.0.2"]  # via CNAME
    assert sorted(await r.lookup("example.test", "MX")) == [
        "10 mx1.example.test",
        "20 mx2.example.test",
    ]
    assert await r.lookup("nope.example.test", "A") == []  # NXDOMAIN
    assert await r.lookup("mx2.example.test", "TXT") == []  # NODATA


async def test_lookup_temporary_failures(server):
    r = resolver(server, timeout=0.5)
    server.fail("mx1.example.test", "SERVFAIL")
    with pytest.raises(DnsError) as info:
        await r.lookup("mx1.example.test", "A")
    assert info.value.temporary and info.value.status == "4.4.3"
    server.fail("mx2.example.test", "TIMEOUT")
    with pytest.raises(DnsError) as info:
        await r.lookup("mx2.example.test", "A")
    assert info.value.temporary
    # Outside the served zones the server answers REFUSED: temporary too.
    with pytest.raises(DnsError) as info:
        await r.lookup("example.org", "A")
    assert info.value.temporary
    # Temporary failures are not cached.
    server.clear_failures()
    assert await r.lookup("mx1.example.test", "A") == ["127.0.0.2"]


async def test_malformed_name_is_permanent(server):
    r = resolver(server)
    with pytest.raises(DnsError) as info:
        await r.lookup("a..b.example.test", "A")
    assert not info.value.temporary and info.value.status == "5.4.4"
    assert server.queries == []


# --------------------------------------------------------------------------
# Cache


async def test_positive_answers_are_cached_for_their_ttl(server):
    clock = Clock()
    r = resolver(server, clock=clock)
    assert await r.lookup("mx2.example.test", "A") == ["127.0.0.3"]  # TTL 60
    server.set_zone("example.test", ["mx2 60 IN A 127.0.0.33"])
    clock.now += 59
    assert await r.lookup("mx2.example.test", "A") == ["127.0.0.3"]
    assert server.queries.count(("mx2.example.test", "A")) == 1
    clock.now += 2
    assert await r.lookup("MX2.Example.Test.", "A") == ["127.0.0.33"]
    assert server.queries.count(("mx2.example.test", "A")) == 2


async def test_negative_answers_are_cached_for_the_soa_minimum(server):
    clock = Clock()
    r = resolver(server, clock=clock)
    assert await r.lookup("new.soa.test", "A") == []  # NXDOMAIN, SOA minimum 30
    server.set_zone(
        "soa.test",
        ZONES["soa.test"] + ["new 300 IN A 127.0.0.40"],
    )
    clock.now += 29
    assert await r.lookup("new.soa.test", "A") == []
    assert server.queries.count(("new.soa.test", "A")) == 1
    clock.now += 2
    assert await r.lookup("new.soa.test", "A") == ["127.0.0.40"]
    # NODATA is cached too (synthetic SOA: minimum 60).
    assert await r.lookup("mx1.example.test", "TXT") == []
    clock.now += 59
    assert await r.lookup("mx1.example.test", "TXT") == []
    assert server.queries.count(("mx1.example.test", "TXT")) == 1


# --------------------------------------------------------------------------
# addresses()


async def test_addresses_per_inet_protocols(server):
    assert await resolver(server).addresses("mx1.example.test") == ["127.0.0.2", "::2"]
    assert await resolver(server, inet_protocols="ipv4").addresses("mx1.example.test") == [
        "127.0.0.2"
    ]
    assert await resolver(server, inet_protocols="ipv6").addresses("mx1.example.test") == [
        "::2"
    ]
    assert await resolver(server).addresses("192.0.2.7") == ["192.0.2.7"]
    assert server.queries.count(("192.0.2.7", "A")) == 0


async def test_addresses_errors(server):
    r = resolver(server)
    with pytest.raises(DnsError) as info:
        await r.addresses("nope.example.test")
    assert info.value.text == (
        "Host or domain name not found. Name service error for "
        "name=nope.example.test type=A: Host not found"
    )
    assert not info.value.temporary and info.value.status == "5.4.4"
    with pytest.raises(DnsError) as info:
        await r.addresses("txt.example.test")  # exists, no address records
    assert not info.value.temporary
    assert info.value.text.endswith("No address associated with hostname")
    # No address and a temporary failure: temporary.
    server.fail("mx2.example.test", "SERVFAIL")
    with pytest.raises(DnsError) as info:
        await r.addresses("mx2.example.test")
    assert info.value.temporary and info.value.status == "4.4.3"


# --------------------------------------------------------------------------
# mx_hosts()


async def test_mx_hosts_sorted_by_preference(server):
    hosts = await resolver(server).mx_hosts("example.test")
    assert hosts == [
        MxHost(10, "mx1.example.test", ("127.0.0.2", "::2")),
        MxHost(20, "mx2.example.test", ("127.0.0.3",)),
    ]


async def test_equal_preferences_are_shuffled(server):
    orders = set()
    for seed in range(30):
        hosts = await resolver(server, rng=random.Random(seed)).mx_hosts("equal.test")
        assert hosts[-1].hostname == "z.equal.test"
        orders.add(tuple(h.hostname for h in hosts[:3]))
    assert len(orders) > 1
    assert all(sorted(o) == ["a.equal.test", "b.equal.test", "c.equal.test"] for o in orders)
    # Deterministic with a given generator.
    a = await resolver(server, rng=random.Random(7)).mx_hosts("equal.test")
    b = await resolver(server).mx_hosts("equal.test", rng=random.Random(7))
    assert a == b


async def test_mx_order_does_not_depend_on_server_record_order():
    async with TestDNSServer(ZONES, shuffle=True) as server:
        results = {
            tuple(h.hostname for h in await resolver(server, rng=random.Random(3)).mx_hosts(
                "equal.test"
            ))
            for _ in range(10)
        }
    assert len(results) == 1


async def test_implicit_mx(server):
    assert await resolver(server).mx_hosts("implicit.test") == [
        MxHost(0, "implicit.test", ("127.0.0.5", "::5"))
    ]


async def test_null_mx(server):
    with pytest.raises(DnsError) as info:
        await resolver(server).mx_hosts("null.test")
    assert (info.value.temporary, info.value.status, info.value.text) == (
        False,
        "5.1.10",
        "Domain null.test does not accept mail (nullMX)",
    )


async def test_nxdomain(server):
    with pytest.raises(DnsError) as info:
        await resolver(server).mx_hosts("nope.example.test")
    assert (info.value.temporary, info.value.status, info.value.text) == (
        False,
        "5.4.4",
        "Host or domain name not found. Name service error for "
        "name=nope.example.test type=MX: Host not found",
    )


async def test_servfail_and_timeout_are_temporary(server):
    r = resolver(server, timeout=0.5)
    for mode in ("SERVFAIL", "TIMEOUT"):
        server.fail("example.test", mode)
        with pytest.raises(DnsError) as info:
            await r.mx_hosts("example.test")
        assert (info.value.temporary, info.value.status, info.value.text) == (
            True,
            "4.4.3",
            "Host or domain name not found. Name service error for "
            "name=example.test type=MX: Host not found, try again",
        )
    server.clear_failures()
    assert (await r.mx_hosts("example.test"))[0].hostname == "mx1.example.test"


async def test_invalid_mx_targets_are_skipped(server):
    logs: list[str] = []
    r = resolver(server, log=logs.append)
    assert await r.mx_hosts("mixed.test") == [MxHost(10, "good.mixed.test", ("127.0.0.7",))]
    assert any("numeric domain name" in line and "1.2.3.4" in line for line in logs)
    with pytest.raises(DnsError) as info:
        await r.mx_hosts("bad.test")
    assert not info.value.temporary and info.value.status == "5.4.4"


async def test_mx_hosts_without_addresses_are_skipped(server):
    logs: list[str] = []
    r = resolver(server, log=logs.append)
    assert await r.mx_hosts("noaddr.test") == [MxHost(30, "ok.noaddr.test", ("127.0.0.8",))]
    assert any("gone.noaddr.test" in line for line in logs)


async def test_mx_address_lookup_temporary_failures(server):
    server.fail("mx1.example.test", "SERVFAIL")
    hosts = await resolver(server, timeout=0.5).mx_hosts("example.test")
    assert [h.hostname for h in hosts] == ["mx2.example.test"]
    server.fail("mx2.example.test", "TIMEOUT")
    r = resolver(server, timeout=0.5)
    with pytest.raises(DnsError) as info:
        await r.mx_hosts("example.test")
    assert info.value.temporary and info.value.status == "4.4.3"
    # All hosts permanently without addresses: permanent.
    server.clear_failures()
    server.set_zone("gone.test", ["@ MX 10 x.gone.test.", "@ MX 20 y.gone.test."])
    with pytest.raises(DnsError) as info:
        await r.mx_hosts("gone.test")
    assert not info.value.temporary and info.value.status == "5.4.4"


async def test_mx_address_limit(server):
    r = resolver(server, smtp_mx_address_limit=4)
    hosts = await r.mx_hosts("many.test")
    assert hosts == [
        MxHost(10, "m1.many.test", ("127.0.1.1", "127.0.1.2", "127.0.1.3")),
        MxHost(20, "m2.many.test", ("127.0.2.1",)),
    ]
    hosts = await r.mx_hosts("many.test", 2)
    assert hosts == [MxHost(10, "m1.many.test", ("127.0.1.1", "127.0.1.2"))]
    # m3 was never looked up: the limit was reached before.
    assert ("m3.many.test", "A") not in server.queries


# --------------------------------------------------------------------------
# Helpers


def test_parse_nameserver():
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("[::1]") == ("::1", 53)
    assert parse_nameserver("::1") == ("::1", 53)
    for bad in ("ns.example.com", "1.2.3.4:x", "[::1", "1.2.3.4:0"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_valid_hostname():
    assert valid_hostname("mx1.example.com")
    assert valid_hostname("_dmarc.example.com")
    assert not valid_hostname("-bad.example.com")
    assert not valid_hostname("1.2.3.4")
    assert not valid_hostname("a..b")
    assert not valid_hostname("x" * 64 + ".com")
