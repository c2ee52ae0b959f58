"""anvil(8) in process: per-client connection counts and rates, with a fake clock."""

from __future__ import annotations

import pytest

from mailserver.anvil import Anvil, AnvilLimits, ClientStats, network_matcher
from mailserver.config import Config
from mailserver.reply import Reply

IP = "192.0.2.1"
OTHER = "198.51.100.7"


class FakeClock:
    def __init__(self, now: float = 10_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock | None = None, **limits) -> Anvil:
    return Anvil(AnvilLimits(**limits), myhostname="mx.example.org", clock=clock or FakeClock())


# --------------------------------------------------------------------------
# Connection count


def test_concurrent_connection_limit_and_postfix_reply():
    anvil = make(connection_count=2)
    assert anvil.connect(IP) is None
    assert anvil.connect(IP) is None
    refusal = anvil.connect(IP)
    assert refusal == Reply(421, "4.7.0", "mx.example.org Error: too many connections from 192.0.2.1")
    assert str(refusal) == "421 4.7.0 mx.example.org Error: too many connections from 192.0.2.1"
    assert anvil.connect(OTHER) is None  # per client
    assert anvil.stats(IP).connections == 2  # the refused one holds no slot


def test_disconnect_frees_a_slot():
    anvil = make(connection_count=1)
    assert anvil.connect(IP) is None
    assert anvil.connect(IP) is not None
    anvil.disconnect(IP)
    assert anvil.connect(IP) is None


def test_disconnect_without_connect_is_harmless():
    anvil = make(connection_count=1)
    anvil.disconnect(IP)
    assert anvil.stats(IP).connections == 0
    assert anvil.connect(IP) is None


def test_zero_connection_count_is_unlimited():
    anvil = make(connection_count=0)
    assert all(anvil.connect(IP) is None for _ in range(500))


# --------------------------------------------------------------------------
# Rates over anvil_rate_time_unit


def test_connection_rate_limit_uses_the_same_reply_as_postfix():
    clock = FakeClock()
    anvil = make(clock, connection_count=0, connection_rate=3, rate_time_unit=60)
    for _ in range(3):
        assert anvil.connect(IP) is None
        anvil.disconnect(IP)
    assert anvil.connect(IP) == Reply(421, "4.7.0", "mx.example.org Error: too many connections from 192.0.2.1")
    clock.advance(59)
    assert anvil.connect(IP) is not None  # still the same window; refused attempts count too
    clock.advance(1)
    assert anvil.connect(IP) is None  # new window
    assert anvil.stats(IP).connection_rate == 1


def test_hammering_client_stays_refused_until_the_window_restarts():
    clock = FakeClock()
    anvil = make(clock, connection_count=0, connection_rate=2, rate_time_unit=60)
    accepted = []
    for second in range(71):  # one attempt per second, t = 0 .. 70
        if anvil.connect(IP) is None:
            accepted.append(second)
            anvil.disconnect(IP)
        clock.advance(1)
    # Window [0, 60): attempts at 0 and 1 pass; window [60, 120): 60 and 61.
    assert accepted == [0, 1, 60, 61]
    assert anvil.stats(IP).connection_rate == 11  # t = 60 .. 70, refused attempts included


def test_message_rate_limit():
    clock = FakeClock()
    anvil = make(clock, message_rate=2, rate_time_unit=60)
    assert anvil.message(IP) is None
    assert anvil.message(IP) is None
    refusal = anvil.message(IP)
    assert refusal == Reply(450, "4.7.1", "Error: too much mail from 192.0.2.1")
    assert str(refusal) == "450 4.7.1 Error: too much mail from 192.0.2.1"
    assert anvil.message(OTHER) is None
    clock.advance(60)
    assert anvil.message(IP) is None


def test_recipient_rate_limit():
    clock = FakeClock()
    anvil = make(clock, recipient_rate=3, rate_time_unit=30)
    assert [anvil.recipient(IP) for _ in range(3)] == [None, None, None]
    assert anvil.recipient(IP) == Reply(450, "4.7.1", "Error: too many recipients from 192.0.2.1")
    clock.advance(30)
    assert anvil.recipient(IP) is None


def test_auth_rate_limit():
    clock = FakeClock()
    anvil = make(clock, auth_rate=1, rate_time_unit=60)
    assert anvil.auth(IP) is None
    assert anvil.auth(IP) == Reply(450, "4.7.1", "Error: too many AUTH commands from 192.0.2.1")
    clock.advance(61)
    assert anvil.auth(IP) is None


def test_rates_share_one_window_per_client():
    clock = FakeClock()
    anvil = make(clock, connection_count=0, connection_rate=10, message_rate=10, rate_time_unit=60)
    anvil.connect(IP)
    clock.advance(50)
    anvil.message(IP)
    clock.advance(10)  # 60 s after the window opened: everything restarts
    anvil.message(IP)
    stats = anvil.stats(IP)
    assert (stats.connection_rate, stats.message_rate) == (0, 1)


