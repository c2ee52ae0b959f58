"""SMTP AUTH: password schemes, the passwd-file, and the SASL dialogue."""

from __future__ import annotations

import asyncio
import base64
import os
import stat

import pytest

from mailserver import sasl
from mailserver.reply import Reply
from mailserver.sasl import (
    AUTH_ABORTED, AUTH_CANNOT_DECODE, AUTH_FAILED, AUTH_RESPONSE_TOO_LONG, AUTH_SUCCESS, AUTH_UNSUPPORTED,
    Challenge, Credentials, Failure, PasswdFile, PasswdFileError, SaslExchange, hash_password,
    parse_passwd_spec, parse_passwd_text, set_password, sha_crypt, verify,
)


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------
# SHA-crypt known answers: Ulrich Drepper's specification (the glibc test
# vectors), including explicit rounds, a salt longer than 16 characters and
# rounds below the minimum (clamped to 1000).

SHA512_VECTORS = [
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/"
     "y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8"
     "audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwG"
     "qd8p4ur1"),
    ("$6$rounds=77777$short", "we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0"),
    ("$6$rounds=123456$asaltof16chars..", "a short string",
     "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgE"
     "JAstJeonj1"),
    ("$6$rounds=10$roundstoolow", "the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaH"
     "HrsX."),
]

