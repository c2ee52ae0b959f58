"""Tests for mailserver.resolve: address classes and routes
(Postfix trivial-rewrite)."""

from __future__ import annotations

import pytest

from mailserver.config import Config
from mailserver.resolve import (
    DEFAULT,
    LOCAL,
    RELAY,
    VIRTUAL,
    VIRTUAL_ALIAS,
    AddressResolver,
    Route,
    split_address,
    split_transport,
)
from mailserver.tables import TableError

HOST = "mail.example.com"
TRANSPORTS = "inline:{ example.net=smtp:[127.0.0.1]:2626, .sub.example=discard:, user@x.test=error:5.1.1 nope }"


def resolver(**params) -> AddressResolver:
    params.setdefault("myhostname", HOST)
    params.setdefault("alias_maps", [])
    return AddressResolver(Config(**params))


@pytest.fixture
def r() -> AddressResolver:
    return resolver(
        relay_domains="relay.test, .dotted.test",
        virtual_alias_domains="alias.test",
        virtual_mailbox_domains="vmail.test",
        virtual_mailbox_maps="inline:{ u@vmail.test=vmail.test/u/, @catch.test=catch.test/all/ }",
    )


# ---------------------------------------------------------------- address classes


@pytest.mark.parametrize("domain", [HOST, "localhost", "localhost.example.com"])
def test_mydestination_domains_are_local(r, domain):
    assert r.address_class(domain) == LOCAL


@pytest.mark.parametrize("domain", ["MAIL.Example.COM", "LocalHost", "mail.example.com."])
def test_local_class_is_case_insensitive_and_ignores_trailing_dot(r, domain):
    assert r.address_class(domain) == LOCAL


def test_mydestination_does_not_match_subdomains(r):
    assert r.address_class("sub.mail.example.com") == DEFAULT
    assert r.address_class("example.com") == DEFAULT


def test_explicit_mydestination_with_references_and_mixed_case():
    res = resolver(mydestination="$myhostname, Example.ORG")
    assert res.address_class("example.org") == LOCAL
    assert res.address_class("EXAMPLE.org") == LOCAL
    assert res.address_class("localhost") == DEFAULT


def test_mydestination_from_a_table():
    res = resolver(mydestination="$myhostname, inline:{ tabled.test=ok }")
    assert res.address_class("tabled.test") == LOCAL
    assert res.address_class("other.test") == DEFAULT


@pytest.mark.parametrize("literal", ["[127.0.0.1]", "[IPv6:::1]", "[ipv6:0:0:0:0:0:0:0:1]"])
def test_our_ip_literals_are_local(r, literal):
    assert r.address_class(literal) == LOCAL


@pytest.mark.parametrize("literal", ["[10.9.9.9]", "[192.0.2.1]", "[not-an-ip]", "[IPv6:2001:db8::1]"])
def test_foreign_or_bad_ip_literals_are_not_local(r, literal):
    assert r.address_class(literal) == DEFAULT


def test_own_addresses_extend_the_local_literals():
    res = AddressResolver(Config(myhostname=HOST, alias_maps=[]), own_addresses=["192.0.2.10", "2001:db8::10"])
    assert res.address_class("[192.0.2.10]") == LOCAL
    assert res.address_class("[IPv6:2001:DB8:0::10]") == LOCAL
    assert res.address_class("[192.0.2.11]") == DEFAULT


def test_empty_domain_is_local(r):
    assert r.is_local_domain("")


def test_virtual_alias_domain_class(r):
    assert r.address_class("alias.test") == VIRTUAL_ALIAS
    assert r.address_class("ALIAS.test") == VIRTUAL_ALIAS
    assert r.address_class("sub.alias.test") == DEFAULT


def test_virtual_mailbox_domain_class(r):
    assert r.address_class("vmail.test") == VIRTUAL
    assert r.address_class("sub.vmail.test") == DEFAULT


