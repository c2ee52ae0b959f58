"""Queue tools (Postfix: postqueue, postsuper, postcat, qshape) over the spool.

Reading (``list``/mailq, ``show``/postcat, ``summary``/qshape) works on the
queue files directly, like Postfix's showq: envelope files are replaced
atomically, so a reader sees either the old or the new record; a message
that moves while the queue is listed may be missed or shown twice, as with
Postfix.

Changing (``delete``/``hold``/``release``/``requeue``, ``flush``) goes
through :func:`operate`: to the running server over the control socket
when one answers — its queue manager applies the change, deferring it for
a message in flight until the attempt is over — and otherwise directly on
the spool while holding the ``pid_file`` lock, so that no server can start
in the middle (a server that finds the lock taken waits a moment).

The formatting functions are pure: they take the collected
:class:`QueueMessage` values and ``now``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import control
from .config import Config
from .spool import MAILDROP_SUFFIX, CorruptRecord, Envelope, IncompleteRecord, Spool, SpoolError

LIST_ORDER = ("maildrop", "active", "incoming", "deferred", "hold")  # Postfix showq scan order
QSHAPE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
EMPTY_ADDRESS = "MAILER-DAEMON"  # Postfix empty_address_recipient, as showq prints <>
OPERATIONS = ("delete", "hold", "release", "requeue")
DEFAULT_STATES = {
    "delete": ("hold", "incoming", "active", "deferred"),
    "hold": ("incoming", "active", "deferred"),
    "release": ("hold",),
    "requeue": ("hold", "incoming", "active", "deferred"),
}
DONE_TEXT = {"delete": "removed", "hold": "placed on hold", "release": "released from hold", "requeue": "requeued"}
SUMMARY_TEXT = {"delete": "Deleted", "hold": "Placed on hold", "release": "Released from hold",
                "requeue": "Requeued"}


class QueueToolError(Exception):
    """A queue operation could not be done (one line for the user)."""


@dataclass
class QueueMessage:
    queue_id: str
    state: str
    arrival: float
    size: int
    sender: str
    recipients: list[tuple[str, str]] = field(default_factory=list)  # pending (address, last reason)
    envelope: Envelope | None = None


# ---------------------------------------------------------------- collecting
def collect(spool: Spool, states: Iterable[str] = LIST_ORDER,
            warn: Callable[[str], None] | None = None) -> list[QueueMessage]:
    """Every message in ``states`` (blocking).  A queue file that cannot be
    parsed is left out of the list and reported through ``warn`` (the
    server quarantines it when it next reads it; held mail is read only
    here)."""
    out = []
    for state in states:
        if state == "maildrop":
            for name in spool.scan_maildrop():
                try:
                    record = spool.read_maildrop(name, 0)
                    st = os.stat(os.path.join(spool.state_dir("maildrop"), name))
                except (FileNotFoundError, CorruptRecord, PermissionError):
                    continue
                out.append(QueueMessage(name[:-len(MAILDROP_SUFFIX)], state, record.arrival or st.st_mtime,
                                        len(record.content), record.sender,
                                        [(address, "") for address, _ in record.recipients]))
            continue
        for entry in spool.scan(state):
            try:
                env, _mtime = spool.read_envelope(entry.queue_id, state)
            except (FileNotFoundError, IncompleteRecord):  # gone, or still being written
                continue
            except (CorruptRecord, SpoolError) as exc:
                if warn is not None:
                    warn(f"{entry.queue_id}: {state}: corrupt or unreadable queue file: {exc}")
                continue
            pending = [r for r in env.recipients if not r.done]
            # Postfix lists recipients with a deferral reason (defer log) first.
            ordered = [r for r in pending if r.reason] + [r for r in pending if not r.reason]
            out.append(QueueMessage(env.queue_id, state, env.arrival_time, env.size, env.sender,
                                    [(r.address, r.reason) for r in ordered], env))
    return out


# ---------------------------------------------------------------- mailq
_L_STRING = "{:<17} {:>8} {:<19} {}\n"
_L_HEADINGS = ("----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")


def format_mailq(messages: list[QueueMessage]) -> str:
    """Postfix's mailq output (showq_compat.c, long queue IDs)."""
    if not messages:
        return "Mail queue is empty\n"
    out = [_L_STRING.format(*_L_HEADINGS)]
    total = 0
    for n, msg in enumerate(messages):
        if n:
            out.append("\n")
        marker = "*" if msg.state == "active" else "!" if msg.state == "hold" else ""
        arrival = time.asctime(time.localtime(msg.arrival))[:19]
        out.append(f"{msg.queue_id + marker:<17} {msg.size:>8} {arrival:>19.19} {msg.sender or EMPTY_ADDRESS}\n")
        saved = ""
        for address, reason in msg.recipients:
            if reason != saved:
                saved = reason
                shown = reason or "reason unavailable"
                out.append(" " * max(0, 76 - len(shown)) + f"({shown})\n")
            out.append(_L_STRING.format("", "", "", address))
        total += msg.size
    count = len(messages)
    out.append(f"\n-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.\n")
    return "".join(out)


