"""Tests for mailserver.config: the typed, immutable Config and the CLI's
configuration paths (``mailserver conf`` / ``check`` / fatal errors)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mailserver.config import (
    PARAMETERS,
    Config,
    ConfigError,
    Service,
    default_config_path,
    parse_bool,
    parse_hostport,
    parse_network,
    parse_size,
    parse_time,
    split_list,
    system_hostname,
)

HOST = "mail.example.com"


def cfg(**params) -> Config:
    params.setdefault("myhostname", HOST)
    return Config(**params)


def write(tmp_path, text: str, name: str = "config.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def config_error(**params) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg(**params)
    return info.value


def file_error(tmp_path, text: str) -> tuple[str, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    return path, info.value


def one_line(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text and "\r" not in text, text
    return text


# ---------------------------------------------------------------- defaults


def test_defaults_follow_postfix_for_identity_parameters():
    c = cfg()
    assert c.myhostname == HOST
    assert c.mydomain == "example.com"
    assert c.myorigin == HOST
    assert c.mydestination == (HOST, "localhost.example.com", "localhost")
    assert c.raw("mydestination") == f"{HOST}, localhost.example.com, localhost"
    assert c.mynetworks == ("127.0.0.0/8", "[::1]/128")
    assert c.relay_domains == ()
    assert c.relayhost == ""


def test_mydomain_is_localdomain_when_myhostname_has_a_single_label():
    c = Config(myhostname="box")
    assert c.mydomain == "localdomain"
    assert c.mydestination == ("box", "localhost.localdomain", "localhost")


def test_mydomain_strips_only_the_first_label():
    assert Config(myhostname="a.b.c.example").mydomain == "b.c.example"


def test_explicit_mydomain_is_used_in_the_mydestination_default():
    c = cfg(mydomain="corp.test")
    assert c.mydestination == (HOST, "localhost.corp.test", "localhost")


def test_myorigin_follows_an_explicit_myhostname():
    c = Config(myhostname="mx1.example.net")
    assert c.myorigin == "mx1.example.net"


def test_hostname_argument_supplies_myhostname_when_not_configured():
    c = Config(hostname="given.example.org")
    assert c.myhostname == "given.example.org"
    assert c.mydomain == "example.org"
    assert not c.is_explicit("myhostname")


def test_myhostname_defaults_to_the_system_hostname():
    c = Config()
    assert c.myhostname == system_hostname()
    assert c.myhostname


def test_numeric_defaults_are_postfix_values():
    c = cfg()
    assert c.message_size_limit == 10240000
    assert c.smtpd_recipient_limit == 1000
    assert c.hopcount_limit == 50
    assert c.minimal_backoff_time == 300.0
    assert c.maximal_backoff_time == 4000.0
    assert c.queue_run_delay == 300.0
    assert c.maximal_queue_lifetime == 5 * 86400.0
    assert c.bounce_queue_lifetime == 5 * 86400.0
    assert c.delay_warning_time == 0.0
    assert c.default_destination_recipient_limit == 50
    assert c.local_destination_recipient_limit == 1
    assert c.smtpd_helo_required is False
    assert c.smtpd_forbid_bare_newline == "reject"


def test_derived_string_defaults_are_expanded():
    c = cfg(queue_directory="/q")
    assert c.pid_file == "/q/pid/master.pid"
    assert c.local_transport == f"local:{HOST}"
    assert c.smtpd_banner == f"{HOST} ESMTP"


def test_alias_database_follows_alias_maps_and_virtual_domains_follow_maps():
    c = cfg(alias_maps="texthash:/etc/a", virtual_mailbox_maps="texthash:/etc/vm",
            virtual_alias_maps="texthash:/etc/va")
    assert c.alias_database == ("texthash:/etc/a",)
    assert c.local_recipient_maps == ("unix:passwd.byname", "texthash:/etc/a")
    assert c.virtual_mailbox_domains == ("texthash:/etc/vm",)
    assert c.virtual_alias_domains == ("texthash:/etc/va",)


def test_every_parameter_has_a_valid_default():
    c = cfg()
    assert set(c.names()) == set(PARAMETERS)
    for name in PARAMETERS:
        assert isinstance(c.raw(name), str)


# ---------------------------------------------------------------- expansion


def test_dollar_name_and_braced_name_both_expand():
    c = cfg(mydestination="$myhostname, ${mydomain}, mx.${mydomain}")
    assert c.mydestination == (HOST, "example.com", "mx.example.com")


def test_expansion_is_transitive():
    c = cfg(relayhost="[$mydomain]", smtpd_banner="$relayhost says hi")
    assert c.smtpd_banner == "[example.com] says hi"


def test_expanded_value_is_what_raw_returns():
    c = cfg(myorigin="$mydomain")
    assert c.myorigin == "example.com"
    assert c.raw("myorigin") == "example.com"


def test_undefined_reference_is_an_error_naming_the_key():
    exc = config_error(mydestination="$nosuch")
    text = one_line(exc)
    assert exc.key == "mydestination"
    assert "mydestination" in text and "$nosuch" in text


def test_misspelt_reference_suggests_the_parameter():
    exc = config_error(myorigin="$mydomian")
    assert "did you mean 'mydomain'" in one_line(exc)
    assert exc.key == "myorigin"


def test_self_reference_is_a_recursion_error():
    exc = config_error(relayhost="$relayhost")
    assert "recursive" in one_line(exc)
    assert exc.key == "relayhost"


def test_mutual_recursion_is_an_error_not_a_stack_overflow():
    exc = config_error(relay_domains="$relayhost", relayhost="$relay_domains")
    text = one_line(exc)
    assert "recursive" in text
    assert exc.key in ("relay_domains", "relayhost")


def test_three_step_recursion_is_detected():
    exc = config_error(relayhost="$smtpd_banner", smtpd_banner="$myorigin", myorigin="$relayhost")
    assert "recursive" in one_line(exc)


def test_forward_path_keeps_late_bound_home():
    c = cfg()
    assert c.forward_path == ("$home/.forward",)
    c = cfg(forward_path="$home/.forward${recipient_delimiter}$extension, $home/.forward")
    assert c.forward_path == ("$home/.forward$extension", "$home/.forward")


def test_late_bound_names_are_only_late_bound_in_forward_path():
    exc = config_error(home_mailbox="$home/Maildir/")
    assert exc.key == "home_mailbox"


def test_dollar_dollar_is_left_alone():
    assert cfg(smtpd_banner="costs $$").smtpd_banner == "costs $$"


# ---------------------------------------------------------------- lists


def test_list_from_toml_array():
    c = cfg(mydestination=["a.example", "b.example"])
    assert c.mydestination == ("a.example", "b.example")


def test_list_from_comma_and_space_string():
    c = cfg(mydestination="a.example, b.example c.example,d.example\n\te.example")
    assert c.mydestination == ("a.example", "b.example", "c.example", "d.example", "e.example")


def test_empty_list_string_is_empty_tuple():
    assert cfg(relay_domains="").relay_domains == ()
    assert cfg(relay_domains=[]).relay_domains == ()


def test_inline_table_with_commas_stays_one_list_item():
    c = cfg(transport_maps="inline:{ a.example=smtp:[10.0.0.1], b.example=discard: }, texthash:/etc/t")
    assert c.transport_maps == ("inline:{ a.example=smtp:[10.0.0.1], b.example=discard: }", "texthash:/etc/t")


def test_inline_table_inside_toml_array_stays_one_item():
    c = cfg(transport_maps=["inline:{ a=b, c=d }", "texthash:/etc/t"])
    assert c.transport_maps == ("inline:{ a=b, c=d }", "texthash:/etc/t")


def test_list_items_must_be_strings():
    exc = config_error(mydestination=["a.example", 5])
    assert exc.key == "mydestination"


def test_list_given_a_number_is_a_type_error():
    exc = config_error(mydestination=5)
    assert exc.key == "mydestination"
    assert "list" in one_line(exc)


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [
    ("300s", 300.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0), ("1w", 604800.0), ("1.5d", 129600.0),
])
def test_duration_units(text, seconds):
    assert cfg(maximal_queue_lifetime=text).maximal_queue_lifetime == seconds


def test_bare_number_uses_the_parameters_default_unit_days():
    assert cfg(maximal_queue_lifetime=3).maximal_queue_lifetime == 3 * 86400.0
    assert cfg(maximal_queue_lifetime="3").maximal_queue_lifetime == 3 * 86400.0
    assert cfg(bounce_queue_lifetime=1).bounce_queue_lifetime == 86400.0


def test_bare_number_uses_the_parameters_default_unit_hours():
    assert cfg(delay_warning_time=4).delay_warning_time == 4 * 3600.0
    assert cfg(delay_warning_time="4").delay_warning_time == 4 * 3600.0


def test_bare_number_uses_seconds_for_second_parameters():
    assert cfg(minimal_backoff_time=60).minimal_backoff_time == 60.0
    assert cfg(smtpd_timeout="45").smtpd_timeout == 45.0


def test_bad_duration_unit_is_an_error():
    exc = config_error(minimal_backoff_time="5x")
    assert exc.key == "minimal_backoff_time"
    assert "minimal_backoff_time" in one_line(exc)


def test_boolean_for_a_duration_is_an_error():
    assert config_error(smtpd_timeout=True).key == "smtpd_timeout"


def test_minimal_backoff_larger_than_maximal_is_an_error():
    exc = config_error(minimal_backoff_time="5h")
    assert exc.key == "minimal_backoff_time"


def test_duration_raw_text_is_as_written():
    assert cfg(minimal_backoff_time="5m").raw("minimal_backoff_time") == "5m"


# ---------------------------------------------------------------- sizes, ints, booleans, choices


def test_sizes_in_bytes_and_with_suffixes():
    assert cfg(message_size_limit=1000).message_size_limit == 1000
    assert cfg(message_size_limit="1000").message_size_limit == 1000
    assert cfg(message_size_limit="10k").message_size_limit == 10240
    assert cfg(message_size_limit="20M").message_size_limit == 20 * 1024 * 1024
    assert cfg(message_size_limit="1g").message_size_limit == 1024**3


def test_bad_size_is_an_error():
    assert config_error(message_size_limit="1t").key == "message_size_limit"
    assert config_error(message_size_limit="lots").key == "message_size_limit"


def test_negative_size_is_an_error():
    assert config_error(message_size_limit=-1).key == "message_size_limit"
    assert config_error(message_size_limit="-1").key == "message_size_limit"


def test_integer_parameters_accept_ints_and_digit_strings():
    assert cfg(smtpd_recipient_limit=7).smtpd_recipient_limit == 7
    assert cfg(smtpd_recipient_limit="8").smtpd_recipient_limit == 8


@pytest.mark.parametrize("value", ["abc", 1.5, True, ["1"]])
def test_integer_parameter_wrong_type(value):
    exc = config_error(smtpd_recipient_limit=value)
    assert exc.key == "smtpd_recipient_limit"
    one_line(exc)


@pytest.mark.parametrize("value, expected", [
    ("yes", True), ("no", False), (True, True), (False, False), ("YES", True), ("No", False),
])
def test_booleans(value, expected):
    assert cfg(smtpd_helo_required=value).smtpd_helo_required is expected


def test_boolean_raw_text_is_yes_or_no():
    assert cfg(smtpd_helo_required=True).raw("smtpd_helo_required") == "yes"
    assert cfg().raw("maillog_syslog_prefix") == "yes"


def test_bad_boolean_is_an_error():
    exc = config_error(smtpd_helo_required="maybe")
    assert exc.key == "smtpd_helo_required"
    assert "yes or no" in one_line(exc)


def test_string_parameter_wrong_type():
    assert config_error(relayhost=["a"]).key == "relayhost"
    assert config_error(myhostname=5).key == "myhostname"


def test_table_value_for_a_parameter_is_an_error():
    exc = config_error(relayhost={"a": 1})
    assert exc.key == "relayhost"
    assert "table" in one_line(exc)


def test_choice_parameter_rejects_unknown_value():
    exc = config_error(smtpd_forbid_bare_newline="sometimes")
    assert exc.key == "smtpd_forbid_bare_newline"
    assert cfg(smtpd_forbid_bare_newline="normalize").smtpd_forbid_bare_newline == "normalize"


def test_bad_mynetworks_entry_is_an_error():
    assert config_error(mynetworks="127.0.0.0/8 not-a-network").key == "mynetworks"


def test_mynetworks_accepts_bracketed_ipv6_and_plain_addresses():
    c = cfg(mynetworks=["10.0.0.0/8", "[2001:db8::]/32", "192.0.2.1"])
    assert c.mynetworks == ("10.0.0.0/8", "[2001:db8::]/32", "192.0.2.1")


# ---------------------------------------------------------------- unknown keys


def test_unknown_parameter_is_an_error_with_suggestion():
    exc = config_error(mesage_size_limit=5)
    text = one_line(exc)
    assert exc.key == "mesage_size_limit"
    assert "unknown parameter 'mesage_size_limit'" in text
    assert "did you mean 'message_size_limit'" in text


def test_unknown_parameter_without_close_match_has_no_suggestion():
    text = one_line(config_error(zzzzzz=1))
    assert "zzzzzz" in text and "did you mean" not in text


# ---------------------------------------------------------------- immutability, replace


def test_setting_an_attribute_raises():
    c = cfg()
    with pytest.raises(AttributeError):
        c.myhostname = "other"
    with pytest.raises(AttributeError):
        c.brand_new = 1
    assert c.myhostname == HOST


def test_internal_mappings_are_read_only():
    c = cfg()
    with pytest.raises(TypeError):
        c._values["myhostname"] = "x"


def test_unknown_attribute_is_attribute_error_and_get_has_default():
    c = cfg()
    with pytest.raises(AttributeError):
        c.no_such_parameter
    assert c.get("no_such_parameter", 42) == 42
    assert c["message_size_limit"] == 10240000


def test_replace_returns_a_new_config_and_leaves_the_old_one():
    c = cfg(relayhost="[10.0.0.1]")
    d = c.replace(message_size_limit="1m")
    assert d.message_size_limit == 1024 * 1024
    assert d.relayhost == "[10.0.0.1]"
    assert d.myhostname == HOST
    assert c.message_size_limit == 10240000
    assert d.is_explicit("message_size_limit") and not c.is_explicit("message_size_limit")


def test_replace_re_derives_dependent_defaults():
    d = cfg().replace(myhostname="mx.other.test")
    assert d.mydomain == "other.test"
    assert d.mydestination == ("mx.other.test", "localhost.other.test", "localhost")


def test_replace_validates():
    with pytest.raises(ConfigError):
        cfg().replace(message_size_limt=1)


def test_replace_keeps_services_and_their_overrides():
    c = Config.from_mapping({"myhostname": HOST, "services": {
        "submission": {"listen": ["127.0.0.1:587"], "tls": "required", "auth": "required",
                       "smtpd_timeout": "1m", "smtpd_helo_required": True}}})
    d = c.replace(relayhost="[10.0.0.2]")
    svc = d.service("submission")
    assert svc.listen == ("127.0.0.1:587",)
    assert (svc.tls, svc.auth) == ("required", "required")
    assert svc.overrides == {"smtpd_timeout": 60.0, "smtpd_helo_required": True}


def test_replace_with_services_replaces_them():
    c = Config.from_mapping({"myhostname": HOST, "services": {"smtp": {"listen": ["127.0.0.1:25"]}}})
    d = c.replace(services={"other": {"listen": "127.0.0.1:2626"}})
    assert [s.name for s in d.services] == ["other"]


def test_is_explicit_and_names():
    c = cfg(relayhost="[x]")
    assert c.is_explicit("relayhost") and c.is_explicit("myhostname")
    assert not c.is_explicit("mydomain")
    assert c.names() == sorted(PARAMETERS)


# ---------------------------------------------------------------- from_file


def test_from_file_reads_parameters_and_services(tmp_path):
    path = write(tmp_path, """
        myhostname = "mx.example.org"
        mydestination = ["$myhostname", "example.org"]
        maximal_queue_lifetime = 3
        message_size_limit = "20m"
        smtpd_helo_required = "yes"

        [services.smtp]
        listen = ["0.0.0.0:25", "[::]:25"]

        [services.submission]
        listen = "127.0.0.1:587"
        tls = "required"
        auth = "required"
        smtpd_recipient_limit = "10"
        smtpd_timeout = "2m"
    """)
    c = Config.from_file(path)
    assert c.source == path
    assert c.mydestination == ("mx.example.org", "example.org")
    assert c.maximal_queue_lifetime == 3 * 86400.0
    assert c.message_size_limit == 20 * 1024 * 1024
    assert c.smtpd_helo_required is True
    assert [s.name for s in c.services] == ["smtp", "submission"]
    smtp = c.service("smtp")
    assert smtp.listen == ("0.0.0.0:25", "[::]:25")
    assert smtp.endpoints() == [("0.0.0.0", 25), ("::", 25)]
    assert (smtp.tls, smtp.auth) == ("none", "none")
    sub = c.service("submission")
    assert sub.endpoints() == [("127.0.0.1", 587)]
    assert (sub.tls, sub.auth) == ("required", "required")
    assert sub.overrides == {"smtpd_recipient_limit": 10, "smtpd_timeout": 120.0}
    with pytest.raises(KeyError):
        c.service("nope")


def test_from_file_overrides_win(tmp_path):
    path = write(tmp_path, 'myhostname = "a.example"\nrelayhost = "[1.2.3.4]"\n')
    c = Config.from_file(path, relayhost="[5.6.7.8]")
    assert c.relayhost == "[5.6.7.8]"


def test_from_file_unknown_key_names_file_and_key_with_suggestion(tmp_path):
    path, exc = file_error(tmp_path, 'myhostname = "a.example"\nmynetwork = "10.0.0.0/8"\n')
    text = one_line(exc)
    assert text.startswith(f"{path}: ")
    assert "'mynetwork'" in text
    assert "did you mean 'mynetworks'" in text
    assert exc.source == path and exc.key == "mynetwork"


def test_from_file_wrong_type_names_file_and_key(tmp_path):
    path, exc = file_error(tmp_path, 'myhostname = "a.example"\nsmtpd_recipient_limit = "many"\n')
    text = one_line(exc)
    assert path in text and "smtpd_recipient_limit" in text


def test_from_file_undefined_reference_names_file(tmp_path):
    path, exc = file_error(tmp_path, 'myhostname = "a.example"\nmyorigin = "$nowhere"\n')
    text = one_line(exc)
    assert path in text and "myorigin" in text and "$nowhere" in text


def test_from_file_recursion_names_file(tmp_path):
    path, exc = file_error(tmp_path, 'myhostname = "a.example"\nrelayhost = "$smtpd_banner"\n'
                                     'smtpd_banner = "$relayhost"\n')
    assert path in one_line(exc) and "recursive" in str(exc)


def test_from_file_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert path in one_line(info.value)
    assert "not found" in str(info.value)


def test_from_file_toml_syntax_error_is_one_line(tmp_path):
    path, exc = file_error(tmp_path, 'myhostname = = "x"\n')
    text = one_line(exc)
    assert path in text and "TOML" in text


def test_from_file_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        Config.from_file(tmp_path)
    one_line(info.value)


def test_services_must_be_a_table(tmp_path):
    path, exc = file_error(tmp_path, 'services = 5\n')
    assert exc.key == "services"
    one_line(exc)


def test_service_without_listen_is_an_error(tmp_path):
    path, exc = file_error(tmp_path, '[services.smtp]\ntls = "may"\n')
    text = one_line(exc)
    assert "services.smtp" in text and "listen" in text


def test_service_bad_listen_address_is_an_error(tmp_path):
    path, exc = file_error(tmp_path, '[services.smtp]\nlisten = ["127.0.0.1:99999"]\n')
    assert exc.key == "services.smtp.listen"
    one_line(exc)


@pytest.mark.parametrize("key, value", [("tls", "sometimes"), ("auth", "maybe")])
def test_service_bad_tls_or_auth_value(tmp_path, key, value):
    path, exc = file_error(tmp_path, f'[services.smtp]\nlisten = ["127.0.0.1:25"]\n{key} = "{value}"\n')
    assert exc.key == f"services.smtp.{key}"
    assert path in one_line(exc)


@pytest.mark.parametrize("tls", ["none", "may", "required", "implicit"])
def test_service_tls_values(tls):
    c = Config.from_mapping({"myhostname": HOST, "services": {"s": {"listen": ["127.0.0.1:465"], "tls": tls}}})
    assert c.service("s").tls == tls


@pytest.mark.parametrize("auth", ["none", "optional", "required"])
def test_service_auth_values(auth):
    c = Config.from_mapping({"myhostname": HOST, "services": {"s": {"listen": ["127.0.0.1:587"], "auth": auth}}})
    assert c.service("s").auth == auth


def test_service_unknown_key_suggests_listen(tmp_path):
    path, exc = file_error(tmp_path, '[services.smtp]\nlisen = ["127.0.0.1:25"]\nlisten = ["127.0.0.1:25"]\n')
    text = one_line(exc)
    assert path in text and "lisen" in text and "did you mean 'listen'" in text
    assert exc.key == "services.smtp.lisen"


def test_service_unknown_smtpd_key_suggests_parameter(tmp_path):
    path, exc = file_error(tmp_path, '[services.smtp]\nlisten = ["127.0.0.1:25"]\nsmtpd_timout = "5s"\n')
    assert "did you mean 'smtpd_timeout'" in one_line(exc)


def test_service_override_with_wrong_type_is_an_error(tmp_path):
    path, exc = file_error(tmp_path, '[services.smtp]\nlisten = ["127.0.0.1:25"]\nsmtpd_recipient_limit = "lots"\n')
    assert exc.key == "services.smtp.smtpd_recipient_limit"
    assert path in one_line(exc)


def test_service_overrides_are_typed():
    c = Config.from_mapping({"myhostname": HOST, "services": {"smtp": {
        "listen": ["127.0.0.1:25"], "smtpd_timeout": "5m", "message_size_limit": "1k",
        "smtpd_helo_required": "yes", "smtpd_recipient_limit": 3, "mynetworks": "10.0.0.0/8 192.0.2.0/24"}}})
    assert dict(c.service("smtp").overrides) == {
        "smtpd_timeout": 300.0, "message_size_limit": 1024, "smtpd_helo_required": True,
        "smtpd_recipient_limit": 3, "mynetworks": ("10.0.0.0/8", "192.0.2.0/24")}


def test_service_override_references_are_expanded():
    c = Config.from_mapping({"myhostname": HOST, "services": {"submission": {
        "listen": ["127.0.0.1:587"], "smtpd_banner": "$myhostname ESMTP submission"}}})
    assert c.service("submission").overrides["smtpd_banner"] == f"{HOST} ESMTP submission"


def test_service_is_a_frozen_value():
    svc = Service("smtp", ("127.0.0.1:25",))
    with pytest.raises(AttributeError):
        svc.tls = "may"


def test_default_config_file_loads():
    c = Config.from_file(default_config_path(), hostname="h.example")
    assert c.queue_directory == "./var/spool"
    assert c.service("smtp").endpoints() == [("127.0.0.1", 2525)]
    assert c.alias_maps == ("texthash:./var/aliases",)


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize("text, expected", [
    ("mx.example.com:587", ("mx.example.com", 587)),
    ("mx.example.com", ("mx.example.com", 25)),
    ("[10.0.0.1]:587", ("10.0.0.1", 587)),
    ("[10.0.0.1]", ("10.0.0.1", 25)),
    ("[::1]:2525", ("::1", 2525)),
    ("[::1]", ("::1", 25)),
    ("  0.0.0.0:0 ", ("0.0.0.0", 0)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
])
def test_parse_hostport(text, expected):
    assert parse_hostport(text, default_port=25) == expected


@pytest.mark.parametrize("text", ["[::1", "[::1]x", "host:port", "host:65536", "host:-1", "[::1]:abc"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text, default_port=25)


@pytest.mark.parametrize("value, unit, expected", [
    ("300s", "s", 300.0), ("5m", "s", 300.0), ("2h", "s", 7200.0), ("5d", "s", 432000.0), ("1w", "s", 604800.0),
    ("3", "d", 259200.0), (3, "d", 259200.0), (2.5, "h", 9000.0), (" 10 s ", "s", 10.0), ("0", "h", 0.0),
    ("10", "s", 10.0),
])
def test_parse_time(value, unit, expected):
    assert parse_time(value, unit) == expected


@pytest.mark.parametrize("value", ["", "s", "5x", "-5s", "5 days", "1e3", True, "5sm"])
def test_parse_time_rejects(value):
    with pytest.raises(ValueError):
        parse_time(value)


@pytest.mark.parametrize("value, expected", [
    (0, 0), (10, 10), ("10", 10), ("10k", 10240), ("10K", 10240), ("2m", 2 * 1024**2), ("1G", 1024**3), (" 5 ", 5),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "k", "1.5k", "-1", "1t", True, "ten"])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize("value, expected", [
    ("yes", True), ("no", False), ("true", True), ("off", False), (True, True), (" YES ", True),
])
def test_parse_bool(value, expected):
    assert parse_bool(value) is expected


def test_parse_bool_rejects():
    with pytest.raises(ValueError):
        parse_bool("perhaps")


@pytest.mark.parametrize("value, expected", [
    ("a, b c,d", ["a", "b", "c", "d"]),
    ("", []),
    (" , ,\t\n", []),
    ("inline:{ a=b, c=d }", ["inline:{ a=b, c=d }"]),
    ("inline:{ a=b, c=d }, static:x  hash:/y", ["inline:{ a=b, c=d }", "static:x", "hash:/y"]),
    ("inline:{ { k = v w }, x=y }, hash:/z", ["inline:{ { k = v w }, x=y }", "hash:/z"]),
    (["a", "b"], ["a", "b"]),
    (["a, b", "c d"], ["a", "b", "c", "d"]),
    (["inline:{ a=b, c=d }", "texthash:/t"], ["inline:{ a=b, c=d }", "texthash:/t"]),
    (["", "  "], []),
    (("x",), ["x"]),
])
def test_split_list(value, expected):
    assert split_list(value) == expected


@pytest.mark.parametrize("value", [5, None, ["a", 1], {"a": "b"}])
def test_split_list_rejects(value):
    with pytest.raises(ValueError):
        split_list(value)


def test_parse_network_forms():
    assert str(parse_network("[::1]/128")) == "::1/128"
    assert str(parse_network("127.0.0.0/8")) == "127.0.0.0/8"
    assert str(parse_network("192.0.2.1")) == "192.0.2.1/32"
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"
    with pytest.raises(ValueError):
        parse_network("nonsense")


# ---------------------------------------------------------------- command line


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "mailserver", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


GOOD = """\
myhostname = "mx.example.org"
message_size_limit = "20m"
relayhost = "[10.0.0.1]:587"