SHA256_VECTORS = [
    ("$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("$5$rounds=10000$saltstringsaltstring", "Hello world!",
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("$5$rounds=5000$toolongsaltstring", "This is just a test",
     "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    ("$5$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    ("$5$rounds=77777$short", "we have a short salt string but not a short password",
     "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/"),
    ("$5$rounds=123456$asaltof16chars..", "a short string",
     "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"),
    ("$5$rounds=10$roundstoolow", "the minimum number is still observed",
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
]


@pytest.mark.parametrize("setting,password,expected", SHA512_VECTORS + SHA256_VECTORS)
def test_sha_crypt_matches_the_published_vectors(setting, password, expected):
    assert sha_crypt(password, setting) == expected
    # A full stored hash is a valid setting: recomputing reproduces it.
    assert sha_crypt(password, expected) == expected


@pytest.mark.parametrize("setting,password,expected", SHA512_VECTORS[:3])
def test_sha512_crypt_scheme_verifies_right_password_only(setting, password, expected):
    assert verify("{SHA512-CRYPT}" + expected, password)
    assert not verify("{SHA512-CRYPT}" + expected, password + "x")
    assert not verify("{SHA512-CRYPT}" + expected, "")
    # Dovecot's default CRYPT scheme: the $6$ prefix decides.
    assert verify("{CRYPT}" + expected, password)
    assert verify(expected, password)


def test_sha256_crypt_scheme():
    setting, password, expected = SHA256_VECTORS[0]
    assert verify("{SHA256-CRYPT}" + expected, password)
    assert not verify("{SHA256-CRYPT}" + expected, "hello world!")
    # A $5$ hash under the SHA512 label is not accepted.
    assert not verify("{SHA512-CRYPT}" + expected, password)


def test_sha_crypt_rounds_field_that_is_not_a_number_is_salt():
    # glibc: only "rounds=<digits>$" is a rounds field.
    out = sha_crypt("x", "$6$rounds=abc$salt")
    assert out.startswith("$6$rounds=abc$") and "rounds=5000" not in out


def test_sha_crypt_rejects_other_settings():
    with pytest.raises(ValueError):
        sha_crypt("x", "$1$md5salt")


# bcrypt: the crypt_blowfish / OpenBSD known answer, plus one made with the
# bcrypt package at cost 4; Dovecot writes $2y$, which is the same algorithm.
BCRYPT_KNOWN = ("U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW")
BCRYPT_2B = ("correct horse", "$2b$04$abcdefghijklmnopqrstuujydOTSfIH/d5oUHpsygqV5X9xJLQc6e")


@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "BCRYPT"])
def test_bcrypt_known_answers(scheme):
    password, hashed = BCRYPT_KNOWN
    assert verify("{%s}%s" % (scheme, hashed), password)
    assert not verify("{%s}%s" % (scheme, hashed), "U*V")
    password, hashed = BCRYPT_2B
    for prefix in ("$2b$", "$2y$", "$2a$"):
        stored = "{%s}%s" % (scheme, prefix + hashed[4:])
        assert verify(stored, password)
        assert not verify(stored, "correct horsf")


def test_bcrypt_generated_by_the_library():
    import bcrypt

    hashed = bcrypt.hashpw("pässword".encode(), bcrypt.gensalt(rounds=4)).decode()
    assert verify("{BLF-CRYPT}" + hashed, "pässword")
    assert not verify("{BLF-CRYPT}" + hashed, "password")


def test_bcrypt_uses_only_the_first_72_bytes_like_crypt_blowfish():
    import bcrypt

    long_password = "a" * 72
    hashed = bcrypt.hashpw(long_password.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert verify("{BLF-CRYPT}" + hashed, long_password + "anything")  # no exception from bcrypt>=5
    with pytest.raises(ValueError):
        hash_password("a" * 73, "BLF-CRYPT")


def test_bcrypt_garbage_hash_is_false():
    assert not verify("{BLF-CRYPT}$2y$04$garbage", "x")
    assert not verify("{BLF-CRYPT}not-a-bcrypt-hash", "x")


# argon2: known answers made with argon2-cffi (salt "saltsaltsaltsalt").
ARGON2ID_KNOWN = ("correct horse", "$argon2id$v=19$m=1024,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$"
                                   "MO33cCFnqSA8SskhR8/i5r/vajJ3mDxwI/Myoh5GZwk")
ARGON2I_KNOWN = ("correct horse", "$argon2i$v=19$m=1024,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$"
                                  "k74KtOeXRC+Liob2I0b0MKFpIPhXAdb8cojiLViemA4")


def test_argon2_known_answers():
    password, hashed = ARGON2ID_KNOWN
    assert verify("{ARGON2ID}" + hashed, password)
    assert not verify("{ARGON2ID}" + hashed, "correct horsE")
    assert verify("{ARGON2I}" + ARGON2I_KNOWN[1], ARGON2I_KNOWN[0])
    assert verify(hashed, password)  # no scheme: the hash format decides


def test_argon2_generated_by_the_library_and_garbage():
    from argon2 import PasswordHasher

    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash("s3cret")
    assert verify("{ARGON2ID}" + hashed, "s3cret")
    assert not verify("{ARGON2ID}" + hashed, "s3creT")
    assert not verify("{ARGON2ID}$argon2id$v=19$m=1024,t=2,p=1$bad", "s3cret")
    assert not verify("{ARGON2ID}plain-text", "plain-text")


def test_plain_scheme_and_aliases():
    assert verify("{PLAIN}hunter2", "hunter2")
    assert verify("{plain}hunter2", "hunter2")  # scheme names are case-insensitive
    assert verify("{CLEAR}hunter2", "hunter2")
    assert not verify("{PLAIN}hunter2", "hunter3")
    assert not verify("{PLAIN}hunter2", "hunter")
    assert not verify("{PLAIN}", "")  # an empty password field never authenticates


def test_unknown_scheme_is_false_with_a_warning():
    warnings: list[str] = []
    assert not verify("{MD5-CRYPT}$1$abc$def", "x", log=warnings.append)
    assert warnings == ["warning: unsupported password scheme {MD5-CRYPT}"]
    # Without a scheme, an unrecognised hash format simply does not match.
    assert not verify("plaintext", "plaintext")


def test_comparisons_use_the_constant_time_function(monkeypatch):
    calls = []
    real = sasl.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(sasl.hmac, "compare_digest", spy)
    assert verify("{PLAIN}hunter2", "hunter2")
    assert len(calls) == 1
    setting, password, expected = SHA512_VECTORS[0]
    assert not verify("{SHA512-CRYPT}" + expected, "wrong")
    assert len(calls) == 2 and calls[1][1] == expected.encode()


@pytest.mark.parametrize("scheme,prefix", [
    ("ARGON2ID", "{ARGON2ID}$argon2id$"),
    ("SHA512-CRYPT", "{SHA512-CRYPT}$6$"),
    ("SHA256-CRYPT", "{SHA256-CRYPT}$5$"),
    ("BLF-CRYPT", "{BLF-CRYPT}$2y$12$"),
    ("PLAIN", "{PLAIN}"),
])
def test_hash_password_round_trips(scheme, prefix):
    stored = hash_password("pä ss:wörd" if scheme != "PLAIN" else "pä ss wörd", scheme)
    assert stored.startswith(prefix)
    assert ":" not in stored and "\n" not in stored
    assert verify(stored, "pä ss:wörd" if scheme != "PLAIN" else "pä ss wörd")
    assert not verify(stored, "other")


def test_hash_password_default_is_argon2id_with_fresh_salts():
    one, two = hash_password("same"), hash_password("same")
    assert one.startswith("{ARGON2ID}$argon2id$v=19$")
    assert one != two


def test_hash_password_refuses_unknown_scheme_and_unsafe_plain():
    with pytest.raises(ValueError):
        hash_password("x", "MD5")
    with pytest.raises(ValueError):
        hash_password("a:b", "PLAIN")


# --------------------------------------------------------------------------
# passwd-file


PASSWD = """\
# Dovecot passwd-file
alice:{PLAIN}alice-pw:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G

Bob@Example.COM:{PLAIN}bob-pw
broken line without separator
:{PLAIN}no-user
alice:{PLAIN}second-alice-line-is-ignored
"""


def test_parse_passwd_text_fields_comments_and_bad_lines():
    warnings: list[str] = []
    entries = parse_passwd_text(PASSWD, source="passwd-file t", log=warnings.append)
    assert set(entries) == {"alice", "bob@example.com"}
    alice = entries["alice"]
    assert alice.password == "{PLAIN}alice-pw"
    assert (alice.uid, alice.gid, alice.home) == ("1000", "1000", "/home/alice")
    assert alice.extra == "userdb_quota_rule=*:storage=1G"
    assert entries["bob@example.com"].user == "Bob@Example.COM"
    assert warnings == ["warning: passwd-file t, line 5: no ':' separator, line ignored",
                        "warning: passwd-file t, line 6: empty user name, line ignored"]
    assert "broken" not in " ".join(warnings)  # line contents are never logged


def test_parse_passwd_spec():
    assert parse_passwd_spec("passwd-file:/etc/mail/passwd") == "/etc/mail/passwd"
    assert parse_passwd_spec("/etc/mail/passwd") == "/etc/mail/passwd"
    with pytest.raises(ValueError):
        parse_passwd_spec("hash:/etc/mail/passwd")
    with pytest.raises(ValueError):
        parse_passwd_spec("passwd-file:")


def write(path, text: str, mtime_ns: int | None = None) -> None:
    with open(path, "w") as fh:
        fh.write(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


async def test_passwd_file_authenticates_users_case_insensitively(tmp_path):
    path = tmp_path / "passwd"
    write(path, PASSWD)
    pf = PasswdFile(f"passwd-file:{path}", log=lambda text: None)
    assert await pf.authenticate("alice", "alice-pw")
    assert await pf.authenticate("bob@example.com", "bob-pw")
    assert await pf.authenticate("BOB@example.com", "bob-pw")
    assert not await pf.authenticate("alice", "bob-pw")
    assert not await pf.authenticate("nobody", "alice-pw")
    assert not await pf.authenticate("alice", "second-alice-line-is-ignored")
    assert len(pf) == 2 and "Alice" in pf


async def test_passwd_file_reloads_when_changed_at_most_once_per_interval(tmp_path):
    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}old\n", mtime_ns=1_000_000_000_000_000_000)
    clock = FakeClock()
    pf = PasswdFile(str(path), clock=clock)
    assert await pf.authenticate("alice", "old")

    write(path, "alice:{PLAIN}new\n", mtime_ns=1_000_000_001_000_000_000)
    clock.now += 0.5  # within check_interval: no stat, old contents
    assert await pf.authenticate("alice", "old")
    clock.now += 0.6
    assert await pf.authenticate("alice", "new")
    assert not await pf.authenticate("alice", "old")


def test_reload_if_changed_notices_size_change_even_with_same_mtime(tmp_path):
    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}a\n", mtime_ns=5_000_000_000)
    pf = PasswdFile(str(path))
    assert pf.reload_if_changed() is True
    assert pf.reload_if_changed() is False
    write(path, "alice:{PLAIN}a\nbob:{PLAIN}b\n", mtime_ns=5_000_000_000)
    assert pf.reload_if_changed() is True
    assert pf.verify_password("bob", "b")


async def test_missing_passwd_file_is_a_temporary_failure(tmp_path):
    warnings: list[str] = []
    pf = PasswdFile(str(tmp_path / "absent"), log=warnings.append)
    with pytest.raises(PasswdFileError):
        await pf.authenticate("alice", "x")
    with pytest.raises(PasswdFileError, match="absent"):
        pf.load()
    assert not pf.available
    assert len(warnings) == 1 and "cannot read passwd-file" in warnings[0]


async def test_deleted_passwd_file_stops_logins_instead_of_using_stale_data(tmp_path):
    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}pw\n")
    clock = FakeClock()
    pf = PasswdFile(str(path), clock=clock, log=lambda text: None)
    assert await pf.authenticate("alice", "pw")
    os.unlink(path)
    clock.now += 2
    with pytest.raises(PasswdFileError):
        await pf.authenticate("alice", "pw")
    write(path, "alice:{PLAIN}pw2\n")
    clock.now += 2
    assert await pf.authenticate("alice", "pw2")