def test_relay_domain_class_includes_subdomains(r):
    assert r.address_class("relay.test") == RELAY
    assert r.address_class("a.relay.test") == RELAY
    assert r.address_class("a.b.relay.test") == RELAY
    assert r.address_class("notrelay.test") == DEFAULT
    assert r.address_class("test") == DEFAULT


def test_relay_domain_with_leading_dot_matches_subdomains_only(r):
    assert r.address_class("x.dotted.test") == RELAY
    assert r.address_class("dotted.test") == DEFAULT


def test_relay_domains_from_a_table_match_subdomains():
    res = resolver(relay_domains="inline:{ tabled-relay.test=ok }")
    assert res.address_class("tabled-relay.test") == RELAY
    assert res.address_class("a.tabled-relay.test") == RELAY


def test_everything_else_is_default(r):
    assert r.address_class("example.org") == DEFAULT


def test_local_wins_over_other_classes():
    res = resolver(relay_domains=HOST, virtual_mailbox_domains=HOST)
    assert res.address_class(HOST) == LOCAL


def test_virtual_alias_domains_are_checked_before_virtual_mailbox_domains():
    res = resolver(virtual_alias_domains="both.test", virtual_mailbox_domains="both.test")
    assert res.address_class("both.test") == VIRTUAL_ALIAS


def test_virtual_mailbox_domains_default_to_the_maps_table(tmp_path):
    table = tmp_path / "vmailbox"
    table.write_text("u@vm.test vm.test/u/\nvm.test anything\n")
    res = resolver(virtual_mailbox_maps=f"texthash:{table}")
    assert res.address_class("vm.test") == VIRTUAL
    assert res.virtual_mailbox("u@vm.test") == "vm.test/u/"


# ---------------------------------------------------------------- routes


def test_local_route(r):
    assert r.resolve("user@mail.example.com") == Route(LOCAL, "local", HOST, "user@mail.example.com")


def test_local_route_for_localhost_and_our_literal(r):
    assert r.resolve("user@localhost") == Route(LOCAL, "local", HOST, "user@localhost")
    assert r.resolve("user@[127.0.0.1]") == Route(LOCAL, "local", HOST, "user@[127.0.0.1]")


def test_unqualified_address_gets_myorigin(r):
    assert r.resolve("user") == Route(LOCAL, "local", HOST, f"user@{HOST}")


def test_unqualified_address_with_remote_myorigin_is_routed_there():
    res = resolver(myorigin="example.org")
    assert res.resolve("user") == Route(DEFAULT, "smtp", "example.org", "user@example.org")


def test_local_transport_without_nexthop_uses_myhostname():
    res = resolver(local_transport="local")
    assert res.resolve("u@localhost") == Route(LOCAL, "local", HOST, "u@localhost")


def test_custom_local_transport():
    res = resolver(local_transport="lmtp:unix:/run/dovecot/lmtp")
    assert res.resolve("u@localhost") == Route(LOCAL, "lmtp", "unix:/run/dovecot/lmtp", "u@localhost")


def test_virtual_route(r):
    assert r.resolve("u@vmail.test") == Route(VIRTUAL, "virtual", "", "u@vmail.test")


def test_virtual_alias_domain_without_alias_is_user_unknown(r):
    route = r.resolve("nobody@alias.test")
    assert route.address_class == VIRTUAL_ALIAS
    assert (route.transport, route.nexthop) == ("error", "5.1.1 User unknown in virtual alias table")


def test_relay_route_goes_to_the_domain(r):
    assert r.resolve("u@relay.test") == Route(RELAY, "relay", "relay.test", "u@relay.test")
    assert r.resolve("u@a.relay.test") == Route(RELAY, "relay", "a.relay.test", "u@a.relay.test")


def test_default_route_goes_to_the_domain_by_smtp(r):
    assert r.resolve("u@example.org") == Route(DEFAULT, "smtp", "example.org", "u@example.org")


def test_domain_is_lowercased_for_nexthop(r):
    route = r.resolve("User@Example.ORG")
    assert route.nexthop == "example.org"
    assert route.address == "User@Example.ORG"


