"""TLS contexts: Postfix protocol syntax, certificate loading and errors,
real handshakes over loopback, certificate reload without dropping sessions."""

from __future__ import annotations

import asyncio
import os
import re
import ssl

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailserver.tls import (
    TlsConfigError, TlsContextHolder, client_context, parse_protocols, server_context, tls_description,
    tls_log_line, tls_summary,
)

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


# --------------------------------------------------------------------------
# smtpd_tls_protocols


@pytest.mark.parametrize("spec,expected", [
    (">=TLSv1.2", (V12, V13)),
    ([">=TLSv1.2"], (V12, V13)),
    (">=TLSv1", (V12, V13)),  # older versions are never enabled
    (">=TLSv1.3", (V13, V13)),
    ("<=TLSv1.2", (V12, V12)),
    ("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1", (V12, V13)),
    (["!SSLv2", "!SSLv3"], (V12, V13)),
    ("!SSLv2 !SSLv3 !TLSv1.2", (V13, V13)),
    ("TLSv1.2, TLSv1.3", (V12, V13)),
    ("TLSv1.3", (V13, V13)),
    ("tlsv1.3", (V13, V13)),
    ("", (V12, V13)),
    ([], (V12, V13)),
])
def test_postfix_protocol_syntax(spec, expected):
    assert parse_protocols(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("TLSv9", "unknown TLS protocol 'TLSv9'"),
    (">=SSLv4", "unknown TLS protocol"),
    ("!TLSv1.2, !TLSv1.3", "no supported TLS protocol"),
    ("<=TLSv1.1", "no supported TLS protocol"),
    ("TLSv1", "no supported TLS protocol"),
])
def test_bad_protocol_settings_name_the_parameter(spec, message):
    with pytest.raises(TlsConfigError, match=re.escape(message)) as info:
        parse_protocols(spec)
    assert str(info.value).startswith("smtpd_tls_protocols: ")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------
# Certificates


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory, name: str, host: str = "mail.example.org") -> tuple[str, str]:
    """cert file with the whole chain, separate key file."""
    cert = ca.issue_cert(host)
    cert_file, key_file = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    with open(cert_file, "wb") as fh:
        for blob in cert.cert_chain_pems:
            fh.write(blob.bytes())
    cert.private_key_pem.write_to_path(key_file)
    return cert_file, key_file


def replace_file(path: str, source: str) -> None:
    """Atomically put source's contents at path (what certbot-style tools do)."""
    with open(source, "rb") as fh:
        data = fh.read()
    tmp = path + ".new"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def client_ctx(ca: trustme.CA, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


class EchoServer:
    """A loopback server that answers each line with its own TLS facts."""

    def __init__(self):
        self.server: asyncio.base_events.Server | None = None
        self.summaries: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if line.strip() == b"STARTTLS":
                    writer.write(b"220 go ahead\n")
                    await writer.drain()
                    await writer.start_tls(self.holder.context)
                    continue
                summary = tls_summary(writer.get_extra_info("ssl_object"))
                self.summaries.append(summary)
                writer.write(line.rstrip() + b" " + summary.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def start(self, ssl_context: ssl.SSLContext | None, holder: TlsContextHolder | None = None) -> int:
        self.holder = holder
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ssl_context)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> str:
    writer.write(text.encode() + b"\n")
    await writer.drain()
    return (await reader.readline()).decode().rstrip()


async def test_handshake_over_loopback_with_chain_in_cert_file(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    server = EchoServer()
    port = await server.start(server_context(cert_file, key_file, [">=TLSv1.2"]))
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca),
                                                          server_hostname="mail.example.org")
            answer = await roundtrip(reader, writer, "hello")
            client_side = writer.get_extra_info("ssl_object")
            writer.close()
            await writer.wait_closed()
    finally:
        await server.close()
    assert re.fullmatch(r"hello \(using TLSv1\.3 with cipher TLS_\w+ \(\d+/\d+ bits\)\)", answer)
    assert client_side.version() == "TLSv1.3"
    assert tls_summary(client_side) == server.summaries[0]


