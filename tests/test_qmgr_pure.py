"""Tests for the pure scheduling functions of mailserver.qmgr: backoff,
next attempt time, expiry and batch planning."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from mailserver.config import Config
from mailserver.qmgr import Batch, QueueManager, backoff_delay, is_expired, next_attempt_time, plan_batches
from mailserver.resolve import DEFAULT, LOCAL, Route
from mailserver.spool import Envelope, RecipientState

MIN, MAX = 300.0, 4000.0
DAY = 86400.0


# ---------------------------------------------------------------- backoff


def test_backoff_of_a_young_message_is_the_minimal_backoff():
    assert backoff_delay(0, MIN, MAX) == MIN
    assert backoff_delay(10, MIN, MAX) == MIN
    assert backoff_delay(299.9, MIN, MAX) == MIN


def test_backoff_of_an_old_message_is_the_maximal_backoff():
    assert backoff_delay(4001, MIN, MAX) == MAX
    assert backoff_delay(5 * DAY, MIN, MAX) == MAX


def test_backoff_in_between_equals_the_age():
    assert backoff_delay(1000, MIN, MAX) == 1000
    assert backoff_delay(MIN, MIN, MAX) == MIN
    assert backoff_delay(MAX, MIN, MAX) == MAX


def test_backoff_of_a_message_from_the_future_is_minimal():
    # The clock jumped back: negative age must not give a negative delay.
    assert backoff_delay(-1000, MIN, MAX) == MIN


def test_backoff_grows_with_age():
    delays = [backoff_delay(age, MIN, MAX) for age in (0, 300, 600, 1200, 2400, 4800)]
    assert delays == sorted(delays)
    assert delays == [300, 300, 600, 1200, 2400, 4000]


# ---------------------------------------------------------------- next attempt


@pytest.mark.parametrize("age", [0, 100, 300, 1000, 3999, 4000, 10_000, 5 * DAY])
def test_next_attempt_is_within_ten_percent_jitter_of_the_backoff(age):
    rng = random.Random(1234)
    now = 1_700_000_000.0
    delay = backoff_delay(age, MIN, MAX)
    for _ in range(200):
        due = next_attempt_time(now, now - age, MIN, MAX, rng)
        assert now + delay <= due <= now + delay * 1.1


def test_next_attempt_jitter_is_deterministic_for_a_seeded_rng():
    now = 1_700_000_000.0
    a = [next_attempt_time(now, now - 1000, MIN, MAX, random.Random(7)) for _ in range(3)]
    b = [next_attempt_time(now, now - 1000, MIN, MAX, random.Random(7)) for _ in range(3)]
    assert a == b


def test_next_attempt_jitter_spreads_a_burst():
    rng = random.Random(99)
    now = 1_700_000_000.0
    dues = {next_attempt_time(now, now, MIN, MAX, rng) for _ in range(50)}
    assert len(dues) > 1


def test_next_attempt_is_never_in_the_past():
    rng = random.Random(5)
    now = 1_700_000_000.0
    assert next_attempt_time(now, now + 10_000, MIN, MAX, rng) >= now + MIN


def test_next_attempt_with_min_equal_max_is_fixed_plus_jitter():
    rng = random.Random(3)
    now = 1000.0
    for arrival in (0.0, 900.0, 999.0):
        due = next_attempt_time(now, arrival, 60.0, 60.0, rng)
        assert 1060.0 <= due <= 1066.0


# ---------------------------------------------------------------- expiry


def envelope(sender: str, arrival: float) -> Envelope:
    return Envelope(queue_id="ABCDEF123456", sender=sender, recipients=[RecipientState("r@example.com")],
                    arrival_time=arrival)


def test_message_expires_after_maximal_queue_lifetime():
    env = envelope("s@example.org", 0.0)
    assert not is_expired(5 * DAY - 1, env, 5 * DAY, 1 * DAY)
    assert is_expired(5 * DAY, env, 5 * DAY, 1 * DAY)
    assert is_expired(6 * DAY, env, 5 * DAY, 1 * DAY)


def test_bounce_with_null_sender_uses_bounce_queue_lifetime():
    env = envelope("", 0.0)
    assert not is_expired(DAY - 1, env, 5 * DAY, 1 * DAY)
    assert is_expired(DAY, env, 5 * DAY, 1 * DAY)
    assert is_expired(2 * DAY, env, 5 * DAY, 1 * DAY)


def test_null_sender_may_live_longer_when_bounce_lifetime_is_longer():
    env = envelope("", 0.0)
    assert not is_expired(6 * DAY, env, 5 * DAY, 10 * DAY)
    assert is_expired(6 * DAY, envelope("s@x.test", 0.0), 5 * DAY, 10 * DAY)


def test_zero_lifetime_expires_at_once():
    # Postfix: maximal_queue_lifetime = 0 means one delivery attempt only.
    assert is_expired(0.0, envelope("s@x.test", 0.0), 0.0, 0.0)


def test_message_from_the_future_is_not_expired():
    assert not is_expired(0.0, envelope("s@x.test", 1000.0), 5 * DAY, 5 * DAY)


# ---------------------------------------------------------------- batch planning


def route(transport: str, nexthop: str, address: str = "r@example.com", cls: str = DEFAULT) -> Route:
    return Route(cls, transport, nexthop, address)


def limits(**per_transport: int):
    return lambda transport: per_transport.get(transport, 50)


def sizes(batches: list[Batch]) -> list[int]:
    return [len(b.indexes) for b in batches]


def test_one_destination_is_split_by_the_recipient_limit():
    routes = {i: route("smtp", "example.com", f"u{i}@example.com") for i in range(120)}
    batches = plan_batches(routes, limits(smtp=50))
    assert sizes(batches) == [50, 50, 20]
    assert [i for b in batches for i in b.indexes] == list(range(120))
    assert all((b.route.transport, b.route.nexthop) == ("smtp", "example.com") for b in batches)


def test_exact_multiple_of_the_limit_has_no_empty_batch():
    routes = {i: route("smtp", "example.com") for i in range(100)}
    assert sizes(plan_batches(routes, limits(smtp=50))) == [50, 50]


def test_local_limit_one_gives_one_batch_per_recipient():
    routes = {i: route("local", "mail.example.com", f"u{i}@mail.example.com", LOCAL) for i in range(3)}
    batches = plan_batches(routes, limits(local=1))
    assert [b.indexes for b in batches] == [[0], [1], [2]]
    assert [b.route.transport for b in batches] == ["local"] * 3


def test_two_domains_get_separate_batches():
    routes = {0: route("smtp", "a.example"), 1: route("smtp", "b.example"), 2: route("smtp", "a.example"),
              3: route("smtp", "b.example")}
    batches = plan_batches(routes, limits())
    assert {(b.route.nexthop, tuple(b.indexes)) for b in batches} == {("a.example", (0, 2)), ("b.example", (1, 3))}


def test_same_nexthop_different_transports_are_separate():
    routes = {0: route("smtp", "[10.0.0.1]"), 1: route("lmtp", "[10.0.0.1]"), 2: route("smtp", "[10.0.0.1]")}
    batches = plan_batches(routes, limits())
    assert sorted((b.route.transport, b.indexes) for b in batches) == [("lmtp", [1]), ("smtp", [0, 2])]


def test_relayhost_groups_many_domains_into_one_batch():
    routes = {i: route("smtp", "[10.0.0.1]:587", f"u@d{i}.example") for i in range(10)}
    batches = plan_batches(routes, limits())
    assert sizes(batches) == [10]


def test_mixed_message_local_and_remote():
    routes = {0: route("local", "h", "a@h", LOCAL), 1: route("smtp", "x.test"), 2: route("local", "h", "b@h", LOCAL),
              3: route("smtp", "x.test")}
    batches = plan_batches(routes, limits(local=1))
    assert sorted((b.route.transport, b.indexes) for b in batches) == [
        ("local", [0]), ("local", [2]), ("smtp", [1, 3])]


def test_limit_zero_or_negative_is_treated_as_one():
    routes = {i: route("smtp", "x.test") for i in range(3)}
    assert sizes(plan_batches(routes, limits(smtp=0))) == [1, 1, 1]
    assert sizes(plan_batches(routes, limits(smtp=-5))) == [1, 1, 1]


def test_recipient_limit_is_asked_per_transport():
    asked = []

    def limit(transport):
        asked.append(transport)
        return 2

    routes = {0: route("smtp", "a"), 1: route("relay", "b"), 2: route("smtp", "a")}
    plan_batches(routes, limit)
    assert sorted(asked) == ["relay", "smtp"]


def test_only_pending_indexes_are_planned():
    # qmgr passes only pending recipients; indexes keep their envelope positions.
    routes = {3: route("smtp", "x.test"), 7: route("smtp", "x.test"), 9: route("smtp", "y.test")}
    batches = plan_batches(routes, limits())
    assert sorted(b.indexes for b in batches) == [[3, 7], [9]]


def test_no_recipients_no_batches():
    assert plan_batches({}, limits()) == []


def test_batch_route_is_the_first_recipients_route():
    routes = {0: route("smtp", "x.test", "first@x.test"), 1: route("smtp", "x.test", "second@x.test")}
    [batch] = plan_batches(routes, limits())
    assert batch.route.address == "first@x.test"


def test_queue_manager_recipient_limits_follow_the_config():
    holder = SimpleNamespace(config=Config(myhostname="h.example", default_destination_recipient_limit=7,
                                           local_destination_recipient_limit=1))
    assert QueueManager._recipient_limit(holder, "smtp") == 7
    assert QueueManager._recipient_limit(holder, "relay") == 7
    assert QueueManager._recipient_limit(holder, "local") == 1
