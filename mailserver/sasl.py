"""SMTP AUTH (RFC 4954) with PLAIN and LOGIN against a Dovecot passwd-file.

Postfix hands SASL to Cyrus or Dovecot (``smtpd_sasl_glue.c``); here the
same job is three small pieces the SMTP session wires together:

* :class:`SaslExchange` — the challenge/response dialogue as a pure state
  machine (no I/O).  The session feeds it lines and gets back one
  :data:`SaslStep` at a time: a :class:`Challenge` to send, a
  :class:`Failure` carrying the reply to send, or the decoded
  :class:`Credentials` to verify.
* :class:`PasswdFile` — the user database (``smtpd_sasl_password_maps =
  passwd-file:/path``) in Dovecot's passwd-file format, kept in memory and
  re-read when the file changes.  :meth:`PasswdFile.authenticate` verifies
  a password off the event loop.
* :func:`verify` / :func:`hash_password` / :func:`set_password` — the
  password schemes Dovecot writes (``{ARGON2ID}``, ``{BLF-CRYPT}``,
  ``{SHA512-CRYPT}``, ``{SHA256-CRYPT}``, ``{PLAIN}``) and the atomic
  update behind ``mailserver passwd USER``.

Typical session flow::

    exchange = SaslExchange(mechanism, initial_response)   # from "AUTH PLAIN dGVzd..."
    step = exchange.start()
    while isinstance(step, Challenge):
        send(step.line)                    # "334 VXNlcm5hbWU6"
        step = exchange.step(read_line())  # "*" aborts
    if isinstance(step, Failure):
        send(step.reply)                   # log step.reason
    else:
        ok = await passwd.authenticate(step.authcid, step.password)
        send(AUTH_SUCCESS if ok else AUTH_FAILED)

How it fails:

* Protocol errors are replies, never exceptions: malformed base64 is
  ``501 5.5.2``, ``*`` is ``501 5.7.0``, an unknown mechanism ``504 5.5.4``
  (RFC 4954 §4), bad credentials ``535 5.7.8`` (RFC 4954 §6).  Detail for
  the log is in :attr:`Failure.reason`; the client sees generic text.
* A stored hash in an unknown scheme, or one that cannot be parsed, never
  matches (logged as a warning without the hash).
* When the passwd-file cannot be read (missing, unreadable), authentication
  raises :class:`PasswdFileError`: a temporary failure (answer
  :data:`AUTH_TEMP_FAILURE`, ``454 4.7.0``), never a ``535`` and never a
  login against stale contents.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from .reply import Reply

__all__ = [
    "MECHANISMS", "AUTH_SUCCESS", "AUTH_FAILED", "AUTH_TEMP_FAILURE", "AUTH_ABORTED", "AUTH_CANNOT_DECODE",
    "AUTH_UNSUPPORTED", "AUTH_RESPONSE_TOO_LONG", "AUTH_NOT_ENABLED", "AUTH_ALREADY_AUTHENTICATED",
    "AUTH_SYNTAX", "AUTH_ENCRYPTION_REQUIRED", "AUTH_MAIL_TRANSACTION",
    "Challenge", "Failure", "Credentials", "SaslStep", "SaslExchange",
    "PasswdEntry", "PasswdFile", "PasswdFileError", "parse_passwd_spec", "parse_passwd_text",
    "verify", "hash_password", "set_password", "sha_crypt", "SCHEMES",
]

_logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Replies (texts as Postfix smtpd_sasl_glue.c / smtpd_sasl_proto.c send them)

MECHANISMS = ("PLAIN", "LOGIN")
"""Mechanisms to advertise: ``250-AUTH PLAIN LOGIN`` (only over TLS when
``smtpd_tls_auth_only = yes``: both send the password in the clear)."""

AUTH_SUCCESS = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed: authentication failure")
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure: authentication backend unavailable")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")
AUTH_UNSUPPORTED = Reply(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_RESPONSE_TOO_LONG = Reply(500, "5.5.6", "SASL response limit exceeded")
# For the AUTH command checks the session makes before starting an exchange.
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism")
AUTH_ENCRYPTION_REQUIRED = Reply(504, "5.5.4", "Encryption required for requested authentication mechanism")
AUTH_MAIL_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")

# Postfix: a SASL response longer than this is refused (smtpd_sasl_glue.c
# uses 12 kB for the base64 text).
MAX_RESPONSE = 12288


# --------------------------------------------------------------------------
# The exchange: a pure state machine


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <base64>`` and feed the client's next line to :meth:`SaslExchange.step`."""

    data: bytes

    @property
    def line(self) -> str:
        """The exact wire line without CRLF. RFC 4954 §4: ``"334" SP [base64]``
        — an empty challenge is ``"334 "`` with its space (``Reply.lines()``
        would strip it)."""
        return "334 " + base64.b64encode(self.data).decode("ascii")

    @property
    def reply(self) -> Reply:
        return Reply(334, "", base64.b64encode(self.data).decode("ascii"))


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange ended without credentials: send :attr:`reply`, log :attr:`reason`."""

    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """Decoded credentials to verify (``authzid`` is ``""`` when not given)."""

    mechanism: str
    authzid: str
    authcid: str
    password: str = ""

    def __repr__(self) -> str:  # keep passwords out of logs and tracebacks
        return f"Credentials(mechanism={self.mechanism!r}, authzid={self.authzid!r}, authcid={self.authcid!r})"


SaslStep = Challenge | Failure | Credentials

# States (h11 style: the whole machine is this table plus _on_response).
_START, _PLAIN, _USERNAME, _PASSWORD, _DONE = "START", "WAIT_PLAIN", "WAIT_USERNAME", "WAIT_PASSWORD", "DONE"
_LOGIN_USERNAME = b"Username:"  # 334 VXNlcm5hbWU6
_LOGIN_PASSWORD = b"Password:"  # 334 UGFzc3dvcmQ6


class SaslExchange:
    """One AUTH dialogue. ``start()`` once, then ``step(line)`` while the
    previous step was a :class:`Challenge`.

    ``initial_response`` is the optional second argument of the AUTH command
    (base64; ``=`` means an empty response, RFC 4954 §4).  Mechanism names
    are case-insensitive.  Strings from the client are decoded as UTF-8 with
    ``surrogateescape`` so arbitrary password bytes survive unchanged.
    """

    def __init__(self, mechanism: str, initial_response: str | None = None):
        self.mechanism = mechanism.upper()
        self.initial_response = initial_response
        self.state = _START
        self._username = ""

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def start(self) -> SaslStep:
        if self.state != _START:
            raise RuntimeError("SaslExchange.start() called twice")
        if self.mechanism not in MECHANISMS:
            return self._finish(Failure(AUTH_UNSUPPORTED, f"unsupported mechanism {_printable(self.mechanism)}"))
        if self.mechanism == "PLAIN":
            self.state = _PLAIN
            if self.initial_response is None:
                return Challenge(b"")  # RFC 4616: the server sends an empty challenge
        else:
            self.state = _USERNAME
            if self.initial_response is None:
                return Challenge(_LOGIN_USERNAME)
        # The initial response is checked like any other response, except
        # that "=" is the only way to send an empty one and "*" is not special.
        if len(self.initial_response) > MAX_RESPONSE:
            return self._finish(Failure(AUTH_RESPONSE_TOO_LONG, "initial response too long"))
        data = _decode(self.initial_response, initial=True)
        if data is None:
            return self._finish(Failure(AUTH_CANNOT_DECODE, "malformed base64 in initial response"))
        return self._on_response(data)

    def step(self, line: str) -> SaslStep:
        """The client's answer to the last challenge (without CRLF)."""
        if self.state in (_START, _DONE):
            raise RuntimeError(f"SaslExchange.step() in state {self.state}")
        line = line.strip()
        if line == "*":  # RFC 4954 §4: the client cancels
            return self._finish(Failure(AUTH_ABORTED, "authentication aborted by client"))
        if len(line) > MAX_RESPONSE:
            return self._finish(Failure(AUTH_RESPONSE_TOO_LONG, "response too long"))
        data = _decode(line, initial=False)
        if data is None:
            return self._finish(Failure(AUTH_CANNOT_DECODE, "malformed base64 in response"))
        return self._on_response(data)

    # ------------------------------------------------------------------
    def _on_response(self, data: bytes) -> SaslStep:
        if self.state == _PLAIN:
            # RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
            parts = data.split(b"\0")
            if len(parts) != 3 or not parts[1]:
                return self._finish(Failure(AUTH_FAILED, "malformed PLAIN message"))
            authzid, authcid, password = (_text(p) for p in parts)
            # Proxy authorization is not offered: an authzid must name the
            # authenticating user itself.
            if authzid and authzid != authcid:
                return self._finish(Failure(
                    AUTH_FAILED, f"authorization identity {_printable(authzid)} differs from "
                                 f"authentication identity {_printable(authcid)}"))
            return self._finish(Credentials("PLAIN", authzid, authcid, password))
        if self.state == _USERNAME:
            self._username = _text(data)
            if not self._username or "\0" in self._username:
                return self._finish(Failure(AUTH_FAILED, "malformed LOGIN username"))
            self.state = _PASSWORD
            return Challenge(_LOGIN_PASSWORD)
        if self.state == _PASSWORD:
            return self._finish(Credentials("LOGIN", "", self._username, _text(data)))
        raise AssertionError(self.state)

    def _finish(self, step: SaslStep) -> SaslStep:
        self.state = _DONE
        return step