async def test_key_in_the_certificate_file(ca, tmp_path):
    cert = ca.issue_cert("mail.example.org")
    combined = tmp_path / "combined.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(combined))
    server = EchoServer()
    port = await server.start(server_context(str(combined), "", ">=TLSv1.2"))
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca),
                                                          server_hostname="mail.example.org")
            assert (await roundtrip(reader, writer, "x")).startswith("x (using TLSv1.3")
            writer.close()
            await writer.wait_closed()
    finally:
        await server.close()


async def test_tls12_client_gets_a_tls12_summary(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    server = EchoServer()
    port = await server.start(server_context(cert_file, key_file))
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca, maximum=V12),
                                                          server_hostname="mail.example.org")
            answer = await roundtrip(reader, writer, "x")
            writer.close()
            await writer.wait_closed()
    finally:
        await server.close()
    assert re.fullmatch(r"x \(using TLSv1\.2 with cipher ECDHE-\S+ \((128|256)/(128|256) bits\)\)", answer)


async def test_protocol_floor_is_enforced(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    server = EchoServer()
    port = await server.start(server_context(cert_file, key_file, ">=TLSv1.3"))
    try:
        async with asyncio.timeout(10):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca, maximum=V12),
                                              server_hostname="mail.example.org")
    finally:
        await server.close()