async def test_authenticate_runs_slow_hashes_off_the_event_loop(tmp_path, monkeypatch):
    path = tmp_path / "passwd"
    write(path, "alice:" + hash_password("pw", "SHA512-CRYPT") + "\n")
    pf = PasswdFile(str(path))
    loop_thread = []
    real_verify = sasl.verify

    def recording_verify(stored, password, **kw):
        import threading

        loop_thread.append(threading.current_thread() is threading.main_thread())
        return real_verify(stored, password, **kw)

    monkeypatch.setattr(sasl, "verify", recording_verify)
    assert await pf.authenticate("alice", "pw")
    assert not await pf.authenticate("ghost", "pw")  # unknown users cost a dummy verification too
    assert loop_thread == [False, False]


async def test_concurrent_authentications_are_bounded(tmp_path, monkeypatch):
    import threading

    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}pw\n")
    pf = PasswdFile(str(path), max_concurrent_verifications=2)
    lock = threading.Lock()
    active, peak = [0], [0]
    release = threading.Event()

    def slow_verify(stored, password, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        release.wait(5)
        with lock:
            active[0] -= 1
        return True

    monkeypatch.setattr(sasl, "verify", slow_verify)
    tasks = [asyncio.create_task(pf.authenticate("alice", "pw")) for _ in range(6)]
    async with asyncio.timeout(10):
        while active[0] < 2:
            await asyncio.sleep(0.01)
        release.set()
        assert all(await asyncio.gather(*tasks))
    assert peak[0] == 2


# --------------------------------------------------------------------------
# set_password (mailserver passwd USER)


def test_set_password_creates_file_with_mode_0600(tmp_path):
    path = tmp_path / "passwd"
    assert set_password(str(path), "alice@example.com", "s3cret", "SHA512-CRYPT") is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    pf = PasswdFile(str(path))
    pf.load()
    assert pf.verify_password("alice@example.com", "s3cret")
    assert path.read_text().startswith("alice@example.com:{SHA512-CRYPT}$6$")


def test_set_password_replaces_only_that_users_password(tmp_path):
    path = tmp_path / "passwd"
    write(path, PASSWD)
    os.chmod(path, 0o640)
    assert set_password(f"passwd-file:{path}", "ALICE", "new-pw", "PLAIN") is False
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Dovecot passwd-file"
    assert lines[1] == "alice:{PLAIN}new-pw:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G"
    assert "Bob@Example.COM:{PLAIN}bob-pw" in lines
    assert "broken line without separator" in lines
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # mode preserved
    assert sorted(os.listdir(tmp_path)) == ["passwd"]  # no temporary file left behind


def test_set_password_adds_a_user_to_a_file_without_final_newline(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}a")
    assert set_password(str(path), "bob", "b", "PLAIN") is True
    assert path.read_text() == "alice:{PLAIN}a\nbob:{PLAIN}b\n"


def test_set_password_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}a\n")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sasl.os, "replace", failing_replace)
    with pytest.raises(OSError):
        set_password(str(path), "alice", "b", "PLAIN")
    assert path.read_text() == "alice:{PLAIN}a\n"
    assert sorted(os.listdir(tmp_path)) == ["passwd"]


