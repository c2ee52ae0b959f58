"""The control socket: how the command line talks to a running server
(Postfix: master's signals, and the public/ sockets of showq, flush, pickup).

A Unix-domain stream socket at ``control_socket`` (default
``$queue_directory/public/control``, mode 0660: the server's user and
group).  One request and one response per connection, each a single line
of JSON::

    -> {"op": "status"}
    <- {"ok": true, "pid": 4242, ...}
    -> {"op": "hold", "ids": ["08DmasW29IBE"]}
    <- {"ok": true, "done": ["08DmasW29IBE"], "pending": [], "missing": []}
    -> {"op": "reload"}
    <- {"ok": false, "error": "config.toml: unknown parameter 'mynetwork'"}

Requests: ``status``, ``reload``, ``stop``, ``pickup`` (nudge), ``flush``
(``ids``, ``domain``), ``delete``/``hold``/``release``/``requeue`` (``ids``
or ``"ALL"``, optional ``queues``).  The server side only parses and
dispatches; what a request does is :class:`~mailserver.server.MailServer`'s.

Unix socket paths are limited to ~107 bytes; a longer ``control_socket``
(deep temporary directories) is reached through ``/proc/self/fd/N/NAME``
on Linux.

Failures: :class:`NotRunning` when nobody listens (no socket file, or a
stale one), :class:`ControlError` for a refused request (the server's
one-line reason) or a broken exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
from typing import Awaitable, Callable, Iterator

MAX_MESSAGE = 1 << 20
REQUEST_TIMEOUT = 10.0
_SUN_PATH_MAX = 100


class ControlError(Exception):
    """The server refused a request or the exchange broke."""


class NotRunning(Exception):
    """No server is listening on the control socket."""


@contextlib.contextmanager
def _bindable(path: str) -> Iterator[str]:
    """A name for ``path`` short enough for sockaddr_un."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


Handler = Callable[[dict], Awaitable[dict]]


class ControlServer:
    """The listening side, inside the server's event loop."""

    def __init__(self, path: str, handler: Handler, *, log: Callable[[str], None] = lambda text: None):
        self.path = path
        self.handler = handler
        self.log = log
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # stale socket from a crash; the pid file lock says we are alone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _bindable(self.path) as name:
                sock.bind(name)
            os.chmod(self.path, 0o660)
            sock.listen(64)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_MESSAGE)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=REQUEST_TIMEOUT)
                request = json.loads(line.decode("utf-8"))
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise ValueError("request must be a JSON object with 'op'")
            except (ValueError, UnicodeError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
                response = {"ok": False, "error": f"bad request: {exc}"}
            else:
                try:
                    response = await self.handler(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never let one request take the server down
                    self.log(f"warning: control request {request.get('op')!r} failed: {exc!r}")
                    response = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
            writer.write(json.dumps(response, default=str).encode("utf-8") + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


def request(path: str, op: str, *, timeout: float = 60.0, **args) -> dict:
    """Send one request (blocking, for the command line).  Returns the
    response when ``ok``; raises :class:`NotRunning` or :class:`ControlError`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            with _bindable(path) as name:
                sock.connect(name)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no server is listening on {path}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise NotRunning(f"no server is listening on {path}") from None
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode("utf-8") + b"\n")
            chunks = []
            total = 0
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > MAX_MESSAGE * 16:
                    raise ControlError("response too large")
        except socket.timeout:
            raise ControlError(f"no answer from the server within {timeout:g}s") from None
        except OSError as exc:
            raise ControlError(f"control socket: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        response = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeError):
        raise ControlError("malformed response from the server") from None
    if not isinstance(response, dict):
        raise ControlError("malformed response from the server")
    if not response.get("ok"):
        raise ControlError(str(response.get("error") or "request refused"))
    return response