def test_relayhost_overrides_relay_and_default_nexthop(r):
    res = resolver(relay_domains="relay.test", relayhost="[10.0.0.1]:587")
    assert res.resolve("u@relay.test") == Route(RELAY, "relay", "[10.0.0.1]:587", "u@relay.test")
    assert res.resolve("u@example.org") == Route(DEFAULT, "smtp", "[10.0.0.1]:587", "u@example.org")


def test_relayhost_does_not_touch_local_or_virtual():
    res = resolver(relayhost="[10.0.0.1]:587", virtual_mailbox_domains="vmail.test")
    assert res.resolve(f"u@{HOST}") == Route(LOCAL, "local", HOST, f"u@{HOST}")
    assert res.resolve("u@vmail.test") == Route(VIRTUAL, "virtual", "", "u@vmail.test")


def test_default_transport_with_nexthop_beats_relayhost():
    res = resolver(default_transport="smtp:[smarthost.test]:2525", relayhost="[10.0.0.1]")
    assert res.resolve("u@example.org") == Route(DEFAULT, "smtp", "[smarthost.test]:2525", "u@example.org")


def test_custom_relay_and_default_transports():
    res = resolver(relay_domains="relay.test", relay_transport="lmtp", default_transport="error:5.7.1 no outbound")
    assert res.resolve("u@relay.test") == Route(RELAY, "lmtp", "relay.test", "u@relay.test")
    assert res.resolve("u@example.org") == Route(DEFAULT, "error", "5.7.1 no outbound", "u@example.org")


# ---------------------------------------------------------------- transport_maps


@pytest.fixture
def rt() -> AddressResolver:
    return resolver(transport_maps=TRANSPORTS)


def test_transport_map_domain_entry(rt):
    assert rt.resolve("u@example.net") == Route(DEFAULT, "smtp", "[127.0.0.1]:2626", "u@example.net")
    assert rt.resolve("u@EXAMPLE.NET") == Route(DEFAULT, "smtp", "[127.0.0.1]:2626", "u@EXAMPLE.NET")


def test_transport_map_domain_entry_does_not_match_subdomains(rt):
    assert rt.resolve("u@a.example.net") == Route(DEFAULT, "smtp", "a.example.net", "u@a.example.net")


def test_transport_map_parent_entry_matches_subdomains_only(rt):
    route = rt.resolve("u@a.sub.example")
    assert route.transport == "discard"
    route = rt.resolve("u@deep.a.sub.example")
    assert route.transport == "discard"
    assert rt.resolve("u@sub.example") == Route(DEFAULT, "smtp", "sub.example", "u@sub.example")


def test_transport_map_full_address_entry(rt):
    assert rt.resolve("user@x.test") == Route(DEFAULT, "error", "5.1.1 nope", "user@x.test")
    assert rt.resolve("USER@X.test").transport == "error"
    assert rt.resolve("other@x.test") == Route(DEFAULT, "smtp", "x.test", "other@x.test")


def test_transport_map_full_address_beats_domain():
    res = resolver(transport_maps="inline:{ boss@corp.test=smtp:[10.1.1.1], corp.test=smtp:[10.2.2.2] }")
    assert res.resolve("boss@corp.test").nexthop == "[10.1.1.1]"
    assert res.resolve("staff@corp.test").nexthop == "[10.2.2.2]"


def test_transport_map_domain_beats_parent():
    res = resolver(transport_maps="inline:{ a.corp.test=smtp:[10.1.1.1], .corp.test=smtp:[10.2.2.2] }")
    assert res.resolve("u@a.corp.test").nexthop == "[10.1.1.1]"
    assert res.resolve("u@b.corp.test").nexthop == "[10.2.2.2]"


def test_transport_map_nearest_parent_wins():
    res = resolver(transport_maps="inline:{ .corp.test=smtp:[10.2.2.2], .b.corp.test=smtp:[10.3.3.3] }")
    assert res.resolve("u@x.b.corp.test").nexthop == "[10.3.3.3]"
    assert res.resolve("u@x.c.corp.test").nexthop == "[10.2.2.2]"


