"""virtual(8) ownership: virtual_uid_maps / virtual_gid_maps give the owner
of each delivered file (as root), and a changed map file is re-read by the
server's table watcher (Postfix re-opens changed tables)."""

from __future__ import annotations

import os

import pytest

from mailserver.delivery import Delivered, DeliveryRequest, Recipient, TemporaryFailure
from mailserver.delivery.local import VirtualAgent
from mailserver.resolve import AddressResolver
from mailserver.server import _reload_tables

from test_api import make_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="file ownership needs root (CI runs as root)")


def _request(n: int) -> DeliveryRequest:
    return DeliveryRequest(queue_id=f"08TEST{n}", sender="s@example.org",
                           recipients=(Recipient("alice@one.test", "alice@one.test", 0),),
                           message=b"Subject: %d\r\n\r\nbody\r\n" % n, nexthop="one.test")


def _owners(maildir) -> list[tuple[int, int]]:
    return sorted((st.st_uid, st.st_gid) for st in (p.stat() for p in (maildir / "new").iterdir()))


def _agent(tmp_path, uids, gids=None) -> VirtualAgent:
    config = make_config(tmp_path, virtual_uid_maps=[f"texthash:{uids}"],
                         virtual_gid_maps=[f"texthash:{gids}"] if gids else [], virtual_minimum_uid=100)
    return VirtualAgent(config, AddressResolver(config))


def _write_map(path, text: str, mtime: float) -> None:
    path.write_text(text)
    os.utime(path, (mtime, mtime))  # a different time stamp, however fast the test runs


async def test_uid_and_gid_maps_own_the_file_and_a_changed_map_is_reread(tmp_path):
    uids, gids = tmp_path / "uids", tmp_path / "gids"
    _write_map(uids, "alice@one.test 2001\n", 1_000_000)
    _write_map(gids, "@one.test 3001\n", 1_000_000)
    agent = _agent(tmp_path, uids, gids)
    maildir = tmp_path / "vmail" / "alice"

    [out] = await agent.deliver(_request(1))
    assert isinstance(out, Delivered), out
    assert _owners(maildir) == [(2001, 3001)]

    _write_map(uids, "alice@one.test 2002\n", 2_000_000)
    _reload_tables(None, None, [agent])  # what the server's table watcher does
    [out] = await agent.deliver(_request(2))
    assert isinstance(out, Delivered), out
    assert _owners(maildir) == [(2001, 3001), (2002, 3001)]


async def test_a_uid_below_virtual_minimum_uid_defers(tmp_path):
    uids = tmp_path / "uids"
    _write_map(uids, "alice@one.test 5\n", 1_000_000)
    agent = _agent(tmp_path, uids)
    [out] = await agent.deliver(_request(1))
    assert out == TemporaryFailure("4.3.5", "virtual uid 5 is below virtual_minimum_uid", "virtual")
    assert not (tmp_path / "vmail" / "alice").exists()


async def test_a_recipient_the_configured_uid_map_does_not_know_is_deferred_not_delivered_as_root(tmp_path):
    uids = tmp_path / "uids"
    _write_map(uids, "bob@one.test 2001\n", 1_000_000)
    agent = _agent(tmp_path, uids)
    [out] = await agent.deliver(_request(1))
    assert out == TemporaryFailure("4.3.5", "mail system configuration error: recipient alice@one.test "
                                            "not found in virtual_uid_maps", "virtual")
    assert not (tmp_path / "vmail" / "alice").exists()


async def test_a_uid_map_that_disappears_keeps_its_previous_contents(tmp_path):
    uids = tmp_path / "uids"
    _write_map(uids, "alice@one.test 2001\n", 1_000_000)
    agent = _agent(tmp_path, uids)
    uids.unlink()
    _reload_tables(None, None, [agent])
    [out] = await agent.deliver(_request(1))
    assert isinstance(out, Delivered), out
    assert _owners(tmp_path / "vmail" / "alice") == [(2001, os.getgid())]  # (no gid map: the server's group)


async def test_a_recipient_the_configured_gid_map_does_not_know_is_deferred(tmp_path):
    uids, gids = tmp_path / "uids", tmp_path / "gids"
    _write_map(uids, "alice@one.test 2001\n", 1_000_000)
    _write_map(gids, "@other.test 3001\n", 1_000_000)
    [out] = await _agent(tmp_path, uids, gids).deliver(_request(1))
    assert out == TemporaryFailure("4.3.5", "mail system configuration error: recipient alice@one.test "
                                            "not found in virtual_gid_maps", "virtual")
    assert not (tmp_path / "vmail" / "alice").exists()


@pytest.mark.parametrize("value", ["abc", "-5", "20x1", "99999999999", "4294967295", "1" * 5000])
async def test_a_uid_map_value_that_is_not_a_uid_is_reported_as_such_and_deferred(tmp_path, value):
    uids = tmp_path / "uids"
    _write_map(uids, f"alice@one.test {value}\n", 1_000_000)
    [out] = await _agent(tmp_path, uids).deliver(_request(1))
    assert out == TemporaryFailure("4.3.5", f'mail system configuration error: bad virtual_uid_maps result '
                                            f'"{value}" for recipient alice@one.test', "virtual")
    assert not (tmp_path / "vmail" / "alice").exists()