@pytest.mark.parametrize("user", ["", "a:b", " alice", "#alice", "al\tice", "al\nice"])
def test_set_password_refuses_bad_user_names(tmp_path, user):
    with pytest.raises(ValueError):
        set_password(str(tmp_path / "passwd"), user, "pw")
    assert not (tmp_path / "passwd").exists()


def test_set_password_refuses_line_breaks_in_password(tmp_path):
    with pytest.raises(ValueError):
        set_password(str(tmp_path / "passwd"), "alice", "pw\nbob:{PLAIN}x")


# --------------------------------------------------------------------------
# The SASL exchange (RFC 4954, RFC 4616)


def test_plain_with_initial_response():
    ex = SaslExchange("PLAIN", b64("\0alice\0pw"))
    step = ex.start()
    assert step == Credentials("PLAIN", "", "alice", "pw")
    assert ex.done


def test_plain_without_initial_response_sends_an_empty_challenge():
    ex = SaslExchange("plain", None)
    step = ex.start()
    assert isinstance(step, Challenge)
    assert step.line == "334 "
    assert ex.step(b64("alice\0alice\0pw")) == Credentials("PLAIN", "alice", "alice", "pw")


def test_plain_authzid_different_from_authcid_fails():
    step = SaslExchange("PLAIN", b64("root\0alice\0pw")).start()
    assert isinstance(step, Failure)
    assert step.reply == AUTH_FAILED
    assert str(step.reply) == "535 5.7.8 Error: authentication failed: authentication failure"
    assert "root" in step.reason