def test_transport_map_wildcard_is_last():
    res = resolver(transport_maps="inline:{ *=error:5.7.1 all closed, open.test=smtp: }")
    assert res.resolve("u@elsewhere.test") == Route(DEFAULT, "error", "5.7.1 all closed", "u@elsewhere.test")
    assert res.resolve("u@open.test") == Route(DEFAULT, "smtp", "open.test", "u@open.test")


def test_transport_map_overrides_local_delivery():
    res = resolver(transport_maps="inline:{ localhost=lmtp:[127.0.0.1]:24 }")
    assert res.resolve("u@localhost") == Route(LOCAL, "lmtp", "[127.0.0.1]:24", "u@localhost")
    assert res.resolve(f"u@{HOST}").transport == "local"


def test_transport_map_gives_a_virtual_alias_domain_a_route():
    res = resolver(virtual_alias_domains="alias.test", transport_maps="inline:{ alias.test=smtp:[10.0.0.9] }")
    assert res.resolve("u@alias.test") == Route(VIRTUAL_ALIAS, "smtp", "[10.0.0.9]", "u@alias.test")


def test_transport_map_nexthop_only_keeps_the_default_transport():
    res = resolver(transport_maps="inline:{ gw.test=:[gateway.test] }")
    assert res.resolve("u@gw.test") == Route(DEFAULT, "smtp", "[gateway.test]", "u@gw.test")


def test_transport_map_nexthop_beats_relayhost():
    res = resolver(relayhost="[10.0.0.1]:587", transport_maps=TRANSPORTS)
    assert res.resolve("u@example.net").nexthop == "[127.0.0.1]:2626"
    assert res.resolve("u@example.org").nexthop == "[10.0.0.1]:587"


def test_transport_map_transport_without_nexthop_resets_nexthop_to_the_domain():
    # transport(5): "A non-null transport field with a null nexthop field
    # resets the nexthop information to the recipient domain."
    res = resolver(relayhost="[10.0.0.1]:587", transport_maps="inline:{ direct.test=smtp: }")
    assert res.resolve("u@direct.test") == Route(DEFAULT, "smtp", "direct.test", "u@direct.test")


def test_transport_map_from_texthash_file(tmp_path):
    table = tmp_path / "transport"
    table.write_text("# routes\nexample.net   smtp:[127.0.0.1]:2626\n.sub.example discard:\n"
                     "user@x.test   error:5.1.1 nope\n")
    res = resolver(transport_maps=f"texthash:{table}")
    assert res.resolve("u@example.net").nexthop == "[127.0.0.1]:2626"
    assert res.resolve("u@a.sub.example").transport == "discard"
    assert res.resolve("user@x.test") == Route(DEFAULT, "error", "5.1.1 nope", "user@x.test")


def test_transport_map_first_table_wins():
    res = resolver(transport_maps=["inline:{ t.test=smtp:[10.0.0.1] }", "inline:{ t.test=smtp:[10.0.0.2] }"])
    assert res.resolve("u@t.test").nexthop == "[10.0.0.1]"


def test_transport_map_python_transport():
    res = resolver(transport_maps="inline:{ app.test=python:capture }")
    route = res.resolve("u@app.test")
    assert (route.address_class, route.transport) == (DEFAULT, "python:capture")


def test_bad_transport_map_spec_raises_table_error():
    with pytest.raises(TableError):
        resolver(transport_maps="nosuchtype:/x")


# ---------------------------------------------------------------- split_transport / split_address