def test_server_context_settings(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    ctx = server_context(cert_file, key_file, "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1")
    assert ctx.verify_mode == ssl.CERT_NONE  # no client certificates requested
    assert (ctx.minimum_version, ctx.maximum_version) == (V12, V13)
    assert ctx.options & ssl.OP_NO_COMPRESSION
    names = {c["name"] for c in ctx.get_ciphers()}
    assert not any("NULL" in n or "RC4" in n or "DES" in n or n.startswith("ADH") for n in names)


# --------------------------------------------------------------------------
# Configuration errors: one line, naming the file


def one_line_error(*args) -> str:
    with pytest.raises(TlsConfigError) as info:
        server_context(*args)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_empty_certificate_setting():
    assert "smtpd_tls_cert_file is empty" in one_line_error("", "")


def test_missing_files_are_named(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    missing = str(tmp_path / "missing.pem")
    text = one_line_error(missing, key_file)
    assert text.startswith("smtpd_tls_cert_file: cannot read ") and missing in text
    text = one_line_error(cert_file, missing)
    assert text.startswith("smtpd_tls_key_file: cannot read ") and missing in text


def test_unreadable_key_is_named(ca, tmp_path):
    if os.geteuid() == 0:
        # root reads anything: use a directory, which no one can read as a file.
        key_file = str(tmp_path)
        cert_file, _ = write_pair(ca, tmp_path, "server")
    else:
        cert_file, key_file = write_pair(ca, tmp_path, "server")
        os.chmod(key_file, 0)
    text = one_line_error(cert_file, key_file)
    assert text.startswith("smtpd_tls_key_file: cannot read ") and key_file in text


def test_file_without_certificate_or_key(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    text = one_line_error(str(junk), key_file)
    assert text.startswith("smtpd_tls_cert_file: no certificate found in ") and str(junk) in text
    text = one_line_error(cert_file, str(junk))
    assert text.startswith("smtpd_tls_key_file: no private key found in ") and str(junk) in text
    # Only the key was given as the certificate file: no certificate in it.
    assert "no certificate found in" in one_line_error(key_file, key_file)


def test_corrupt_certificate(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    text = one_line_error(str(broken), key_file)
    assert str(broken) in text and key_file in text


def test_mismatched_key(ca, tmp_path):
    cert_file, _ = write_pair(ca, tmp_path, "one")
    _, other_key = write_pair(ca, tmp_path, "two")
    text = one_line_error(cert_file, other_key)
    assert text == (f"smtpd_tls_key_file: private key in {other_key} does not match "
                    f"the certificate in {cert_file}")


def test_encrypted_key_is_refused_without_prompting(ca, tmp_path):
    cert_file, _ = write_pair(ca, tmp_path, "server")
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    text = one_line_error(cert_file, str(encrypted))
    assert "is encrypted" in text and str(encrypted) in text


# --------------------------------------------------------------------------
# Reload


async def test_reload_serves_new_certificate_without_dropping_sessions(ca, tmp_path):
    cert_file, key_file = os.path.join(tmp_path, "live.crt"), os.path.join(tmp_path, "live.key")
    old_cert, old_key = write_pair(ca, tmp_path, "old", host="old.example.org")
    new_cert, new_key = write_pair(ca, tmp_path, "new", host="new.example.org")
    replace_file(cert_file, old_cert)
    replace_file(key_file, old_key)
    logged: list[str] = []
    holder = TlsContextHolder(cert_file, key_file, ">=TLSv1.2", log=logged.append)
    first_context = holder.context
    assert holder.reload() is False  # nothing changed

    server = EchoServer()
    # The listener keeps the context it was created with, as asyncio servers do.
    port = await server.start(first_context, holder)
    try:
        async with asyncio.timeout(10):
            r1, w1 = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca),
                                                  server_hostname="old.example.org")
            assert _peer_names(w1) == {"old.example.org"}

            replace_file(cert_file, new_cert)
            replace_file(key_file, new_key)
            assert holder.reload() is True
            assert holder.context is not first_context
            assert logged == [f"TLS certificate reloaded from {cert_file}"]

            # The established session is untouched...
            assert (await roundtrip(r1, w1, "still here")).startswith("still here (using TLSv1.3")
            # ...and a new handshake on the same listener gets the new certificate.
            r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(ca),
                                                  server_hostname="new.example.org")
            assert _peer_names(w2) == {"new.example.org"}
            assert (await roundtrip(r2, w2, "new")).startswith("new (using TLSv1.3")
            # Also without SNI from the client.
            no_sni = client_ctx(ca)
            no_sni.check_hostname = False
            r3, w3 = await asyncio.open_connection("127.0.0.1", port, ssl=no_sni, server_hostname=None)
            assert _peer_names(w3) == {"new.example.org"}
            for writer in (w1, w2, w3):
                writer.close()
                await writer.wait_closed()
    finally:
        await server.close()


def _peer_names(writer: asyncio.StreamWriter) -> set[str]:
    cert = writer.get_extra_info("peercert")
    return {value for kind, value in cert["subjectAltName"] if kind == "DNS"}


async def test_starttls_with_the_holders_context(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    holder = TlsContextHolder(cert_file, key_file)
    server = EchoServer()
    port = await server.start(None, holder)
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await roundtrip(reader, writer, "plain") == "plain"
            assert await roundtrip(reader, writer, "STARTTLS") == "220 go ahead"
            await writer.start_tls(client_ctx(ca), server_hostname="mail.example.org")
            assert (await roundtrip(reader, writer, "secure")).startswith("secure (using TLSv1.3 with cipher ")
            writer.close()
            await writer.wait_closed()
    finally:
        await server.close()


def test_failed_reload_keeps_the_working_context(ca, tmp_path):
    cert_file, key_file = os.path.join(tmp_path, "live.crt"), os.path.join(tmp_path, "live.key")
    good_cert, good_key = write_pair(ca, tmp_path, "good")
    _, other_key = write_pair(ca, tmp_path, "other")
    replace_file(cert_file, good_cert)
    replace_file(key_file, good_key)
    holder = TlsContextHolder(cert_file, key_file)
    working = holder.context
    replace_file(key_file, other_key)  # e.g. the key was renewed before the certificate
    with pytest.raises(TlsConfigError, match="does not match"):
        holder.reload()
    assert holder.context is working
    replace_file(key_file, good_key)
    assert holder.reload() is True


def test_reconfigure_switches_files_and_protocols(ca, tmp_path):
    cert_a, key_a = write_pair(ca, tmp_path, "a")
    cert_b, key_b = write_pair(ca, tmp_path, "b")
    holder = TlsContextHolder(cert_a, key_a)
    assert holder.reconfigure(cert_a, key_a, (">=TLSv1.2",)) is False
    assert holder.reconfigure(cert_b, key_b, ">=TLSv1.3") is True
    assert holder.context.minimum_version == V13
    with pytest.raises(TlsConfigError):
        holder.reconfigure(str(tmp_path / "missing.crt"), key_b)
    assert (holder.cert_file, holder.key_file) == (cert_b, key_b)
    assert holder.context.minimum_version == V13


def test_holder_raises_at_startup_for_bad_files(tmp_path):
    with pytest.raises(TlsConfigError, match="cannot read"):
        TlsContextHolder(str(tmp_path / "none.crt"), str(tmp_path / "none.key"))


# --------------------------------------------------------------------------
# Texts and the client side


class FakeSSLObject:
    def __init__(self, version, cipher):
        self._version, self._cipher = version, cipher
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def version(self):
        return self._version

    def cipher(self):
        return self._cipher


def test_summary_texts():
    obj = FakeSSLObject("TLSv1.3", ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256))
    assert tls_summary(obj) == "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))"
    assert tls_description(obj) == "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    assert tls_log_line(obj, "host[192.0.2.1]") == (
        "Anonymous TLS connection established from host[192.0.2.1]: "
        "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    obj = FakeSSLObject("TLSv1.2", ("ECDHE-RSA-AES128-GCM-SHA256", "TLSv1.2", 128))
    assert tls_summary(obj) == "(using TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits))"
    assert tls_summary(None) == ""
    assert tls_summary(FakeSSLObject(None, None)) == ""


def test_client_context_levels(ca, tmp_path):
    assert client_context("none") is None
    for level in ("may", "encrypt"):
        ctx = client_context(level)
        assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
        assert ctx.minimum_version == V12
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    ctx = client_context("verify", str(cafile))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with pytest.raises(TlsConfigError, match="smtp_tls_CAfile"):
        client_context("secure", str(tmp_path / "missing.pem"))
    with pytest.raises(TlsConfigError):
        client_context("dane")


async def test_verify_level_client_checks_the_server(ca, tmp_path):
    cert_file, key_file = write_pair(ca, tmp_path, "server")
    server = EchoServer()
    port = await server.start(server_context(cert_file, key_file))
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context("verify", str(cafile)), server_hostname="mail.example.org")
            assert (await roundtrip(reader, writer, "ok")).startswith("ok (using")
            writer.close()
            await writer.wait_closed()
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=client_context("verify", str(cafile)),
                                              server_hostname="wrong.example.org")
    finally:
        await server.close()