@pytest.mark.parametrize("message", [b"alice\0pw", b"\0\0pw", b"a\0b\0c\0d", b""])
def test_plain_malformed_message_fails(message):
    step = SaslExchange("PLAIN", b64(message) if message else "=").start()
    assert isinstance(step, Failure) and step.reply == AUTH_FAILED


def test_login_dialogue_challenges():
    ex = SaslExchange("LOGIN", None)
    first = ex.start()
    assert isinstance(first, Challenge) and first.line == "334 VXNlcm5hbWU6"
    assert str(first.reply) == "334 VXNlcm5hbWU6"
    second = ex.step(b64("alice"))
    assert isinstance(second, Challenge) and second.line == "334 UGFzc3dvcmQ6"
    assert ex.step(b64("pw")) == Credentials("LOGIN", "", "alice", "pw")
    with pytest.raises(RuntimeError):
        ex.step(b64("again"))


def test_login_with_initial_response_skips_the_username_challenge():
    ex = SaslExchange("LOGIN", b64("alice"))
    step = ex.start()
    assert isinstance(step, Challenge) and step.line == "334 UGFzc3dvcmQ6"
    assert ex.step("") == Credentials("LOGIN", "", "alice", "")  # empty continuation = empty password


def test_equals_sign_initial_response_means_empty():
    ex = SaslExchange("LOGIN", "=")
    step = ex.start()
    assert isinstance(step, Failure) and step.reply == AUTH_FAILED  # empty user name