def format_json(messages: list[QueueMessage]) -> str:
    """``postqueue -j``: one JSON object per message and line."""
    lines = []
    for msg in messages:
        rcpts = []
        for address, reason in msg.recipients:
            item = {"address": address}
            if reason:
                item["delay_reason"] = reason
            rcpts.append(item)
        lines.append(json.dumps({"queue_name": msg.state, "queue_id": msg.queue_id, "arrival_time": int(msg.arrival),
                                 "message_size": msg.size, "force_expired": False,
                                 "sender": msg.sender or EMPTY_ADDRESS, "recipients": rcpts}, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- postcat
def format_postcat(spool: Spool, queue_id: str, *, envelope: bool = True, header: bool = True,
                   body: bool = True) -> str:
    """``postcat -q ID``: the envelope records and the message (blocking).
    Raises QueueToolError when there is no such message."""
    state = spool.message_state(queue_id, ("incoming", "active", "deferred", "hold", "maildrop", "corrupt"))
    if state is None:
        raise QueueToolError(f"{queue_id}: no such message in the queue")
    where = f"{state}/{queue_id}"
    out: list[str] = []
    if state == "maildrop":
        try:
            record = spool.read_maildrop(queue_id + MAILDROP_SUFFIX, 0)
        except (CorruptRecord, FileNotFoundError) as exc:
            raise QueueToolError(f"{queue_id}: {exc}") from None
        content = record.content
        if envelope:
            out.append(f"*** ENVELOPE RECORDS {where} ***\n")
            out.append(f"message_size: {len(content)}\n")
            out.append(f"submitted_by_uid: {record.uid}\n")
            out.append(f"sender: {record.sender}\n")
            for address, original in record.recipients:
                if original and original != address:
                    out.append(f"original_recipient: {original}\n")
                out.append(f"recipient: {address}\n")
    else:
        try:
            env, mtime = spool.read_envelope(queue_id, state)
            content = spool._load(queue_id, state, True)[1] or b""
        except (CorruptRecord, FileNotFoundError, SpoolError) as exc:
            raise QueueToolError(f"{queue_id}: {exc}") from None
        if envelope:
            out.append(f"*** ENVELOPE RECORDS {where} ***\n")
            out.append(f"message_size: {env.size}\n")
            out.append(f"message_arrival_time: {time.asctime(time.localtime(env.arrival_time))}\n")
            if state == "deferred":
                out.append(f"next_attempt_time: {time.asctime(time.localtime(mtime))}\n")
            out.append(f"delivery_attempts: {env.attempts}\n")
            out.append(f"client: {env.client}\n")
            out.append(f"origin: {env.origin}\n")
            if env.smtputf8:
                out.append("smtputf8: yes\n")
            out.append(f"sender: {env.sender}\n")
            for r in env.recipients:
                if r.original and r.original != r.address:
                    out.append(f"original_recipient: {r.original}\n")
                out.append(f"{'done_recipient' if r.done else 'recipient'}: {r.address}\n")
                if r.dsn or r.reason:
                    out.append(f"  status={r.status}, dsn={r.dsn}, relay={r.relay or 'none'}, reason=({r.reason})\n")
    text = content.decode("utf-8", "backslashreplace").replace("\r\n", "\n")
    head, sep, rest = text.partition("\n\n")
    if header or body:
        out.append(f"*** MESSAGE CONTENTS {where} ***\n")
        if header:
            out.append(head + ("\n" if sep else ""))
        if header and body and sep:
            out.append("\n")
        if body and sep:
            out.append(rest)
            if rest and not rest.endswith("\n"):
                out.append("\n")
    out.append(f"*** MESSAGE FILE END {where} ***\n")
    return "".join(out)


# ---------------------------------------------------------------- qshape
def qshape(messages: list[QueueMessage], now: float, *, by_sender: bool = False,
           buckets: tuple[int, ...] = QSHAPE_BUCKETS, top: int | None = None) -> str:
    """The qshape table: domains × age buckets (minutes).  Recipient
    domains count recipients; sender domains (``by_sender``) count messages."""
    labels = [str(b) for b in buckets] + [f"{buckets[-1]}+"]
    rows: dict[str, list[int]] = {}
    total = [0] * (len(labels) + 1)

    def bucket(arrival: float) -> int:
        minutes = (now - arrival) / 60.0
        for i, limit in enumerate(buckets):
            if minutes < limit:
                return i
        return len(buckets)

    for msg in messages:
        col = bucket(msg.arrival)
        if by_sender:
            keys = [(msg.sender.rpartition("@")[2].lower() if msg.sender else EMPTY_ADDRESS)]
        else:
            keys = [address.rpartition("@")[2].lower() or "localhost" for address, _ in msg.recipients]
        for key in keys:
            row = rows.setdefault(key, [0] * (len(labels) + 1))
            row[0] += 1
            row[col + 1] += 1
            total[0] += 1
            total[col + 1] += 1
    ordered = sorted(rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
    if top is not None:
        ordered = ordered[:top]
    headers = ["T"] + labels
    widths = [max(len(h), len(str(total[i])), *(len(str(r[i])) for _, r in ordered)) for i, h in enumerate(headers)]
    name_width = max([len("TOTAL")] + [len(name) for name, _ in ordered]) + 1
    lines = [" " * name_width + " " + " ".join(h.rjust(w) for h, w in zip(headers, widths))]
    for name, row in [("TOTAL", total)] + ordered:
        lines.append(name.rjust(name_width) + " " + " ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the running server, or the spool
def read_ids(stream) -> list[str]:
    """Queue IDs for ``-`` (postsuper): one per line; mailq's ``*``/``!``
    markers are dropped."""
    ids = []
    for line in stream:
        text = line.strip().rstrip("*!#")
        if text:
            ids.append(text)
    return ids


@contextlib.contextmanager
def queue_lock(config: Config) -> Iterator[None]:
    """Hold the server's pid-file lock: no server runs, none starts meanwhile.
    Raises QueueToolError when a server holds it."""
    path = config.pid_file
    created = not os.path.exists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except FileNotFoundError:  # no pid directory: no server ever ran on this queue
        yield
        return
    except PermissionError:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            yield
            return
        except OSError as exc:
            raise QueueToolError(f"cannot open {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise QueueToolError(f"the mail system is running (pid {pid or 'unknown'}) but its control socket "
                                 f"{config.control_socket} does not answer") from None
        try:
            yield
        finally:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    finally:
        os.close(fd)


def server_pid(config: Config) -> int | None:
    """The pid of the server running on this queue, or None (lock probe)."""
    try:
        fd = os.open(config.pid_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def request_server(config: Config, op: str, **args) -> dict | None:
    """Send a request to the running server; None when none is running."""
    try:
        return control.request(config.control_socket, op, **args)
    except control.NotRunning:
        return None
    except control.ControlError as exc:
        raise QueueToolError(str(exc)) from None


def operate(config: Config, op: str, ids: list[str] | None, queues: tuple[str, ...] | None = None,
            *, log=None) -> dict:
    """postsuper -d/-h/-H/-r: through the running server, else directly.
    ``ids`` None means ALL.  Returns {"done", "pending", "missing", "via"}."""
    args: dict = {"ids": "ALL" if ids is None else ids}
    if queues:
        args["queues"] = list(queues)
    for _attempt in range(3):
        response = request_server(config, op, **args)
        if response is not None:
            return {"done": response.get("done", []), "pending": response.get("pending", []),
                    "missing": response.get("missing", []), "via": "server"}
        try:
            with queue_lock(config):
                result = operate_directly(Spool(config.queue_directory), op, ids, queues, log=log)
                result["via"] = "spool"
                return result
        except QueueToolError:
            time.sleep(0.2)  # a server is starting: ask it instead
    raise QueueToolError(f"the mail system is running but its control socket {config.control_socket} "
                         f"does not answer")


def operate_directly(spool: Spool, op: str, ids: list[str] | None, queues: tuple[str, ...] | None = None,
                     *, log=None) -> dict:
    """The same operations on a queue no server is working on."""
    states = tuple(queues or DEFAULT_STATES[op])
    if op == "release":
        states = tuple(s for s in states if s == "hold")
    if ids is None:
        found: list[str] = []
        for state in states:
            if state == "maildrop":
                found += [name[:-len(MAILDROP_SUFFIX)] for name in spool.scan_maildrop()]
            else:
                found += [entry.queue_id for entry in spool.scan(state)]
        ids = list(dict.fromkeys(found))
    done, missing = [], []
    for qid in ids:
        try:
            if op == "delete":
                ok = spool.delete_message(qid, states) is not None
            elif op == "hold":
                ok = spool.hold_message(qid, states) is not None
            elif op == "release":
                ok = spool.release_message(qid)
            else:
                ok = spool.requeue_message(qid, states) is not None
        except (CorruptRecord, SpoolError, OSError) as exc:
            if log:
                log(f"warning: {qid}: cannot {op}: {exc}")
            ok = False
        if ok:
            done.append(qid)
            if log:
                log(f"{qid}: {DONE_TEXT[op]}")
        else:
            missing.append(qid)
    return {"done": done, "pending": [], "missing": missing}