@pytest.mark.parametrize("method", ["message", "recipient", "auth"])
def test_zero_rate_limit_is_unlimited(method):
    anvil = make()
    assert all(getattr(anvil, method)(IP) is None for _ in range(1000))
    assert len(anvil) == 0  # unlimited events are not even tracked


# --------------------------------------------------------------------------
# Authentication failures


def test_auth_failure_delay_grows_and_is_capped():
    clock = FakeClock()
    anvil = make(clock, rate_time_unit=60)
    assert anvil.auth_failure_delay(IP) == 0.0
    delays = [anvil.auth_failure(IP) for _ in range(12)]
    assert delays[:4] == [0.5, 1.0, 1.5, 2.0]
    assert delays[-1] == 5.0 and max(delays) == 5.0
    assert anvil.auth_failure_delay(IP) == 5.0
    assert anvil.auth_failure_delay(OTHER) == 0.0


def test_auth_failures_follow_the_client_across_connections_and_decay():
    clock = FakeClock()
    anvil = make(clock, connection_count=5, rate_time_unit=60)
    anvil.connect(IP)
    anvil.auth_failure(IP)
    anvil.auth_failure(IP)
    anvil.disconnect(IP)
    clock.advance(30)
    anvil.connect(IP)
    assert anvil.auth_failure_delay(IP) == 1.0  # remembered from the last connection
    assert anvil.auth_failure(IP) == 1.5
    anvil.disconnect(IP)
    clock.advance(59)
    assert anvil.auth_failure_delay(IP) == 1.5
    clock.advance(1)  # a time unit after the last failure
    assert anvil.auth_failure_delay(IP) == 0.0
    assert anvil.auth_failure(IP) == 0.5


def test_successful_login_ends_the_run_of_failures():
    anvil = make()
    anvil.auth_failure(IP)
    anvil.auth_failure(IP)
    anvil.auth_success(IP)
    assert anvil.auth_failure_delay(IP) == 0.0
    anvil.auth_success(OTHER)  # unknown client: nothing to do


def test_custom_delay_step_and_cap():
    anvil = make(auth_failure_delay_step=2.0, auth_failure_delay_max=3.0)
    assert [anvil.auth_failure(IP) for _ in range(3)] == [2.0, 3.0, 3.0]


# --------------------------------------------------------------------------
# Exemptions (smtpd_client_event_limit_exceptions)


def test_exempt_clients_are_neither_limited_nor_counted():
    clock = FakeClock()
    anvil = Anvil(AnvilLimits(connection_count=1, connection_rate=1, message_rate=1, recipient_rate=1,
                              auth_rate=1), myhostname="mx", is_exempt=lambda ip: ip.startswith("127."),
                  clock=clock)
    for _ in range(5):
        assert anvil.connect("127.0.0.1") is None
        assert anvil.message("127.0.0.1") is None
        assert anvil.recipient("127.0.0.1") is None
        assert anvil.auth("127.0.0.1") is None
        assert anvil.auth_failure("127.0.0.1") == 0.0
    assert anvil.auth_failure_delay("127.0.0.1") == 0.0
    assert len(anvil) == 0
    assert anvil.connect(IP) is None
    assert anvil.connect(IP) is not None


def test_exemption_change_between_connect_and_disconnect_keeps_counts_sane():
    exempt = {IP}
    anvil = Anvil(AnvilLimits(connection_count=1), is_exempt=lambda ip: ip in exempt, clock=FakeClock())
    assert anvil.connect(IP) is None  # exempt: not counted
    exempt.clear()
    anvil.disconnect(IP)  # nothing was counted: nothing to undo
    assert anvil.stats(IP).connections == 0
    assert anvil.connect(IP) is None  # counted now
    exempt.add(IP)
    anvil.disconnect(IP)  # still released, exempt or not
    exempt.clear()
    assert anvil.stats(IP).connections == 0
    assert anvil.connect(IP) is None


# --------------------------------------------------------------------------
# Memory bound


def test_idle_clients_are_forgotten_after_the_window():
    clock = FakeClock()
    anvil = make(clock, connection_count=10, message_rate=100, rate_time_unit=60)
    for i in range(1000):
        ip = f"10.0.{i // 256}.{i % 256}"
        assert anvil.connect(ip) is None
        anvil.message(ip)
        anvil.disconnect(ip)
    anvil.connect(IP)  # still connected: must be kept
    assert len(anvil) == 1001
    clock.advance(60)
    assert anvil.prune() == 1000
    assert len(anvil) == 1 and anvil.stats(IP).connections == 1