@pytest.mark.parametrize("mechanism,answers", [
    ("PLAIN", []),
    ("LOGIN", []),
    ("LOGIN", [b64("alice")]),
])
def test_star_cancels_at_any_challenge(mechanism, answers):
    ex = SaslExchange(mechanism, None)
    assert isinstance(ex.start(), Challenge)
    for answer in answers:
        assert isinstance(ex.step(answer), Challenge)
    step = ex.step("*")
    assert isinstance(step, Failure)
    assert str(step.reply) == "501 5.7.0 Authentication aborted"
    assert step.reply == AUTH_ABORTED
    assert ex.done


def test_malformed_base64_cannot_be_decoded():
    step = SaslExchange("PLAIN", "not base64!").start()
    assert isinstance(step, Failure) and str(step.reply) == "501 5.5.2 Cannot decode response"
    ex = SaslExchange("LOGIN", None)
    ex.start()
    step = ex.step("YWxpY2U")  # missing padding
    assert isinstance(step, Failure) and step.reply == AUTH_CANNOT_DECODE
    # "*" in an initial response is not a cancel, just bad base64.
    assert SaslExchange("PLAIN", "*").start().reply == AUTH_CANNOT_DECODE


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "XOAUTH2", "ANONYMOUS", ""])
def test_unknown_mechanism(mechanism):
    step = SaslExchange(mechanism, b64("x")).start()
    assert isinstance(step, Failure)
    assert str(step.reply) == "504 5.5.4 Unsupported authentication mechanism"
    assert step.reply == AUTH_UNSUPPORTED


def test_overlong_response_is_refused():
    ex = SaslExchange("LOGIN", None)
    ex.start()
    step = ex.step("A" * (sasl.MAX_RESPONSE + 4))
    assert isinstance(step, Failure) and step.reply == AUTH_RESPONSE_TOO_LONG


def test_non_utf8_password_bytes_survive_unchanged(tmp_path):
    raw = b"\xff\xfepw"
    step = SaslExchange("PLAIN", b64(b"\0alice\0" + raw)).start()
    assert isinstance(step, Credentials)
    assert step.password.encode("utf-8", "surrogateescape") == raw
    assert "pw" not in repr(step)  # passwords stay out of logs and tracebacks


def test_start_twice_and_step_before_start_are_errors():
    ex = SaslExchange("LOGIN", None)
    with pytest.raises(RuntimeError):
        ex.step("x")
    ex.start()
    with pytest.raises(RuntimeError):
        ex.start()


def test_reply_texts_match_postfix():
    assert str(AUTH_SUCCESS) == "235 2.7.0 Authentication successful"
    assert AUTH_FAILED.text.startswith("Error: authentication failed: ")
    assert sasl.AUTH_TEMP_FAILURE.code == 454 and sasl.AUTH_TEMP_FAILURE.enhanced == "4.7.0"
    assert isinstance(sasl.AUTH_ENCRYPTION_REQUIRED, Reply)


async def drive(exchange: SaslExchange, answers: list[str], passwd: PasswdFile) -> tuple[list[str], Reply]:
    """What a session does: send challenges, read answers, verify."""
    sent: list[str] = []
    step = exchange.start()
    answers = list(answers)
    while isinstance(step, Challenge):
        sent.append(step.line)
        step = exchange.step(answers.pop(0))
    if isinstance(step, Failure):
        return sent, step.reply
    ok = await passwd.authenticate(step.authcid, step.password)
    return sent, AUTH_SUCCESS if ok else AUTH_FAILED


async def test_session_flow_against_a_passwd_file(tmp_path):
    path = tmp_path / "passwd"
    set_password(str(path), "alice@example.com", "correct horse", "SHA512-CRYPT")
    pf = PasswdFile(f"passwd-file:{path}")
    sent, reply = await drive(SaslExchange("LOGIN"), [b64("alice@example.com"), b64("correct horse")], pf)
    assert sent == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"] and reply == AUTH_SUCCESS
    sent, reply = await drive(SaslExchange("PLAIN", b64("\0alice@example.com\0wrong")), [], pf)
    assert sent == [] and reply == AUTH_FAILED


async def test_concurrent_first_logins_share_one_load(tmp_path):
    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}pw\n")
    pf = PasswdFile(str(path))
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(pf.authenticate("alice", "pw") for _ in range(8)))
    assert results == [True] * 8
