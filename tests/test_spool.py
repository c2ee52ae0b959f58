"""Tests for mailserver.spool: queue IDs, envelope records, durable
enqueue, moves, scans and crash recovery."""

from __future__ import annotations

import errno
import json
import os
import string

import pytest

import mailserver.spool as spool_mod
from mailserver.spool import (
    QUEUE_STATES,
    STATES,
    CorruptRecord,
    IncompleteRecord,
    Envelope,
    RecipientState,
    Spool,
    SpoolError,
    is_queue_id,
    new_queue_id,
)

MESSAGE = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nbody line\r\n.dot\r\n"


def make_envelope(queue_id: str | None = None, *, rcpts=("b@example.com",), sender="a@example.org",
                  **kw) -> Envelope:
    return Envelope(
        queue_id=queue_id or new_queue_id(),
        sender=sender,
        recipients=[RecipientState(r) for r in rcpts],
        arrival_time=kw.pop("arrival_time", 1_700_000_000.25),
        **kw,
    )


@pytest.fixture(params=["threads", "io_uring"])
async def spool(tmp_path, request):
    """Every spool test runs on both I/O engines (worker threads, io_uring)."""
    s = Spool(str(tmp_path / "queue"), workers=4, io_engine=request.param)
    s.create_directories()
    assert s.start_io() == request.param
    yield s
    await s.close()


@pytest.fixture
async def thread_spool(tmp_path):
    """For tests that replace the blocking helpers the worker threads run."""
    s = Spool(str(tmp_path / "queue"), workers=4, io_engine="threads")
    s.create_directories()
    yield s
    await s.close()


def files(spool: Spool, state: str) -> list[str]:
    return sorted(os.listdir(spool.state_dir(state)))


def all_files(spool: Spool) -> dict[str, list[str]]:
    return {state: files(spool, state) for state in STATES if files(spool, state)}


def put(spool: Spool, state: str, env: Envelope | None, message: bytes | None, queue_id: str | None = None) -> str:
    """Place queue files directly (simulating what a crash left behind)."""
    qid = queue_id or (env.queue_id if env else new_queue_id())
    if env is not None:
        with open(spool.path(state, qid, "env"), "wb") as fh:
            fh.write(env.to_json())
    if message is not None:
        with open(spool.path(state, qid, "msg"), "wb") as fh:
            fh.write(message)
    return qid


def enospc(stage: str) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------- queue IDs


