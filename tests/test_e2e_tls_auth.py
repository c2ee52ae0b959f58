"""TLS and AUTH on the real server: STARTTLS, implicit TLS, required TLS and
AUTH on a submission service, brute force, STARTTLS command injection."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl

import pytest
import trustme

from harness import ServerProcess, free_port, smtp_dialog, wait_until
from mailserver.sasl import set_password

MSG = b"From: user@example.org\r\nSubject: tls\r\n\r\nsecret\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.example", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(root / "cert.pem"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    root = tmp_path_factory.mktemp("tlsauth")
    set_password(str(root / "passwd"), "alice", "correct horse")
    ports = {name: free_port() for name in ("smtp", "submission", "smtps")}
    srv = ServerProcess(root, {
        "smtpd_tls_cert_file": str(pki / "cert.pem"),
        "smtpd_sasl_password_maps": f"passwd-file:{root / 'passwd'}",
        "mynetworks": ["192.0.2.0/24"],  # loopback clients are NOT trusted here: AUTH is needed to relay
        "smtpd_error_sleep_time": "0s",
    }, port=ports["smtp"], services={
        "smtp": {"listen": [f"127.0.0.1:{ports['smtp']}"], "tls": "may", "auth": "optional"},
        "submission": {"listen": [f"127.0.0.1:{ports['submission']}"], "tls": "required", "auth": "required"},
        "smtps": {"listen": [f"127.0.0.1:{ports['smtps']}"], "tls": "implicit", "auth": "optional"},
    }).start()
    srv.ports = ports
    yield srv
    srv.stop()


def client_context(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_starttls_is_advertised_and_auth_only_after_tls(server, pki):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, text = s.docmd("AUTH", "PLAIN " + plain("alice", "correct horse"))
        assert (code, text) == (538, b"5.7.11 Encryption required for requested authentication mechanism")
        s.starttls(context=client_context(pki))
        s.ehlo("client.example")
        assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"] and not s.has_extn("starttls")
        code, text = s.docmd("STARTTLS")
        assert (code, text) == (503, b"5.5.1 Error: TLS already active")


def test_auth_then_relay_with_esmtpsa_received_header(server, pki):
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as s:
        s.starttls(context=client_context(pki))
        s.login("alice", "correct horse")
        s.sendmail("alice@example.org", ["box@virt.test"], MSG)
    msgs = wait_until(lambda: server.maildir_messages(server.vmail / "box"), what="delivery")
    assert b"with ESMTPSA id" in msgs[-1] and b"(using TLSv1." in msgs[-1]
    server.wait_for_log(r"client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=alice")


def test_unauthenticated_relay_is_denied_even_over_tls(server, pki):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.starttls(context=client_context(pki))
        s.ehlo()
        s.mail("x@example.org")
        code, text = s.rcpt("victim@example.com")
        assert (code, text) == (554, b"5.7.1 <victim@example.com>: Relay access denied")


def test_required_tls_and_auth_on_submission(server, pki):
    replies = smtp_dialog("127.0.0.1", server.ports["submission"], [
        b"EHLO c\r\n", b"MAIL FROM:<a@example.org>\r\n", b"NOOP\r\n", b"QUIT\r\n"])
    assert replies[2] == "530 5.7.0 Must issue a STARTTLS command first"
    assert replies[3] == "250 2.0.0 Ok"
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as s:
        s.starttls(context=client_context(pki))
        s.ehlo()
        code, text = s.docmd("MAIL FROM:<a@example.org>")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_implicit_tls_service(server, pki):
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=client_context(pki)) as s:
        s.login("alice", "correct horse")
        s.sendmail("alice@example.org", ["box@virt.test"], MSG)
    server.wait_for_log(r"Anonymous TLS connection established from localhost")


def test_auth_failures_get_535_and_the_connection_is_closed_at_the_limit(server, pki):
    sock = client_context(pki).wrap_socket(socket.create_connection(("127.0.0.1", server.ports["smtps"])),
                                          server_hostname="mx.test.example")
    with sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO c\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        replies = []
        for attempt in range(3):
            sock.sendall(f"AUTH PLAIN {plain('alice', 'wrong' + str(attempt))}\r\n".encode())
            replies.append(f.readline().decode().rstrip())
        assert replies[:2] == ["535 5.7.8 Error: authentication failed: authentication failure"] * 2
        assert replies[2] == "421 4.7.0 mx.test.example Error: too many failed authentication attempts"
        assert f.readline() == b""
    server.wait_for_log(r"warning: localhost\[127\.0\.0\.1\]: SASL PLAIN authentication failed")


@pytest.mark.parametrize("line, reply", [
    (b"AUTH PLAIN !!!notbase64\r\n", "501 5.5.2 Cannot decode response"),
    (b"AUTH CRAM-MD5\r\n", "504 5.5.4 Unsupported authentication mechanism"),
    (b"AUTH\r\n", "501 5.5.4 Syntax: AUTH mechanism"),
    (b"AUTH LOGIN\r\n*\r\n", "501 5.7.0 Authentication aborted"),
])
def test_malformed_auth(server, pki, line, reply):
    sock = client_context(pki).wrap_socket(socket.create_connection(("127.0.0.1", server.ports["smtps"])),
                                          server_hostname="mx.test.example")
    with sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO c\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        sock.sendall(line)
        got = f.readline().decode().rstrip()
        if got.startswith("334 "):
            got = f.readline().decode().rstrip()
        assert got == reply


def test_auth_twice_and_inside_a_transaction(server, pki):
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=client_context(pki)) as s:
        s.ehlo()
        s.docmd("MAIL FROM:<a@example.org>")
        assert s.docmd("AUTH", "PLAIN " + plain("alice", "correct horse")) == (
            503, b"5.5.1 Error: MAIL transaction in progress")
        s.docmd("RSET")
        assert s.docmd("AUTH", "PLAIN " + plain("alice", "correct horse"))[0] == 235
        assert s.docmd("AUTH", "PLAIN " + plain("alice", "correct horse")) == (503, b"5.5.1 Error: already authenticated")


def test_plaintext_pipelined_after_starttls_is_discarded(server, pki):
    """CVE-2011-0411: 'STARTTLS\\r\\nMAIL FROM:<x>' in one write; after the
    handshake the injected MAIL must not count."""
    raw = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"EHLO c\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    tls = client_context(pki).wrap_socket(raw, server_hostname="mx.test.example")
    with tls:
        g = tls.makefile("rb")
        tls.sendall(b"EHLO c\r\n")
        while not g.readline().startswith(b"250 "):
            pass
        tls.sendall(b"RCPT TO:<box@virt.test>\r\n")
        assert g.readline().decode().rstrip() == "503 5.5.1 Error: need MAIL command"
        tls.sendall(b"QUIT\r\n")


@pytest.mark.parametrize("mode", ["implicit", "may"])
def test_reload_rereads_the_certificate_for_new_sessions(tmp_path, mode):
    """A renewed certificate file is served after 'mailserver reload', on an
    implicit-TLS listener (whose socket keeps its context) and for STARTTLS."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert = tmp_path / "cert.pem"
    old_ca.issue_cert("mx.test.example", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    port = free_port()
    srv = ServerProcess(tmp_path, {"smtpd_tls_cert_file": str(cert)}, port=port,
                        services={"smtp": {"listen": [f"127.0.0.1:{port}"], "tls": mode}})
    if mode == "implicit":
        srv._greets = lambda: _tls_greets(port, old_ca)  # the harness probes in plaintext
    srv.start()

    def handshake(ca) -> bool:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        try:
            if mode == "implicit":
                with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10) as s:
                    s.noop()
            else:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    s.starttls(context=ctx)
                    s.noop()
            return True
        except ssl.SSLError:
            return False

    try:
        assert handshake(old_ca) and not handshake(new_ca)
        new_ca.issue_cert("mx.test.example", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        result = srv.cli("reload")
        assert result.returncode == 0, result.stderr
        assert handshake(new_ca) and not handshake(old_ca)
    finally:
        srv.stop()


def _tls_greets(port: int, ca) -> bool:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=2) as s:
            return s.noop()[0] == 250
    except OSError:
        return False