# --------------------------------------------------------------------------
# Log lines of an implicit-TLS session


async def test_implicit_tls_logs_connect_then_the_handshake_with_the_clients_name(ca, tmp_path):
    """Port 465: asyncio finishes the handshake before the session starts its
    reverse lookup, but the lines come in Postfix's order, "connect from
    name[addr]" then "Anonymous TLS connection established from name[addr]",
    both with the looked-up name.  (The lookup is replaced by one that
    answers a name: loopback clients skip DNS.)"""
    from harness import LineSink, await_until, free_port
    from mailserver import Config, MailServer

    cert_file, key_file = write_pair(ca, str(tmp_path), "server", host="mx.test.example")
    port = free_port()
    config = Config(myhostname="mx.test.example", queue_directory=str(tmp_path / "spool"),
                    mail_spool_directory=str(tmp_path / "mail"), alias_maps=[],
                    smtpd_tls_cert_file=cert_file, smtpd_tls_key_file=key_file,
                    services={"smtps": {"listen": [f"127.0.0.1:{port}"], "tls": "implicit"}})
    sink = LineSink()
    async with MailServer(config, log_stream=sink) as server:
        async def named(ip):
            return "client.example", "client.example", False

        server.smtpd.lookup_client_name = named
        client = ssl.create_default_context()
        ca.configure_trust(client)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                       server_hostname="mx.test.example")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.write(b"QUIT\r\n")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"221 ")
        writer.close()
        await await_until(lambda: any("disconnect from" in line for line in sink.lines), what="disconnect")
    mine = [line.split(": ", 1)[1] for line in sink.lines if "[127.0.0.1]" in line]
    assert mine[0] == "connect from client.example[127.0.0.1]"
    assert re.fullmatch(r"Anonymous TLS connection established from client\.example\[127\.0\.0\.1\]: "
                        r"TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)", mine[1]), mine
    assert mine[2:] == ["disconnect from client.example[127.0.0.1] quit=1 commands=1"]