[services.smtp]
listen = ["127.0.0.1:2525"]
"""


@pytest.fixture
def good_file(tmp_path):
    return write(tmp_path, GOOD, "good.toml")


def test_cli_bad_config_exits_78_with_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, 'myhostname = "mx.example.org"\nmessage_size_limt = 5\n', "bad.toml")
    proc = run_cli("-c", path, "conf")
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert path in lines[0] and "message_size_limt" in lines[0] and "did you mean 'message_size_limit'" in lines[0]
    assert proc.stdout == ""


def test_cli_missing_config_exits_78(tmp_path):
    proc = run_cli("-c", str(tmp_path / "none.toml"), "conf")
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_toml_syntax_error_exits_78(tmp_path):
    path = write(tmp_path, "x = = 1\n", "syntax.toml")
    proc = run_cli("conf", "-c", path)
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_conf_n_with_c_before_subcommand(good_file):
    proc = run_cli("-c", good_file, "conf", "-n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "message_size_limit = 20m",
        "myhostname = mx.example.org",
        "relayhost = [10.0.0.1]:587",
    ]


def test_cli_conf_n_with_c_after_subcommand(good_file):
    proc = run_cli("conf", "-n", "-c", good_file)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "message_size_limit = 20m",
        "myhostname = mx.example.org",
        "relayhost = [10.0.0.1]:587",
    ]


def test_cli_conf_names_prints_just_those(good_file):
    proc = run_cli("-c", good_file, "conf", "mydomain", "myorigin")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["mydomain = example.org", "myorigin = mx.example.org"]


def test_cli_conf_name_shows_expanded_value(good_file):
    proc = run_cli("-c", good_file, "conf", "mydestination")
    assert proc.stdout == "mydestination = mx.example.org, localhost.example.org, localhost\n"


def test_cli_conf_d_prints_defaults(good_file):
    proc = run_cli("-c", good_file, "conf", "-d", "message_size_limit", "relayhost", "maximal_queue_lifetime")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "message_size_limit = 10240000",
        "relayhost = ",
        "maximal_queue_lifetime = 5d",
    ]


def test_cli_conf_without_names_prints_every_parameter(good_file):
    proc = run_cli("-c", good_file, "conf")
    assert proc.returncode == 0
    names = [line.split(" = ", 1)[0] for line in proc.stdout.splitlines()]
    assert names == sorted(PARAMETERS)


def test_cli_conf_unknown_name_warns_and_fails(good_file):
    proc = run_cli("-c", good_file, "conf", "myhostname", "no_such_param")
    assert proc.returncode != 0
    assert "no_such_param" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "myhostname = mx.example.org\n"


def test_cli_check_queue_directory_is_a_regular_file(tmp_path):
    qfile = tmp_path / "queue"
    qfile.write_text("not a directory")
    maildir = tmp_path / "mail"
    maildir.mkdir()
    path = write(tmp_path, f"""\
        myhostname = "mx.example.org"
        queue_directory = "{qfile}"
        mail_spool_directory = "{maildir}"
        alias_maps = []
        [services.smtp]
        listen = ["127.0.0.1:2525"]
    """, "check.toml")
    proc = run_cli("check", "-c", path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"queue_directory {qfile} is not a directory" in proc.stderr


def test_cli_check_valid_configuration(tmp_path):
    qdir = tmp_path / "queue"
    maildir = tmp_path / "mail"
    maildir.mkdir()
    path = write(tmp_path, f"""\
        myhostname = "mx.example.org"
        queue_directory = "{qdir}"
        mail_spool_directory = "{maildir}"
        alias_maps = []
        [services.smtp]
        listen = ["127.0.0.1:2525"]
    """, "check.toml")
    proc = run_cli("-c", path, "check")
    assert proc.returncode == 0, proc.stderr
    assert "is valid" in proc.stdout


# ---------------------------------------------------------------- environment overrides (containers)
def test_environment_overrides_are_typed_like_toml_values(tmp_path):
    from mailserver.config import environment_overrides

    path = tmp_path / "c.toml"
    path.write_text('myhostname = "from.file.example"\nmessage_size_limit = 5\n')
    env = {"MAILSERVER_MYNETWORKS": "10.0.0.0/8, 127.0.0.1", "MAILSERVER_MESSAGE_SIZE_LIMIT": "1000",
           "MAILSERVER_SMTPD_HELO_REQUIRED": "yes", "MAILSERVER_MAXIMAL_QUEUE_LIFETIME": "2d", "HOME": "/x"}
    cfg = Config.from_file(path, environ=env)
    assert cfg.mynetworks == ("10.0.0.0/8", "127.0.0.1")
    assert cfg.message_size_limit == 1000 and cfg.smtpd_helo_required is True
    assert cfg.maximal_queue_lifetime == 2 * 86400 and cfg.myhostname == "from.file.example"
    assert environment_overrides({"MAILSERVER_SMTP_TLS_CAFILE": "/ca.pem"}) == {"smtp_tls_CAfile": "/ca.pem"}


def test_environment_file_variant_reads_secrets_from_files(tmp_path):
    from mailserver.config import environment_overrides

    secret = tmp_path / "host"
    secret.write_text("secret.example\n")
    got = environment_overrides({"MAILSERVER_MYHOSTNAME_FILE": str(secret),
                                 "MAILSERVER_SMTPD_TLS_KEY_FILE": "/keys/key.pem"})
    assert got == {"myhostname": "secret.example", "smtpd_tls_key_file": "/keys/key.pem"}


def test_unknown_environment_parameter_is_a_one_line_error():
    from mailserver.config import environment_overrides

    with pytest.raises(ConfigError) as info:
        environment_overrides({"MAILSERVER_MYHOSTNAM": "x"})
    assert str(info.value) == ("environment: MAILSERVER_MYHOSTNAM: unknown parameter 'myhostnam' "
                               "(did you mean 'myhostname'?)")
