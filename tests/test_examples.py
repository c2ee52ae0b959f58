"""Every file in examples/ is exercised for real: each example's ``main()``
runs against a temporary directory on loopback, each script's demo runs as
``python examples/X.py``, and the standalone production configuration is
loaded as shipped, validated like ``mailserver check`` and started with its
three TLS/AUTH listeners moved to loopback ports."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trustme

from harness import maildir_messages, smtp_dialog
from mailserver import Config, MailServer, PolicyRequest, StartupError, TransportEnvelope
from mailserver.cli import check_config
from mailserver.config import PARAMETERS, SERVICE_KEYS
from mailserver.delivery import Delivered, PermanentFailure, TemporaryFailure
from mailserver.sasl import set_password

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
STANDALONE = EXAMPLES / "standalone" / "config.toml"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


embedded_app = load_example("embedded_app")
custom_transport = load_example("custom_transport")
policy_hook = load_example("policy_hook")


smtp_exchange = smtp_dialog  # raw SMTP: greeting, then one reply per chunk (tests/harness.py)


# ---------------------------------------------------------------- the scripts' own demos
@pytest.mark.parametrize("script, expected", [
    ("embedded_app.py", "4 of 4 deliveries done"),
    ("custom_transport.py", "subject='Undelivered Mail Returned to Sender'"),
    ("policy_hook.py", "attempt 2: 250 2.0.0 Ok: queued as "),
])
def test_example_script_runs_as_a_program(script, expected, tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout, done.stdout + done.stderr
    assert "daemon started" in done.stderr  # the demos log to stderr


# ---------------------------------------------------------------- embedded_app.py
async def test_embedded_app_submits_mail_from_code_and_sees_every_delivery(tmp_path):
    out = io.StringIO()
    outcomes = await embedded_app.main(tmp_path, out=out, timeout=20)
    assert len(outcomes) == 4  # one welcome mail each + one report to both
    assert {event.kind for event in outcomes.values()} == {"delivered"}
    assert {event.status for event in outcomes.values()} == {"2.0.0"}
    assert sorted(event.recipient for event in outcomes.values()) == \
        ["alice@example.test", "alice@example.test", "bob@example.test", "bob@example.test"]
    for box, name in (("alice", "Alice"), ("bob", "Bob")):
        messages = maildir_messages(tmp_path / "vmail" / box)
        assert len(messages) == 2
        assert any(f"Subject: Welcome, {name}".encode() in m for m in messages)
        assert any(b"Subject: nightly report" in m for m in messages)
    assert "event: delivered" in out.getvalue()  # the callback listener ran too


# ---------------------------------------------------------------- custom_transport.py
async def test_sqlite_transport_is_retried_after_the_database_was_locked_and_bounces_refused_recipients(tmp_path):
    result = await custom_transport.main(tmp_path, out=io.StringIO(), timeout=20)
    qid = result["queue_id"]
    alice = [e for e in result["events"] if e.queue_id == qid and e.recipient == "alice@example.test"]
    # First attempt: the database is locked → temporary failure; the retry stores it.
    assert [e.kind for e in alice] == ["deferred", "delivered"]
    assert alice[0].status == "4.3.0" and "database is locked" in alice[0].text
    assert alice[0].relay == "python:sqlite"
    nobody = [e for e in result["events"] if e.queue_id == qid and e.recipient == "nobody@example.test"]
    assert [e.kind for e in nobody] == ["deferred", "bounced"]
    assert nobody[1].status == "5.1.1"
    # The database: the message for alice, and the DSN for the refused recipient.
    rows = {(row[1], row[2]): row for row in result["rows"]}
    assert rows[("alice@example.test", "shop@example.test")][0] == qid
    assert rows[("alice@example.test", "shop@example.test")][3] == "Your order"
    assert rows[("shop@example.test", "")][3] == "Undelivered Mail Returned to Sender"
    assert len(rows) == 2


async def test_sqlite_store_classifies_failures_and_is_idempotent(tmp_path):
    envelope = TransportEnvelope("08DmTESTQUEUE", "a@example.test", 0.0, "example.test", False,
                                 ("b@example.test",))
    message = b"Subject: once\r\n\r\nbody\r\n"

    missing = custom_transport.SQLiteMailStore(tmp_path / "no" / "such" / "dir" / "mail.sqlite")
    outcomes = await missing(envelope, message, ["b@example.test", "c@example.test"])
    assert [type(o) for o in outcomes] == [TemporaryFailure, TemporaryFailure]
    assert outcomes[0].status.startswith("4.") and "unable to open database" in outcomes[0].text

    store = custom_transport.SQLiteMailStore(tmp_path / "mail.sqlite", rejected=["nobody@example.test"])
    await asyncio.to_thread(store.create_schema)
    first = await store(envelope, message, ["b@example.test", "nobody@example.test"])
    assert [type(o) for o in first] == [Delivered, PermanentFailure]
    assert first[1].status == "5.1.1"
    again = await store(envelope, message, ["b@example.test"])  # at-least-once: a repeated delivery
    assert [type(o) for o in again] == [Delivered]
    with sqlite3.connect(tmp_path / "mail.sqlite") as db:
        assert db.execute("SELECT queue_id, recipient, subject FROM messages").fetchall() == \
            [("08DmTESTQUEUE", "b@example.test", "once")]
    db.close()


# ---------------------------------------------------------------- policy_hook.py
async def test_greylisting_hook_defers_the_first_attempt_and_accepts_the_retry_over_smtp(tmp_path):
    clock = policy_hook.ManualClock()
    greylist = policy_hook.Greylist(delay=300, clock=clock)
    config = policy_hook.make_config(tmp_path)
    assert config.smtpd_policy_hooks == ("greylist",)
    async with MailServer(config, policy_hooks={"greylist": greylist}, log_stream=None) as server:
        host, port = server.addresses()[0][:2]
        events = server.events()

        def send() -> dict:
            with smtplib.SMTP(host, port, timeout=10) as client:
                return client.sendmail("news@sender.example", ["alice@example.test"],
                                       b"Subject: greylisted\r\n\r\nhello\r\n")

        with pytest.raises(smtplib.SMTPRecipientsRefused) as first:
            await asyncio.to_thread(send)
        code, text = first.value.recipients["alice@example.test"]
        assert (code, text) == (450, b"4.7.1 <alice@example.test>: Recipient address rejected: "
                                     b"Greylisted, try again later")

        clock.advance(60)  # too early: still greylisted
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await asyncio.to_thread(send)

        clock.advance(300)  # a retry after the delay passes
        assert await asyncio.to_thread(send) == {}

        # Another sender is a new triplet: greylisted again.
        replies = await asyncio.to_thread(smtp_exchange, host, port, [
            b"EHLO client.example\r\n", b"MAIL FROM:<other@sender.example>\r\n", b"RCPT TO:<alice@example.test>\r\n",
            b"QUIT\r\n"])
        assert replies[3].startswith("450 4.7.1 ")

        async with asyncio.timeout(10):
            async for event in events:
                if event.kind == "delivered":
                    break
        events.close()
    assert len(maildir_messages(tmp_path / "vmail" / "alice")) == 1


async def test_greylist_decisions_as_pure_calls():
    clock = policy_hook.ManualClock()
    greylist = policy_hook.Greylist(delay=300, retry_window=3600, clock=clock)

    def request(**kwargs) -> PolicyRequest:
        fields = dict(client_addr="192.0.2.10", stage="rcpt", sender="a@example.net", recipient="b@example.test")
        fields.update(kwargs)
        return PolicyRequest(**fields)

    assert await greylist(request()) == policy_hook.GREYLIST_ACTION
    clock.advance(301)
    assert await greylist(request()) == "DUNNO"
    # Same /24, same addresses: the sender's other outgoing server is let through too.
    assert await greylist(request(client_addr="192.0.2.99")) == "DUNNO"
    assert await greylist(request(client_addr="198.51.100.1")) == policy_hook.GREYLIST_ACTION
    # Other stages and authenticated clients are never greylisted.
    assert await greylist(request(stage="mail", recipient=None, client_addr="203.0.113.1")) == "DUNNO"
    assert await greylist(request(sasl_username="alice", client_addr="203.0.113.1")) == "DUNNO"
    # After retry_window the triplet is forgotten: greylisted again.
    clock.advance(3601)
    assert await greylist(request()) == policy_hook.GREYLIST_ACTION


async def test_policy_hook_example_main_shows_a_deferral_then_acceptance(tmp_path):
    replies = await policy_hook.main(tmp_path, out=io.StringIO())
    assert replies[0] == "450 4.7.1 <alice@example.test>: Recipient address rejected: Greylisted, try again later"
    assert replies[1].startswith("250 2.0.0 Ok: queued as ")


# ---------------------------------------------------------------- standalone/config.toml
def test_standalone_config_loads_as_shipped_with_only_known_parameters():
    with open(STANDALONE, "rb") as fh:
        raw = tomllib.load(fh)
    services = raw.pop("services")
    assert sorted(set(raw) - set(PARAMETERS)) == []
    for table in services.values():
        assert set(table) <= SERVICE_KEYS | set(PARAMETERS)

    config = Config.from_file(STANDALONE)  # adjusting nothing
    by_name = {svc.name: svc for svc in config.services}
    assert {name: (svc.tls, svc.auth) for name, svc in by_name.items()} == {
        "smtp": ("may", "none"), "submission": ("required", "required"), "smtps": ("implicit", "required")}
    assert {name: sorted({port for _, port in svc.endpoints()}) for name, svc in by_name.items()} == {
        "smtp": [25], "submission": [587], "smtps": [465]}
    assert config.smtpd_tls_cert_file and config.smtpd_tls_key_file
    assert config.smtpd_sasl_password_maps.startswith("passwd-file:")
    assert config.virtual_mailbox_domains and config.virtual_mailbox_maps and config.virtual_mailbox_base
    assert "reject_unauth_destination" in config.smtpd_relay_restrictions
    assert by_name["submission"].overrides["smtpd_relay_restrictions"] == ("permit_sasl_authenticated", "reject")
    assert config.stop_timeout < 10
    assert "DKIM" in STANDALONE.read_text()


def _standalone_with_local_paths(root: Path, pki: Path | None) -> Config:
    """The shipped file, with only its paths pointed into ``root`` (as
    MAILSERVER_<PARAM> variables would in a container)."""
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    for name in ("aliases", "vmailbox", "virtual", "sender_logins"):
        (etc / name).write_text("")
    (etc / "vmailbox").write_text("alice@example.org example.org/alice/\n")
    (etc / "sender_logins").write_text("alice@example.org alice\n")
    set_password(str(etc / "passwd"), "alice", "correct horse")
    overrides = dict(
        queue_directory=str(root / "spool"), mail_spool_directory=str(root / "mail"),
        virtual_mailbox_base=str(root / "vhosts"), alias_maps=f"hash:{etc / 'aliases'}",
        virtual_mailbox_maps=f"hash:{etc / 'vmailbox'}", virtual_alias_maps=f"hash:{etc / 'virtual'}",
        smtpd_sender_login_maps=f"hash:{etc / 'sender_logins'}",
        smtpd_sasl_password_maps=f"passwd-file:{etc / 'passwd'}",
        dns_nameservers="127.0.0.1:1", dns_timeout="1s",
    )
    if pki is not None:
        overrides.update(smtpd_tls_cert_file=str(pki / "fullchain.pem"), smtpd_tls_key_file=str(pki / "privkey.pem"))
    return Config.from_file(STANDALONE, **overrides)


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("mail.example.org", "127.0.0.1")
    directory = tmp_path / "tls"
    directory.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(directory / "fullchain.pem"))
    cert.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return directory


def test_standalone_config_check_fails_only_on_the_missing_certificate(tmp_path, pki):
    problems = check_config(_standalone_with_local_paths(tmp_path, None), warnings=[])
    assert problems == [f"service {name}: smtpd_tls_cert_file: cannot read /etc/mailserver/tls/fullchain.pem: "
                        f"No such file or directory" for name in ("smtp", "smtps", "submission")]
    assert check_config(_standalone_with_local_paths(tmp_path, pki), warnings=[]) == []


async def test_standalone_config_runs_its_three_listeners_with_tls_and_auth(tmp_path, pki):
    config = _standalone_with_local_paths(tmp_path, pki)
    # Only the listen addresses move to loopback; TLS/AUTH modes and overrides stay.
    services = {svc.name: {"listen": ["127.0.0.1:0"], "tls": svc.tls, "auth": svc.auth, **dict(svc.overrides)}
                for svc in config.services}
    config = config.replace(services=services)

    no_cert = config.replace(smtpd_tls_cert_file=str(tmp_path / "missing.pem"),
                             smtpd_tls_key_file=str(tmp_path / "missing.pem"))
    with pytest.raises(StartupError, match="missing.pem"):
        await MailServer(no_cert, log_stream=None).start()

    async with MailServer(config, log_stream=None) as server:
        ports = {item["service"]: int(item["address"].rsplit(":", 1)[1]) for item in server.status()["listeners"]}
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        auth = base64.b64encode(b"\0alice\0correct horse").decode()

        def exercise() -> dict:
            seen = {}
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as s:  # MX: STARTTLS offered, no AUTH
                s.ehlo("client.example")
                seen["smtp"] = (s.has_extn("starttls"), s.has_extn("auth"))
            with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as s:  # TLS, then AUTH, required
                s.ehlo("client.example")
                seen["submission_plain_mail"] = s.docmd("MAIL", "FROM:<alice@example.org>")
                s.starttls(context=context)
                s.ehlo("client.example")
                seen["submission_unauthenticated_mail"] = s.docmd("MAIL", "FROM:<alice@example.org>")
                s.docmd("RSET")
                seen["submission_auth"] = s.docmd("AUTH", f"PLAIN {auth}")
                s.sendmail("alice@example.org", ["someone@elsewhere.example"], b"Subject: out\r\n\r\nrelayed\r\n")
            with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], timeout=10, context=context) as s:  # implicit TLS
                seen["smtps"] = s.ehlo("client.example")[0]
                seen["smtps_auth"] = s.docmd("AUTH", f"PLAIN {auth}")[0]
            return seen

        seen = await asyncio.to_thread(exercise)
    assert seen["smtp"] == (True, False)
    assert seen["submission_plain_mail"][0] == 530
    assert seen["submission_unauthenticated_mail"][0] == 530
    assert seen["submission_auth"][0] == 235
    assert seen["smtps"] == 250 and seen["smtps_auth"] == 235