def _decode(text: str, *, initial: bool) -> bytes | None:
    text = text.strip()
    if text == "=" or (not initial and text == ""):
        return b""
    if initial and text == "":
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _printable(text: str, limit: int = 100) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text[:limit])


# --------------------------------------------------------------------------
# Password schemes

_CRYPT64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SHA_CRYPT_ROUNDS_DEFAULT = 5000
_SHA_CRYPT_ROUNDS_MIN = 1000
_SHA_CRYPT_ROUNDS_MAX = 999_999_999
# Byte order of the final digest in the crypt-base64 output (Drepper's spec).
_SHA512_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
                 (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13),
                 (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19),
                 (62, 20, 41))
_SHA256_ORDER = ((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5), (6, 16, 26),
                 (27, 7, 17), (18, 28, 8), (9, 19, 29))


def _b64_from_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_CRYPT64[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat(block: bytes, length: int) -> bytes:
    q, r = divmod(length, len(block))
    return block * q + block[:r]


def sha_crypt(password: str | bytes, setting: str) -> str:
    """SHA-crypt (``$5$`` SHA-256 / ``$6$`` SHA-512) as specified by Ulrich
    Drepper ("Unix crypt using SHA-256 and SHA-512", the glibc algorithm).

    ``setting`` is ``$6$[rounds=N$]salt[$...]``: a full stored hash works, so
    ``sha_crypt(pw, stored) == stored`` checks a password.  Raises
    ValueError for a setting that is not ``$5$`` or ``$6$``.
    """
    if isinstance(password, str):
        password = password.encode("utf-8", "surrogateescape")
    if setting.startswith("$6$"):
        digest, ident, order, hash_len = hashlib.sha512, "$6$", _SHA512_ORDER, 64
    elif setting.startswith("$5$"):
        digest, ident, order, hash_len = hashlib.sha256, "$5$", _SHA256_ORDER, 32
    else:
        raise ValueError("not a SHA-crypt setting")
    rest = setting[3:]
    rounds = _SHA_CRYPT_ROUNDS_DEFAULT
    custom_rounds = False
    if rest.startswith("rounds="):
        number, sep, after = rest[7:].partition("$")
        # glibc: only "rounds=<digits>$" is a rounds field; anything else is salt.
        if sep and number.isdigit():
            rounds = min(max(int(number), _SHA_CRYPT_ROUNDS_MIN), _SHA_CRYPT_ROUNDS_MAX)
            custom_rounds = True
            rest = after
    salt_text = rest.split("$", 1)[0][:16]
    salt = salt_text.encode("utf-8", "surrogateescape")
    p = password

    b = digest(p + salt + p).digest()
    a_ctx = digest(p + salt + _repeat(b, len(p)))
    n = len(p)
    while n:
        a_ctx.update(b if n & 1 else p)
        n >>= 1
    a = a_ctx.digest()
    p_seq = _repeat(digest(p * len(p)).digest(), len(p))
    s_seq = _repeat(digest(salt * (16 + a[0])).digest(), len(salt))

    c = a
    for i in range(rounds):
        ctx = digest(p_seq if i & 1 else c)
        if i % 3:
            ctx.update(s_seq)
        if i % 7:
            ctx.update(p_seq)
        ctx.update(c if i & 1 else p_seq)
        c = ctx.digest()

    encoded = "".join(_b64_from_24bit(c[i], c[j], c[k], 4) for i, j, k in order)
    if hash_len == 64:
        encoded += _b64_from_24bit(0, 0, c[63], 2)
    else:
        encoded += _b64_from_24bit(0, c[31], c[30], 3)
    head = f"{ident}rounds={rounds}$" if custom_rounds else ident
    return f"{head}{salt_text}${encoded}"


def _verify_sha_crypt(data: str, password: str, prefix: str) -> bool:
    if not data.startswith(prefix) or data.count("$") < 3:
        return False
    computed = sha_crypt(password, data)
    return hmac.compare_digest(computed.encode("utf-8", "surrogateescape"),
                               data.encode("utf-8", "surrogateescape"))


def _verify_bcrypt(data: str, password: str) -> bool:
    import bcrypt

    if not data.startswith(("$2a$", "$2b$", "$2y$")):
        return False
    # crypt_blowfish (Dovecot, PHP) uses only the first 72 bytes; bcrypt>=5
    # refuses longer input instead of truncating, so truncate as they do.
    secret = password.encode("utf-8", "surrogateescape")[:72]
    try:
        return bcrypt.checkpw(secret, data.encode("ascii"))  # constant-time inside
    except (ValueError, UnicodeEncodeError):
        return False


def _verify_argon2(data: str, password: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    if not data.startswith(("$argon2id$", "$argon2i$")):
        return False
    try:
        # Parameters come from the hash; comparison is constant-time in libargon2.
        return PasswordHasher().verify(data, password.encode("utf-8", "surrogateescape"))
    except (VerifyMismatchError, VerificationError, InvalidHashError, ValueError):
        return False


def _verify_plain(data: str, password: str) -> bool:
    return hmac.compare_digest(data.encode("utf-8", "surrogateescape"),
                               password.encode("utf-8", "surrogateescape"))


def _verify_crypt(data: str, password: str) -> bool:
    # Dovecot {CRYPT}: libc crypt(3); we accept the modular formats we implement.
    if data.startswith("$6$"):
        return _verify_sha_crypt(data, password, "$6$")
    if data.startswith("$5$"):
        return _verify_sha_crypt(data, password, "$5$")
    if data.startswith("$2"):
        return _verify_bcrypt(data, password)
    if data.startswith("$argon2"):
        return _verify_argon2(data, password)
    return False


_VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "ARGON2ID": _verify_argon2,
    "ARGON2I": _verify_argon2,
    "BLF-CRYPT": _verify_bcrypt,
    "BCRYPT": _verify_bcrypt,
    "SHA512-CRYPT": lambda data, pw: _verify_sha_crypt(data, pw, "$6$"),
    "SHA256-CRYPT": lambda data, pw: _verify_sha_crypt(data, pw, "$5$"),
    "CRYPT": _verify_crypt,
    "PLAIN": _verify_plain,
    "CLEAR": _verify_plain,
    "CLEARTEXT": _verify_plain,
}
SCHEMES = tuple(_VERIFIERS)


def split_scheme(stored: str) -> tuple[str | None, str]:
    """``{SCHEME}data`` → (``SCHEME`` upper-cased, data); no braces → (None, stored)."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            return stored[1:end].upper(), stored[end + 1:]
    return None, stored


def verify(stored: str, password: str, *, log: Callable[[str], None] | None = None) -> bool:
    """Does ``password`` match the stored passwd-file value ``{SCHEME}hash``?

    Without a ``{SCHEME}`` prefix the hash format decides, as Dovecot's
    default ``CRYPT`` scheme does (``$6$``, ``$5$``, ``$2y$``, ``$argon2id$``).
    Slow schemes (argon2, bcrypt, SHA-crypt) take tens of milliseconds: call
    this from a worker thread (:meth:`PasswdFile.authenticate` does).  An
    unknown scheme logs a warning and returns False.
    """
    scheme, data = split_scheme(stored)
    if scheme is None:
        scheme = "CRYPT"
    verifier = _VERIFIERS.get(scheme)
    if verifier is None:
        (log or _warn)(f"warning: unsupported password scheme {{{_printable(scheme, 40)}}}")
        return False
    if not data:
        return False  # an empty password field never authenticates
    try:
        return verifier(data, password)
    except (ValueError, TypeError, UnicodeError):
        return False


def _warn(text: str) -> None:
    _logger.warning("%s", text)


def hash_password(password: str, scheme: str = "ARGON2ID") -> str:
    """A passwd-file password field for ``password``: ``{ARGON2ID}$argon2id$...``.

    Schemes: ARGON2ID (default; argon2-cffi's RFC 9106 low-memory profile),
    BLF-CRYPT (bcrypt cost 12, ``$2y$`` as Dovecot writes; at most 72 bytes),
    SHA512-CRYPT / SHA256-CRYPT (16-character random salt, 5000 rounds as
    ``doveadm pw``), PLAIN (no ``:`` or line breaks).  ValueError otherwise.
    """
    scheme = scheme.upper()
    raw = password.encode("utf-8", "surrogateescape")
    if scheme == "ARGON2ID":
        from argon2 import PasswordHasher, Type

        return "{ARGON2ID}" + PasswordHasher(type=Type.ID).hash(raw)
    if scheme in ("BLF-CRYPT", "BCRYPT"):
        import bcrypt

        if len(raw) > 72:
            raise ValueError("password too long for BLF-CRYPT (at most 72 bytes)")
        if b"\0" in raw:
            raise ValueError("password contains a NUL byte")
        hashed = bcrypt.hashpw(raw, bcrypt.gensalt(rounds=12, prefix=b"2b")).decode("ascii")
        return "{" + scheme + "}$2y$" + hashed[4:]  # same algorithm; $2y$ is what Dovecot writes
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        salt = "".join(secrets.choice(_CRYPT64) for _ in range(16))
        return "{" + scheme + "}" + sha_crypt(raw, ("$6$" if scheme == "SHA512-CRYPT" else "$5$") + salt)
    if scheme == "PLAIN":
        if any(c in password for c in ":\r\n"):
            raise ValueError("a PLAIN password cannot contain ':' or line breaks")
        return "{PLAIN}" + password
    raise ValueError(f"unsupported password scheme {scheme!r} (use ARGON2ID, BLF-CRYPT, SHA512-CRYPT or PLAIN)")


# --------------------------------------------------------------------------
# The passwd-file


class PasswdFileError(Exception):
    """The passwd-file cannot be read: authentication is temporarily unavailable."""


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    """One ``user:password:uid:gid:gecos:home:shell:extra`` line."""

    user: str
    password: str
    uid: str = ""
    gid: str = ""
    gecos: str = ""
    home: str = ""
    shell: str = ""
    extra: str = ""

    def __repr__(self) -> str:
        return f"PasswdEntry(user={self.user!r}, home={self.home!r})"


def parse_passwd_spec(spec: str) -> str:
    """``passwd-file:/path`` or ``/path`` → ``/path`` (ValueError otherwise)."""
    spec = spec.strip()
    if spec.startswith("passwd-file:"):
        spec = spec[len("passwd-file:"):]
    elif ":" in spec.split("/", 1)[0]:
        raise ValueError(f"unsupported password map type in {spec!r} (use passwd-file:/path)")
    if not spec:
        raise ValueError("empty passwd-file path")
    return spec


def _user_key(user: str) -> str:
    # Dovecot's default auth_username_format = %Lu: user names are lower-cased.
    return user.lower()


def parse_passwd_text(text: str, *, source: str = "passwd-file",
                      log: Callable[[str], None] | None = None) -> dict[str, PasswdEntry]:
    """Entries by lower-cased user name; the first line for a user wins.

    Comment (``#``) and blank lines are skipped; a line without a ``:`` is
    skipped with a warning naming its line number (never its content).
    """
    entries: dict[str, PasswdEntry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if ":" not in line:
            (log or _warn)(f"warning: {source}, line {number}: no ':' separator, line ignored")
            continue
        fields = line.rstrip("\r\n").split(":", 7)
        fields += [""] * (8 - len(fields))
        user = fields[0].strip()
        if not user:
            (log or _warn)(f"warning: {source}, line {number}: empty user name, line ignored")
            continue
        entries.setdefault(_user_key(user), PasswdEntry(user, *fields[1:8]))
    return entries


class PasswdFile:
    """A Dovecot passwd-file held in memory, reloaded when it changes.

    Lookups (:meth:`lookup`) never touch the disk.  Freshness: the async
    :meth:`refresh` (which :meth:`authenticate` calls first) stats the file
    in a worker thread at most once per ``check_interval`` seconds and
    re-reads it when its mtime, size or inode changed.  Synchronous callers
    (CLI, tests) use :meth:`reload_if_changed`, which does the same
    blocking.  Nothing is read in the constructor.
    """

    def __init__(self, spec: str, *, check_interval: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None, max_concurrent_verifications: int = 4):
        self.path = parse_passwd_spec(spec)
        self.check_interval = check_interval
        self.clock = clock
        self.log = log or _warn
        self.max_concurrent_verifications = max_concurrent_verifications
        self._entries: dict[str, PasswdEntry] = {}
        self._signature: tuple[int, int, int] | None = None
        self._error: str | None = "not loaded"
        self._checked_at: float | None = None
        self._limiter: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, asyncio.Lock] | None = None

    # ---------------------------------------------------------------- loading
    @property
    def available(self) -> bool:
        """False when the last load or check failed (authentication is then a temporary failure)."""
        return self._error is None

    def reload_if_changed(self) -> bool:
        """Blocking: stat the file, re-read it when it changed.  True if re-read.

        On failure the old contents are dropped and :attr:`available` turns
        False (no login against a file that is gone); the error is logged
        once per distinct failure.
        """
        try:
            return self._reload_if_changed()
        finally:
            self._checked_at = self.clock()

    def _reload_if_changed(self) -> bool:
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature == self._signature and self._error is None:
                return False
            with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except OSError as exc:
            self._fail(f"cannot read passwd-file {self.path}: {exc.strerror or exc}")
            return False
        self._entries = parse_passwd_text(text, source=f"passwd-file {self.path}", log=self.log)
        self._signature = signature
        self._error = None
        return True

    def load(self) -> None:
        """Blocking first load; raises :class:`PasswdFileError` (for ``mailserver check``)."""
        self.reload_if_changed()
        if self._error is not None:
            raise PasswdFileError(self._error)

    async def refresh(self) -> None:
        """Re-read the file if it changed, checking at most once per ``check_interval``.

        Concurrent callers share one check: they wait for it and see its result.
        """
        if self._fresh():
            return
        async with self._limits()[1]:
            if not self._fresh():
                await asyncio.to_thread(self.reload_if_changed)

    def _fresh(self) -> bool:
        return self._checked_at is not None and self.clock() - self._checked_at < self.check_interval

    def _fail(self, message: str) -> None:
        if self._error != message:
            self.log(f"warning: {message}")
        self._error = message
        self._entries = {}
        self._signature = None

    # ---------------------------------------------------------------- lookups
    def lookup(self, user: str) -> PasswdEntry | None:
        return self._entries.get(_user_key(user))

    def __contains__(self, user: str) -> bool:
        return _user_key(user) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def verify_password(self, user: str, password: str) -> bool:
        """Blocking check against the in-memory entries (no reload).

        An unknown user still costs one dummy verification, so response
        timing does not reveal which user names exist.
        """
        entry = self.lookup(user)
        if entry is None:
            verify(_dummy_hash(), password, log=self.log)
            return False
        return verify(entry.password, password, log=self._user_log(entry.user))

    def _user_log(self, user: str) -> Callable[[str], None]:
        return lambda text: self.log(f"{text} for user {_printable(user)} in {self.path}")

    async def authenticate(self, user: str, password: str) -> bool:
        """Refresh if due, then verify in a worker thread.

        Raises :class:`PasswdFileError` when the file is unavailable (answer
        ``454 4.7.0``); returns False for an unknown user or wrong password.
        At most ``max_concurrent_verifications`` hashes run at once, so a
        burst of AUTH attempts cannot take every worker thread (or, with
        argon2, 64 MiB each) at the same time.
        """
        await self.refresh()
        if self._error is not None:
            raise PasswdFileError(self._error)
        async with self._limits()[0]:
            return await asyncio.to_thread(self.verify_password, user, password)

    def _limits(self) -> tuple[asyncio.Semaphore, asyncio.Lock]:
        # asyncio primitives belong to one loop: make them for the running one.
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter[0] is not loop:
            self._limiter = (loop, asyncio.Semaphore(max(1, self.max_concurrent_verifications)), asyncio.Lock())
        return self._limiter[1], self._limiter[2]


@functools.cache
def _dummy_hash() -> str:
    """A SHA512-CRYPT hash of a random string, verified for unknown users
    (5000 rounds: the cost of a typical stored hash)."""
    return "{SHA512-CRYPT}" + sha_crypt(secrets.token_hex(16), "$6$" + secrets.token_hex(8))


# --------------------------------------------------------------------------
# Updating the file (mailserver passwd USER)


def _check_user_name(user: str) -> None:
    if not user or user != user.strip() or user.startswith("#"):
        raise ValueError("invalid user name")
    if any(c in user for c in ":\0") or any(not c.isprintable() for c in user):
        raise ValueError("invalid user name (no ':', spaces or control characters)")


def set_password(path: str, user: str, password: str, scheme: str = "ARGON2ID") -> bool:
    """Add ``user`` or replace its password; True if the user was new.

    Only the password field of the user's line(s) changes; other users,
    comments and the user's uid/gid/home/extra fields are kept.  The file is
    replaced atomically: a temporary file in the same directory, fsync,
    rename, fsync of the directory.  The mode (``0600`` for a new file) and,
    when permitted, the owner of an existing file are preserved.  Writers
    serialize on an exclusive lock of the directory.  Raises ValueError for
    a bad user name or password, OSError for file system errors.
    """
    path = parse_passwd_spec(path)
    _check_user_name(user)
    if "\n" in password or "\r" in password:
        raise ValueError("the password cannot contain line breaks")
    field = hash_password(password, scheme)
    directory = os.path.dirname(os.path.abspath(path))
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
                lines = fh.read().splitlines(keepends=True)
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            lines, st = [], None
        new_lines, found = _replace_password(lines, user, field)
        if not found:
            if new_lines and not new_lines[-1].endswith("\n"):
                new_lines[-1] += "\n"
            new_lines.append(f"{user}:{field}\n")
        _atomic_write(path, directory, dir_fd, "".join(new_lines), st)
        return not found
    finally:
        os.close(dir_fd)


def _replace_password(lines: Iterable[str], user: str, field: str) -> tuple[list[str], bool]:
    out, found, key = [], False, _user_key(user)
    for line in lines:
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        stripped = body.strip()
        if stripped and not stripped.startswith("#") and ":" in body:
            fields = body.split(":", 7)
            if _user_key(fields[0].strip()) == key:
                fields[1] = field
                body = ":".join(fields)
                found = True
        out.append(body + ending)
    return out, found


def _atomic_write(path: str, directory: str, dir_fd: int, text: str, st: os.stat_result | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            os.fchmod(fh.fileno(), stat.S_IMODE(st.st_mode) if st else 0o600)
            if st is not None and (st.st_uid != os.geteuid() or st.st_gid != os.getegid()):
                try:
                    os.fchown(fh.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    pass  # not root: the file becomes ours, as any editor would leave it
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        raise
    os.fsync(dir_fd)