def test_ten_thousand_queue_ids_are_unique_sorted_and_file_name_safe():
    ids = [new_queue_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids
    safe = set(string.ascii_letters + string.digits)
    for qid in ids:
        assert set(qid) <= safe
        assert is_queue_id(qid)
        assert len(qid) == 12


def test_queue_ids_sort_across_calls_even_with_a_stalled_clock(monkeypatch):
    monkeypatch.setattr(spool_mod.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    ids = [new_queue_id() for _ in range(100)]
    assert len(set(ids)) == 100
    assert sorted(ids) == ids


@pytest.mark.parametrize("text, ok", [
    ("4Fx3Kq1zQ2ab", True), ("ABCDEF", True), ("abc", False), ("a" * 33, False), ("../etc", False),
    ("abc.def", False), ("abcdef.env", False), ("", False), ("abc def", False),
])
def test_is_queue_id(text, ok):
    assert is_queue_id(text) is ok


# ---------------------------------------------------------------- envelope records


def test_envelope_json_round_trip_keeps_every_field():
    env = Envelope(
        queue_id="4Fx3Kq1zQ2ab",
        sender="sender@example.org",
        recipients=[
            RecipientState("a@example.com", "orig-a@example.com"),
            RecipientState("b@example.com", "", "sent", "2.0.0", "250 ok", "mx[1.2.3.4]:25"),
            RecipientState("c@example.com", "", "bounced", "5.1.1", "user unknown", ""),
        ],
        arrival_time=1_700_000_123.5,
        size=4321,
        attempts=3,
        next_attempt=1_700_003_000.0,
        warned=True,
        smtputf8=True,
        body_8bit=True,
        client="host.example[192.0.2.1]",
        origin="local",
        extra={"auth": "user", "n": [1, 2]},
    )
    back = Envelope.from_json(env.to_json())
    assert back == env
    assert back.pending == [0]
    assert [r.done for r in back.recipients] == [False, True, True]


def test_envelope_round_trip_with_utf8_addresses_and_null_sender():
    env = make_envelope(sender="", rcpts=("jösé@exämple.org", "用户@例子.广告"), smtputf8=True)
    data = env.to_json()
    assert "jösé".encode() in data
    back = Envelope.from_json(data)
    assert back == env
    assert back.sender == ""


def test_envelope_defaults_when_optional_fields_are_absent():
    doc = {"v": 1, "id": "ABCDEF123456", "sender": "s@x", "arrival": 5, "rcpt": [["r@y", "", "pending", "", "", ""]]}
    env = Envelope.from_json(json.dumps(doc).encode())
    assert env.queue_id == "ABCDEF123456"
    assert env.arrival_time == 5.0
    assert (env.size, env.attempts, env.next_attempt, env.warned, env.origin, env.extra) == (0, 0, 0.0, False,
                                                                                              "smtp", {})


@pytest.mark.parametrize("data", [
    b"",
    b"garbage",
    b"\xff\xfe\x00",
    b"[1, 2, 3]",
    b'{"v": 2, "id": "X", "sender": "", "arrival": 0, "rcpt": [["a", "", "pending", "", "", ""]]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": []}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": [["a", "", "lost", "", "", ""]]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0}',
    b'{"v": 1, "sender": "", "arrival": 0, "rcpt": [["a", "", "pending", "", "", ""]]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": "soon", "rcpt": [["a", "", "pending", "", "", ""]]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": [5]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": [["a", "", "pending", "", "", "", "extra"]]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": [["a"]], "extra": 5}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": [["a"]], "size": "big"}',
])
def test_corrupt_envelope_records_raise_corrupt_record(data):
    with pytest.raises(CorruptRecord):
        Envelope.from_json(data)


@pytest.mark.parametrize("data", [
    # a string where the recipient list belongs must not become one recipient per character
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": "abc"}',
    # null must not become the address "None"
    b'{"v": 1, "id": "X", "sender": null, "arrival": 0, "rcpt": [["a", "", "pending", "", "", ""]]}',
    b'{"v": 1, "id": "X", "sender": "", "arrival": 0, "rcpt": [[null, "", "pending", "", "", ""]]}',
])
def test_envelope_fields_of_the_wrong_json_type_are_corrupt(data):
    with pytest.raises(CorruptRecord):
        Envelope.from_json(data)


# ---------------------------------------------------------------- layout


async def test_create_directories_makes_every_state(spool):
    for state in STATES:
        assert os.path.isdir(spool.state_dir(state))
    assert spool.check() == []


async def test_check_reports_missing_state_directories(tmp_path):
    s = Spool(str(tmp_path / "nothing-here"))
    try:
        problems = s.check()
        assert len(problems) == len(STATES)
        assert all("missing" in p for p in problems)
    finally:
        await s.close()


# ---------------------------------------------------------------- enqueue


async def test_enqueue_writes_one_queue_file_in_incoming_with_exact_content(spool):
    # One file per new message (one fsync): the envelope line, then the content.
    env = make_envelope(size=len(MESSAGE))
    await spool.enqueue(env, MESSAGE)
    qid = env.queue_id
    assert files(spool, "incoming") == [f"{qid}.env"]
    with open(spool.path("incoming", qid, "env"), "rb") as fh:
        data = fh.read()
    head, _, content = data.partition(b"\n")
    assert content == MESSAGE
    assert json.loads(head)["clen"] == len(MESSAGE)
    assert Envelope.from_json(data) == env
    loaded, msg = await spool.load(qid, "incoming")
    assert loaded == env and msg == MESSAGE
    assert await spool.load_message(qid, "incoming") == MESSAGE
    assert spool.locate(qid) == "incoming"


async def test_enqueue_files_are_private(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    assert os.stat(spool.path("incoming", env.queue_id, "env")).st_mode & 0o077 == 0
    await spool.update(env, "incoming")  # the content file of a message with a replaced envelope
    for suffix in ("env", "msg"):
        assert os.stat(spool.path("incoming", env.queue_id, suffix)).st_mode & 0o077 == 0


async def test_enqueue_into_another_state(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE, state="hold")
    assert files(spool, "hold") == [f"{env.queue_id}.env"]
    assert files(spool, "incoming") == []


async def test_enqueue_binary_and_empty_content_exactly(spool):
    content = bytes(range(256)) * 40
    env = make_envelope()
    await spool.enqueue(env, content)
    assert await spool.load_message(env.queue_id, "incoming") == content
    env2 = make_envelope()
    await spool.enqueue(env2, b"")
    assert await spool.load_message(env2.queue_id, "incoming") == b""


async def test_many_concurrent_enqueues_all_land(spool):
    import asyncio

    envs = [make_envelope() for _ in range(50)]
    await asyncio.gather(*(spool.enqueue(e, MESSAGE + e.queue_id.encode()) for e in envs))
    entries = spool.scan("incoming")
    assert [e.queue_id for e in entries] == sorted(e.queue_id for e in envs)
    for e in envs:
        assert await spool.load_message(e.queue_id, "incoming") == MESSAGE + e.queue_id.encode()


async def test_enqueue_no_space_raises_spool_error_and_leaves_no_file(spool):
    spool.fault_hook = lambda stage: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    env = make_envelope()
    with pytest.raises(SpoolError) as info:
        await spool.enqueue(env, MESSAGE)
    assert info.value.no_space is True
    assert info.value.errno == errno.ENOSPC
    assert all_files(spool) == {}


async def test_enqueue_fault_hook_sees_the_enqueue_stage(spool):
    stages = []
    spool.fault_hook = stages.append
    await spool.enqueue(make_envelope(), MESSAGE)
    assert stages == ["enqueue"]


async def test_enqueue_quota_error_is_no_space(spool):
    def edquot(stage):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    spool.fault_hook = edquot
    with pytest.raises(SpoolError) as info:
        await spool.enqueue(make_envelope(), MESSAGE)
    assert info.value.no_space


async def test_enqueue_io_error_is_not_no_space(spool):
    def eio(stage):
        raise OSError(errno.EIO, "Input/output error")

    spool.fault_hook = eio
    with pytest.raises(SpoolError) as info:
        await spool.enqueue(make_envelope(), MESSAGE)
    assert not info.value.no_space
    assert all_files(spool) == {}


async def test_enqueue_failure_while_writing_the_queue_file_leaves_nothing(thread_spool, monkeypatch):
    spool = thread_spool
    calls = []

    def failing(fd, pieces):
        calls.append(b"".join(pieces))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "_write_fd", failing)
    with pytest.raises(SpoolError) as info:
        await spool.enqueue(make_envelope(), MESSAGE)
    assert info.value.no_space
    assert len(calls) == 1 and calls[0].endswith(b"\n" + MESSAGE)  # one file: envelope line + content
    assert all_files(spool) == {}


async def test_enqueue_fsync_failure_leaves_nothing(thread_spool, monkeypatch):
    spool = thread_spool

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_mod.os, "fsync", failing_fsync)
    with pytest.raises(SpoolError) as info:
        await spool.enqueue(make_envelope(), MESSAGE)
    assert not info.value.no_space
    assert all_files(spool) == {}


async def test_enqueue_of_a_large_message(spool):
    content = (b"x" * 998 + b"\r\n") * 3000
    env = make_envelope()
    await spool.enqueue(env, content)
    assert files(spool, "incoming") == [f"{env.queue_id}.env"]
    assert await spool.load(env.queue_id, "incoming") == (env, content)


async def test_enqueue_with_a_colliding_queue_id_keeps_the_existing_message(spool):
    first = make_envelope("COLLIDE00001", rcpts=("first@example.com",))
    await spool.enqueue(first, b"first message\r\n")
    second = make_envelope("COLLIDE00001", rcpts=("second@example.com",))
    with pytest.raises(SpoolError):
        await spool.enqueue(second, b"second message\r\n")
    # The message that already got its 250 must be intact.
    env, msg = await spool.load("COLLIDE00001", "incoming")
    assert env == first
    assert msg == b"first message\r\n"


async def test_enqueue_directory_sync_failure_removes_files(spool, monkeypatch):
    # A directory fsync that fails (EIO cannot be produced on a healthy disk:
    # the result is replaced — the thread's fsync, or the ring's completion).
    def bad_fsync_dir(self):
        raise OSError(errno.EIO, "Input/output error")

    def bad_ring_fsync(self, callback):
        self.ring.loop.call_soon(callback, -errno.EIO)

    monkeypatch.setattr(spool_mod.DirSync, "_fsync", bad_fsync_dir)
    monkeypatch.setattr(spool_mod.RingDirSync, "request", bad_ring_fsync)
    with pytest.raises(SpoolError) as info:
        await spool.enqueue(make_envelope(), MESSAGE)
    assert "cannot sync queue directory incoming" in str(info.value)
    assert all_files(spool) == {}


# ---------------------------------------------------------------- one-file queue files


async def test_first_update_keeps_the_queue_file_as_content_without_copying(spool):
    env = make_envelope(rcpts=("a@x.test", "b@x.test"))
    await spool.enqueue(env, MESSAGE)
    inode = os.stat(spool.path("incoming", env.queue_id, "env")).st_ino
    env.recipients[0].status = "sent"
    await spool.update(env, "incoming")
    assert files(spool, "incoming") == [f"{env.queue_id}.env", f"{env.queue_id}.msg"]
    assert os.stat(spool.path("incoming", env.queue_id, "msg")).st_ino == inode  # a link, not a copy
    with open(spool.path("incoming", env.queue_id, "env"), "rb") as fh:
        record = fh.read()
    assert b"\n" not in record and json.loads(record)["moff"] > 0
    loaded, msg = await spool.load(env.queue_id, "incoming")
    assert loaded == env and loaded.pending == [1] and msg == MESSAGE
    env.attempts = 2  # later updates only replace the envelope
    await spool.update(env, "incoming")
    assert os.stat(spool.path("incoming", env.queue_id, "msg")).st_ino == inode
    assert await spool.load(env.queue_id, "incoming") == (env, MESSAGE)


async def test_update_with_an_envelope_built_by_hand_finds_the_content(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    for attempts in (1, 2):  # one-file layout, then two files with a content offset
        fresh = make_envelope(env.queue_id, attempts=attempts)
        assert fresh.inline is None
        await spool.update(fresh, "incoming")
        assert await spool.load(env.queue_id, "incoming") == (fresh, MESSAGE)


async def test_recover_after_a_crash_in_the_middle_of_the_first_update(spool):
    # The queue file got its ID.msg link, the envelope was not replaced yet.
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    await spool.move(env.queue_id, "incoming", "active", hint=env)
    os.link(spool.path("active", env.queue_id, "env"), spool.path("active", env.queue_id, "msg") + ".tmp")
    os.rename(spool.path("active", env.queue_id, "msg") + ".tmp", spool.path("active", env.queue_id, "msg"))
    report = spool.recover()
    # The redundant link is removed (left in active/, it outlived the message:
    # a flaky "empty queue" in test_e2e_durability).
    assert (report.requeued, report.corrupt, report.orphans_removed) == (1, [], 1)
    assert all_files(spool) == {"incoming": [f"{env.queue_id}.env"]}
    loaded, msg = await spool.load(env.queue_id, "incoming")
    assert loaded == env and msg == MESSAGE
    loaded.attempts = 1
    await spool.update(loaded, "incoming")
    assert await spool.load(env.queue_id, "incoming") == (loaded, MESSAGE)


async def test_recover_removes_a_new_queue_file_that_a_crash_cut_short(spool):
    """Queue files are written in place: one shorter than its envelope line
    says (or empty) in incoming/ was never acknowledged and is removed."""
    logs = []
    spool._log = logs.append
    cut, empty, ok = make_envelope(), make_envelope(), make_envelope()
    for env in (cut, ok):
        await spool.enqueue(env, MESSAGE)
    path = spool.path("incoming", cut.queue_id, "env")
    os.truncate(path, os.path.getsize(path) - 3)
    open(spool.path("incoming", empty.queue_id, "env"), "wb").close()
    for env in (cut, empty):
        with pytest.raises(IncompleteRecord):
            await spool.load(env.queue_id, "incoming")
    report = spool.recover()
    assert (report.incomplete_removed, report.corrupt) == (2, [])
    assert files(spool, "incoming") == [f"{ok.queue_id}.env"] and files(spool, "corrupt") == []
    assert any(cut.queue_id in line and "removed incomplete queue file" in line for line in logs)


async def test_recover_quarantines_a_truncated_file_that_was_already_acknowledged(spool):
    """In active/ a short file is damage, not an unfinished write: quarantined."""
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    await spool.move(env.queue_id, "incoming", "active")
    path = spool.path("active", env.queue_id, "env")
    os.truncate(path, os.path.getsize(path) - 3)
    report = spool.recover()
    assert report.corrupt == [env.queue_id] and report.incomplete_removed == 0
    assert files(spool, "corrupt") == [f"{env.queue_id}.env"]


async def test_a_queue_file_with_bytes_beyond_its_content_is_corrupt_not_incomplete(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    with open(spool.path("incoming", env.queue_id, "env"), "ab") as fh:
        fh.write(b"extra")
    with pytest.raises(CorruptRecord) as caught:
        await spool.load(env.queue_id, "incoming")
    assert not isinstance(caught.value, IncompleteRecord)


async def test_deferring_a_one_file_message_and_recovering_keeps_everything(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    await spool.move(env.queue_id, "incoming", "active", hint=env)
    env.attempts = 1
    await spool.move(env.queue_id, "active", "deferred", mtime=1_800_000_000.0, envelope=env)
    assert all_files(spool) == {"deferred": [f"{env.queue_id}.env", f"{env.queue_id}.msg"]}
    report = spool.recover()
    assert (report.requeued, report.repaired, report.corrupt) == (0, 0, [])
    assert await spool.load(env.queue_id, "deferred") == (env, MESSAGE)
    assert spool.scan("deferred")[0].mtime == 1_800_000_000.0
    await spool.remove(env.queue_id, "deferred", hint=env)
    assert all_files(spool) == {}


async def test_envelope_only_reads_do_not_read_a_large_content(spool, monkeypatch):
    content = b"x" * (3 << 20)
    env = make_envelope()
    await spool.enqueue(env, content, state="hold")
    reads = []
    real = os.read
    monkeypatch.setattr(spool_mod.os, "read", lambda fd, n: reads.append(n) or real(fd, n))
    loaded, mtime = spool.read_envelope(env.queue_id, "hold")
    assert loaded == env and mtime > 0
    assert sum(reads) <= 64 * 1024
    assert spool.message_state(env.queue_id) == "hold"


async def test_queue_tools_work_on_one_file_messages(spool):
    held, other = make_envelope(), make_envelope()
    await spool.enqueue(held, MESSAGE, state="hold")
    await spool.enqueue(other, MESSAGE)
    assert spool.release_message(held.queue_id, now=1_800_000_000.0)
    assert files(spool, "deferred") == [f"{held.queue_id}.env"]
    assert spool.hold_message(other.queue_id) == "incoming"
    assert files(spool, "hold") == [f"{other.queue_id}.env"]
    assert spool.requeue_message(other.queue_id) == "hold"
    [drop] = spool.scan_maildrop()
    assert spool.read_maildrop(drop, 0).content == MESSAGE
    assert spool.delete_message(held.queue_id) == "deferred"
    assert {k: v for k, v in all_files(spool).items() if k != "maildrop"} == {}


# ---------------------------------------------------------------- load


async def test_load_missing_message_raises_file_not_found(spool):
    with pytest.raises(FileNotFoundError):
        await spool.load("NOSUCHID0001", "incoming")
    with pytest.raises(FileNotFoundError):
        await spool.load_message("NOSUCHID0001", "incoming")


async def test_load_garbage_envelope_raises_corrupt_record(spool):
    qid = new_queue_id()
    with open(spool.path("incoming", qid, "env"), "wb") as fh:
        fh.write(b"{not json")
    put(spool, "incoming", None, MESSAGE, qid)
    with pytest.raises(CorruptRecord):
        await spool.load(qid, "incoming")


async def test_load_envelope_naming_another_queue_id_is_corrupt(spool):
    env = make_envelope("AAAAAAAAAAAA")
    put(spool, "incoming", env, MESSAGE, queue_id="BBBBBBBBBBBB")
    with pytest.raises(CorruptRecord):
        await spool.load("BBBBBBBBBBBB", "incoming")


async def test_load_without_message(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    loaded, msg = await spool.load(env.queue_id, "incoming", with_message=False)
    assert loaded == env and msg is None


# ---------------------------------------------------------------- update / move / remove


async def test_update_replaces_the_envelope_atomically(spool):
    env = make_envelope(rcpts=("a@x.test", "b@x.test"))
    await spool.enqueue(env, MESSAGE)
    env.recipients[0].status = "sent"
    env.recipients[0].dsn = "2.0.0"
    env.attempts = 1
    await spool.update(env, "incoming")
    loaded, msg = await spool.load(env.queue_id, "incoming")
    assert loaded == env
    assert loaded.pending == [1]
    assert msg == MESSAGE
    assert files(spool, "incoming") == [f"{env.queue_id}.env", f"{env.queue_id}.msg"]


async def test_update_overwrites_a_stale_temp_file(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    with open(spool.path("incoming", env.queue_id, "env") + ".tmp", "wb") as fh:
        fh.write(b"stale stale stale stale stale stale stale stale stale stale stale stale stale")
    env.attempts = 2
    await spool.update(env, "incoming")
    assert (await spool.load(env.queue_id, "incoming"))[0].attempts == 2
    assert files(spool, "incoming") == [f"{env.queue_id}.env", f"{env.queue_id}.msg"]


async def test_update_failure_raises_spool_error(spool):
    env = make_envelope()
    with pytest.raises(SpoolError):
        await spool.update(env, "no-such-state")


async def test_move_renames_both_files(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    await spool.move(env.queue_id, "incoming", "active")
    assert files(spool, "incoming") == []
    assert files(spool, "active") == [f"{env.queue_id}.env"]
    assert spool.locate(env.queue_id) == "active"
    loaded, msg = await spool.load(env.queue_id, "active")
    assert loaded == env and msg == MESSAGE
    # once the envelope was replaced, envelope and content are two files: both move
    env.attempts = 1
    await spool.update(env, "active")
    await spool.move(env.queue_id, "active", "deferred")
    assert files(spool, "active") == []
    assert files(spool, "deferred") == [f"{env.queue_id}.env", f"{env.queue_id}.msg"]
    assert await spool.load(env.queue_id, "deferred") == (env, MESSAGE)


async def test_move_to_deferred_sets_the_next_attempt_mtime(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    await spool.move(env.queue_id, "incoming", "active")
    due = 1_800_000_000.0
    env.attempts = 1
    env.recipients[0].reason = "connect timed out"
    await spool.move(env.queue_id, "active", "deferred", mtime=due, envelope=env)
    assert os.stat(spool.path("deferred", env.queue_id, "env")).st_mtime == due
    [entry] = spool.scan("deferred")
    assert entry.queue_id == env.queue_id and entry.state == "deferred" and entry.mtime == due
    loaded, _ = await spool.load(env.queue_id, "deferred")
    assert loaded.attempts == 1 and loaded.recipients[0].reason == "connect timed out"


async def test_move_within_the_same_state_only_updates(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE, state="deferred")
    env.attempts = 5
    await spool.move(env.queue_id, "deferred", "deferred", mtime=1_750_000_000.0, envelope=env)
    assert (await spool.load(env.queue_id, "deferred"))[0].attempts == 5
    assert spool.scan("deferred")[0].mtime == 1_750_000_000.0


async def test_move_of_a_missing_message_raises_file_not_found(spool):
    with pytest.raises(FileNotFoundError):
        await spool.move("NOSUCHID0001", "incoming", "active")


async def test_remove_deletes_both_files_and_is_idempotent(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    await spool.remove(env.queue_id, "incoming")
    assert all_files(spool) == {}
    await spool.remove(env.queue_id, "incoming")
    assert spool.locate(env.queue_id) is None


# ---------------------------------------------------------------- scan


async def test_scan_lists_envelopes_sorted_and_ignores_other_files(spool):
    envs = [make_envelope() for _ in range(5)]
    for e in reversed(envs):
        await spool.enqueue(e, MESSAGE)
    put(spool, "incoming", None, MESSAGE, new_queue_id())  # content only
    with open(os.path.join(spool.state_dir("incoming"), "x.env.tmp"), "wb"):
        pass
    entries = spool.scan("incoming")
    assert [e.queue_id for e in entries] == [e.queue_id for e in envs]
    assert all(e.state == "incoming" for e in entries)
    assert await spool.scan_async("incoming") == entries


async def test_scan_of_a_missing_or_empty_state(spool, tmp_path):
    assert spool.scan("deferred") == []
    s = Spool(str(tmp_path / "absent"))
    try:
        assert s.scan("incoming") == []
    finally:
        await s.close()


# ---------------------------------------------------------------- recovery


async def test_recover_returns_active_messages_to_incoming(spool):
    envs = [make_envelope() for _ in range(3)]
    for e in envs:
        await spool.enqueue(e, MESSAGE)
        await spool.move(e.queue_id, "incoming", "active")
    report = spool.recover()
    assert report.requeued == 3
    assert report.corrupt == []
    assert files(spool, "active") == []
    assert [e.queue_id for e in spool.scan("incoming")] == sorted(e.queue_id for e in envs)
    for e in envs:
        assert await spool.load(e.queue_id, "incoming") == (e, MESSAGE)


async def test_recover_leaves_deferred_and_hold_alone(spool):
    d, h = make_envelope(), make_envelope()
    await spool.enqueue(d, MESSAGE)
    await spool.move(d.queue_id, "incoming", "deferred", mtime=1_800_000_000.0)
    await spool.enqueue(h, MESSAGE, state="hold")
    report = spool.recover()
    assert (report.requeued, report.repaired, report.orphans_removed, report.corrupt) == (0, 0, 0, [])
    assert spool.locate(d.queue_id) == "deferred"
    assert spool.locate(h.queue_id) == "hold"
    assert spool.scan("deferred")[0].mtime == 1_800_000_000.0


async def test_recover_removes_temp_files(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE)
    for state in ("incoming", "deferred"):
        with open(os.path.join(spool.state_dir(state), f"{new_queue_id()}.env.tmp"), "wb") as fh:
            fh.write(b"half")
    report = spool.recover()
    assert report.temp_removed == 2
    assert files(spool, "incoming") == [f"{env.queue_id}.env"]
    assert files(spool, "deferred") == []


async def test_recover_removes_content_without_envelope(spool):
    keep = make_envelope()
    await spool.enqueue(keep, MESSAGE)
    orphan = put(spool, "incoming", None, b"unfinished\r\n")
    orphan2 = put(spool, "active", None, b"unfinished too\r\n")
    report = spool.recover()
    assert report.orphans_removed == 2
    assert report.corrupt == []
    assert files(spool, "incoming") == [f"{keep.queue_id}.env"]
    assert spool.locate(orphan) is None and spool.locate(orphan2) is None
    assert all_files(spool) == {"incoming": [f"{keep.queue_id}.env"]}


async def test_recover_repairs_envelope_in_deferred_with_content_left_in_active(spool):
    env = make_envelope()
    put(spool, "deferred", env, None)
    put(spool, "active", None, MESSAGE, env.queue_id)
    report = spool.recover()
    assert report.repaired == 1
    assert report.corrupt == [] and report.orphans_removed == 0
    assert files(spool, "active") == []
    assert files(spool, "deferred") == [f"{env.queue_id}.env", f"{env.queue_id}.msg"]
    assert await spool.load(env.queue_id, "deferred") == (env, MESSAGE)


async def test_recover_repairs_move_interrupted_after_the_content_rename(spool):
    # move() renames the content first: a crash between the renames leaves
    # the envelope in the old state (active) and the content in the new one.
    env = make_envelope()
    put(spool, "active", env, None)
    put(spool, "deferred", None, MESSAGE, env.queue_id)
    report = spool.recover()
    assert report.repaired == 1
    assert report.requeued == 1
    assert all_files(spool) == {"incoming": [f"{env.queue_id}.env", f"{env.queue_id}.msg"]}
    assert await spool.load(env.queue_id, "incoming") == (env, MESSAGE)


async def test_recover_removes_a_stale_second_copy_of_the_content(spool):
    env = make_envelope()
    put(spool, "deferred", env, MESSAGE)
    put(spool, "incoming", None, b"stale copy\r\n", env.queue_id)
    report = spool.recover()
    assert report.corrupt == []
    assert all_files(spool) == {"deferred": [f"{env.queue_id}.env", f"{env.queue_id}.msg"]}
    assert await spool.load_message(env.queue_id, "deferred") == MESSAGE


async def test_recover_quarantines_unparseable_envelope_and_keeps_the_rest(spool):
    logs = []
    spool._log = logs.append
    good = [make_envelope() for _ in range(3)]
    for e in good:
        await spool.enqueue(e, MESSAGE)
    bad = new_queue_id()
    with open(spool.path("incoming", bad, "env"), "wb") as fh:
        fh.write(b"\x00\x01 this is not an envelope")
    put(spool, "incoming", None, b"bad message\r\n", bad)
    report = spool.recover()
    assert report.corrupt == [bad]
    assert files(spool, "corrupt") == [f"{bad}.env", f"{bad}.msg"]
    with open(spool.path("corrupt", bad, "msg"), "rb") as fh:
        assert fh.read() == b"bad message\r\n"
    assert [e.queue_id for e in spool.scan("incoming")] == sorted(e.queue_id for e in good)
    for e in good:
        assert await spool.load(e.queue_id, "incoming") == (e, MESSAGE)
    assert any(bad in line and "corrupt" in line for line in logs)


async def test_recover_quarantines_unparseable_envelope_in_active(spool):
    bad = new_queue_id()
    with open(spool.path("active", bad, "env"), "wb") as fh:
        fh.write(b"[]")
    put(spool, "active", None, MESSAGE, bad)
    report = spool.recover()
    assert report.corrupt == [bad] and report.requeued == 0
    assert all_files(spool) == {"corrupt": [f"{bad}.env", f"{bad}.msg"]}


async def test_recover_quarantines_envelope_without_content(spool):
    ok = make_envelope()
    await spool.enqueue(ok, MESSAGE)
    lonely = make_envelope()
    put(spool, "active", lonely, None)
    report = spool.recover()
    assert report.corrupt == [lonely.queue_id]
    assert files(spool, "corrupt") == [f"{lonely.queue_id}.env"]
    assert files(spool, "active") == [] and files(spool, "incoming") == [f"{ok.queue_id}.env"]
    assert spool.locate(ok.queue_id) == "incoming"


async def test_recover_lists_deferred_and_hold_without_reading_them(spool):
    """Start-up does not read the deferred queue (its size must not set the
    start-up time): a broken deferred or held file is found when it is next
    read, as a CorruptRecord the queue manager quarantines."""
    lonely, garbage = make_envelope(), new_queue_id()
    put(spool, "deferred", lonely, None)
    with open(spool.path("hold", garbage, "env"), "wb") as fh:
        fh.write(b"\x00 not an envelope")
    report = spool.recover()
    assert report.corrupt == []
    assert files(spool, "deferred") == [f"{lonely.queue_id}.env"]
    assert files(spool, "hold") == [f"{garbage}.env"]
    with pytest.raises(CorruptRecord, match="content is missing"):
        await spool.load(lonely.queue_id, "deferred")
    with pytest.raises(CorruptRecord):
        await spool.load(garbage, "hold")


async def test_recover_quarantines_envelope_naming_another_id(spool):
    env = make_envelope("AAAAAAAAAAAA")
    put(spool, "incoming", env, MESSAGE, queue_id="CCCCCCCCCCCC")
    report = spool.recover()
    assert report.corrupt == ["CCCCCCCCCCCC"]
    assert files(spool, "corrupt") == ["CCCCCCCCCCCC.env", "CCCCCCCCCCCC.msg"]


async def test_recover_duplicate_envelope_keeps_one_copy(spool):
    env = make_envelope()
    put(spool, "incoming", env, MESSAGE)
    put(spool, "deferred", env, None)
    report = spool.recover()
    assert len(report.corrupt) == 1
    assert spool.locate(env.queue_id) is not None
    state = spool.locate(env.queue_id)
    assert await spool.load(env.queue_id, state) == (env, MESSAGE)
    assert len(files(spool, "corrupt")) == 1


async def test_recover_on_a_clean_queue_reports_nothing(spool):
    report = spool.recover()
    assert (report.requeued, report.temp_removed, report.orphans_removed, report.repaired, report.corrupt) == (
        0, 0, 0, 0, [])


async def test_recover_is_idempotent(spool):
    env = make_envelope()
    put(spool, "active", env, MESSAGE)
    spool.recover()
    report = spool.recover()
    assert report.requeued == 0
    assert spool.locate(env.queue_id) == "incoming"


async def test_quarantine_async_moves_a_message_to_corrupt(spool):
    env = make_envelope()
    await spool.enqueue(env, MESSAGE, state="deferred")
    await spool.quarantine_async(env.queue_id, "deferred", "test")
    assert all_files(spool) == {"corrupt": [f"{env.queue_id}.env"]}
    env2 = make_envelope()
    await spool.enqueue(env2, MESSAGE, state="deferred")
    await spool.update(env2, "deferred")
    await spool.quarantine_async(env2.queue_id, "deferred", "test")
    assert files(spool, "corrupt") == sorted([f"{env.queue_id}.env", f"{env2.queue_id}.env", f"{env2.queue_id}.msg"])


async def test_free_bytes_is_positive(spool):
    assert spool.free_bytes() > 0
    assert await spool.free_bytes_async() > 0


def test_queue_states_are_postfix_directory_names():
    assert STATES == ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
    assert set(QUEUE_STATES) <= set(STATES)