@pytest.mark.parametrize("spec, expected", [
    ("smtp:[127.0.0.1]:2626", ("smtp", "[127.0.0.1]:2626")),
    ("smtp:mx.example.org", ("smtp", "mx.example.org")),
    ("local:", ("local", "")),
    ("local", ("local", "")),
    ("error:5.1.1 text with: colon", ("error", "5.1.1 text with: colon")),
    ("discard:", ("discard", "")),
    (":[gw.test]", ("", "[gw.test]")),
    ("lmtp:unix:/run/lmtp", ("lmtp", "unix:/run/lmtp")),
    ("  relay:[10.0.0.1]  ", ("relay", "[10.0.0.1]")),
    ("python:capture", ("python:capture", "")),
    ("python: capture ", ("python:capture", "")),
    ("", ("", "")),
])
def test_split_transport(spec, expected):
    assert split_transport(spec) == expected


@pytest.mark.parametrize("address, expected", [
    ("u@Example.ORG", ("u", "example.org")),
    ("u", ("u", "")),
    ("a@b@c.test", ("a@b", "c.test")),
    ("u@", ("u", "")),
])
def test_split_address(address, expected):
    assert split_address(address) == expected


# ---------------------------------------------------------------- virtual mailbox and alias lookups


def test_virtual_mailbox_full_address(r):
    assert r.virtual_mailbox("u@vmail.test") == "vmail.test/u/"
    assert r.virtual_mailbox("U@VMail.Test") == "vmail.test/u/"
    assert r.virtual_mailbox("other@vmail.test") is None


def test_virtual_mailbox_catch_all(r):
    assert r.virtual_mailbox("anyone@catch.test") == "catch.test/all/"
    assert r.virtual_mailbox("anyone@CATCH.test") == "catch.test/all/"


def test_virtual_mailbox_full_address_beats_catch_all():
    res = resolver(virtual_mailbox_maps="inline:{ boss@v.test=v.test/boss/, @v.test=v.test/rest/ }")
    assert res.virtual_mailbox("boss@v.test") == "v.test/boss/"
    assert res.virtual_mailbox("x@v.test") == "v.test/rest/"


def test_virtual_mailbox_without_maps_is_none():
    assert resolver().virtual_mailbox("u@x.test") is None


def test_virtual_alias_lookup():
    # virtual_alias_domains defaults to $virtual_alias_maps: the domain itself is a key there.
    res = resolver(virtual_alias_maps="inline:{ va.test=domain, info@va.test=a@x.test b@x.test, "
                                      "@va.test=catch@x.test }")
    assert res.virtual_alias("info@va.test") == "a@x.test b@x.test"
    assert res.virtual_alias("INFO@VA.TEST") == "a@x.test b@x.test"
    assert res.virtual_alias("other@va.test") == "catch@x.test"
    assert res.virtual_alias("u@elsewhere.test") is None
    assert res.address_class("va.test") == VIRTUAL_ALIAS
    assert resolver().virtual_alias("info@va.test") is None


def test_alias_lookup_from_texthash_aliases_file(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text(
        "# local aliases\n"
        "postmaster: root\n"
        "Root: admin@example.org\n"
        "team: alice, bob,\n"
        "  carol\n"
        '"john doe": john\n'
        "archive: /var/mail/archive\n"
        "pipe: \"|/usr/bin/filter -x\"\n"
    )
    res = resolver(alias_maps=[f"texthash:{aliases}"])
    assert res.alias("postmaster") == "root"
    assert res.alias("POSTMASTER") == "root"
    assert res.alias("root") == "admin@example.org"
    assert res.alias("team") == "alice, bob, carol"
    assert res.alias("john doe") == "john"
    assert res.alias("archive") == "/var/mail/archive"
    assert res.alias("pipe") == '"|/usr/bin/filter -x"'
    assert res.alias("nobody") is None


def test_alias_maps_missing_file_warns_and_is_empty(tmp_path):
    warnings = []
    res = AddressResolver(Config(myhostname=HOST, alias_maps=[f"texthash:{tmp_path}/none"]), warn=warnings.append)
    assert res.alias("root") is None
    assert len(warnings) == 1 and "none" in warnings[0]


def test_alias_lookup_without_alias_maps_is_none():
    assert resolver().alias("root") is None


def test_route_is_a_frozen_value(r):
    route = r.resolve("u@example.org")
    with pytest.raises(AttributeError):
        route.transport = "local"