def test_pruning_happens_lazily_without_explicit_calls():
    clock = FakeClock()
    anvil = make(clock, connection_count=10, rate_time_unit=60)
    for day in range(5):
        for i in range(200):
            ip = f"10.{day}.0.{i}"
            anvil.connect(ip)
            anvil.disconnect(ip)
        clock.advance(61)
    # Only the clients of the last window (plus at most one window's worth) remain.
    assert len(anvil) <= 400
    anvil.connect(IP)
    assert len(anvil) <= 201


def test_recent_auth_failures_are_kept_until_they_decay():
    clock = FakeClock()
    anvil = make(clock, rate_time_unit=60)
    anvil.auth_failure(IP)
    clock.advance(59)
    assert anvil.prune() == 0
    clock.advance(1)
    assert anvil.prune() == 1


def test_table_size_is_capped_under_a_flood_of_addresses():
    clock = FakeClock()
    anvil = Anvil(AnvilLimits(connection_count=10), clock=clock, max_clients=100)
    anvil.connect(IP)  # a live connection survives eviction
    for i in range(1000):
        ip = f"2001:db8::{i:x}"
        anvil.connect(ip)
        anvil.disconnect(ip)
    assert len(anvil) <= 100
    assert anvil.stats(IP).connections == 1


# --------------------------------------------------------------------------
# Configuration and logging


def test_limits_from_config_defaults_match_postfix():
    limits = AnvilLimits.from_params(Config({}, hostname="mx.example.org"))
    assert limits == AnvilLimits(connection_count=50, connection_rate=0, message_rate=0, recipient_rate=0,
                                 auth_rate=0, rate_time_unit=60.0)
    assert limits.any_limit


def test_limits_from_a_listener_parameter_mapping():
    config = Config({"smtpd_client_message_rate_limit": 30, "anvil_rate_time_unit": "2m"}, hostname="mx")
    params = {name: config[name] for name in config.names()}
    params["smtpd_client_connection_count_limit"] = 5  # a per-service override
    limits = AnvilLimits.from_params(params)
    assert (limits.connection_count, limits.message_rate, limits.rate_time_unit) == (5, 30, 120.0)
    assert not AnvilLimits(connection_count=0).any_limit


def test_reconfigure_keeps_counts():
    anvil = make(connection_count=5)
    for _ in range(3):
        anvil.connect(IP)
    anvil.reconfigure(AnvilLimits(connection_count=3), myhostname="new.example.org")
    assert anvil.connect(IP) == Reply(421, "4.7.0", "new.example.org Error: too many connections from 192.0.2.1")
    anvil.reconfigure(AnvilLimits(connection_count=3), is_exempt=lambda ip: True)
    assert anvil.connect(IP) is None


def test_warnings_use_postfix_wording():
    logged: list[str] = []
    clock = FakeClock()
    anvil = Anvil(AnvilLimits(connection_count=1, connection_rate=0, message_rate=1, recipient_rate=1, auth_rate=1),
                  myhostname="mx", clock=clock, log=logged.append, service="submission")
    anvil.connect(IP)
    anvil.connect(IP, client=f"host.example[{IP}]")
    anvil.message(IP), anvil.message(IP)
    anvil.recipient(IP), anvil.recipient(IP)
    anvil.auth(IP), anvil.auth(IP)
    assert logged == [
        "warning: Connection concurrency limit exceeded: 2 from host.example[192.0.2.1] for service submission",
        "warning: Message delivery request rate limit exceeded: 2 from 192.0.2.1 for service submission",
        "warning: Recipient address rate limit exceeded: 2 from 192.0.2.1 for service submission",
        "warning: AUTH command rate limit exceeded: 2 from 192.0.2.1 for service submission",
    ]
    anvil2 = Anvil(AnvilLimits(connection_count=0, connection_rate=1), clock=clock, log=logged.append)
    anvil2.connect(IP), anvil2.connect(IP)
    assert logged[-1] == "warning: Connection rate limit exceeded: 2 from 192.0.2.1 for service smtp"


def test_stats_of_unknown_client():
    assert make().stats(IP) == ClientStats(0, 0, 0, 0, 0, 0)


def test_network_matcher_for_event_limit_exceptions():
    config = Config({"mynetworks": "127.0.0.0/8, [::1]/128, 192.0.2.0/28"}, hostname="mx")
    is_exempt = network_matcher(config.smtpd_client_event_limit_exceptions)  # default: $mynetworks
    assert is_exempt("127.0.0.1") and is_exempt("::1") and is_exempt("192.0.2.15")
    assert is_exempt("::ffff:192.0.2.1")  # IPv4-mapped
    assert not is_exempt("192.0.2.16") and not is_exempt("2001:db8::1") and not is_exempt("unknown")
    anvil = Anvil(AnvilLimits(connection_count=1), is_exempt=is_exempt, clock=FakeClock())
    assert anvil.connect("127.0.0.1") is None and anvil.connect("127.0.0.1") is None
    with pytest.raises(ValueError):
        network_matcher(["hash:/etc/postfix/exceptions"])
