"""TLS for the SMTP server (STARTTLS, RFC 3207, and implicit TLS, RFC 8314).

* :func:`server_context` builds an :class:`ssl.SSLContext` from
  ``smtpd_tls_cert_file`` / ``smtpd_tls_key_file`` (the certificate file may
  hold the whole chain, and the key too) and ``smtpd_tls_protocols`` in
  Postfix syntax.  No client certificate is requested; ciphers are Python's
  secure defaults (ECDHE/DHE with AES-GCM, ChaCha20 or AES, no SHA-1, no
  anonymous or null ciphers); compression and renegotiation are off.
* :class:`TlsContextHolder` keeps the current context and rebuilds it on
  :meth:`~TlsContextHolder.reload` when the certificate or key file changed.
  Sessions already encrypted keep the context they started with; new
  handshakes get the new certificate — even on a listener that was created
  with an older context, because every context the holder builds switches
  itself to the holder's current one while the handshake starts.
* :func:`tls_summary` / :func:`tls_description` / :func:`tls_log_line` give
  the Postfix texts for the Received header and the log.

How it fails: every configuration problem (empty setting, missing or
unreadable file, no certificate or key in it, encrypted key, key that does
not match the certificate, unknown protocol name) raises
:class:`TlsConfigError` with one line naming the file or the parameter.  A
failed reload raises too and keeps serving the previous, working context.
"""

from __future__ import annotations

import os
import ssl
from typing import Any, Callable, Sequence

__all__ = ["TlsConfigError", "parse_protocols", "server_context", "client_context", "TlsContextHolder",
           "tls_description", "tls_summary", "tls_log_line"]


class TlsConfigError(Exception):
    """A TLS configuration problem, described in one line."""


# Postfix protocol names in order; only TLSv1.2 and later can be enabled
# here (OpenSSL 3 refuses older versions at its default security level, and
# Python deprecates them).
_PROTOCOL_ORDER = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_SUPPORTED = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_CANONICAL = {name.lower(): name for name in _PROTOCOL_ORDER}


def parse_protocols(spec: Sequence[str] | str,
                    param: str = "smtpd_tls_protocols") -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """Postfix ``smtpd_tls_protocols`` → (minimum, maximum) TLS version.

    Accepts the Postfix forms, comma/space separated or as a list:
    ``>=TLSv1.2``, ``<=TLSv1.3``, exclusions ``!SSLv2, !SSLv3, !TLSv1,
    !TLSv1.1`` and inclusions ``TLSv1.2, TLSv1.3`` (when any inclusion is
    given only those are enabled).  Empty means TLSv1.2 and later.
    Versions below TLSv1.2 are never enabled; a setting that leaves none,
    or leaves a gap (``TLSv1.2, !TLSv1.3`` is fine; exclusions splitting
    the range are not expressible as min/max), raises TlsConfigError.
    """
    items = spec.replace(",", " ").split() if isinstance(spec, str) else \
        [word for item in spec for word in item.replace(",", " ").split()]
    enabled = set(_PROTOCOL_ORDER)
    included: set[str] = set()
    low, high = 0, len(_PROTOCOL_ORDER) - 1
    for item in items:
        for op in (">=", "<=", "!", ""):
            if item.startswith(op):
                name = _CANONICAL.get(item[len(op):].lower())
                break
        if name is None:
            raise TlsConfigError(f"{param}: unknown TLS protocol {item!r} "
                                 f"(use e.g. >=TLSv1.2 or !SSLv2, !SSLv3, !TLSv1, !TLSv1.1)")
        index = _PROTOCOL_ORDER.index(name)
        if op == ">=":
            low = max(low, index)
        elif op == "<=":
            high = min(high, index)
        elif op == "!":
            enabled.discard(name)
        else:
            included.add(name)
    if included:
        enabled &= included
    usable = [name for i, name in enumerate(_PROTOCOL_ORDER)
              if name in enabled and low <= i <= high and name in _SUPPORTED]
    if not usable:
        raise TlsConfigError(f"{param}: no supported TLS protocol left enabled (TLSv1.2 and TLSv1.3 are supported)")
    first, last = _PROTOCOL_ORDER.index(usable[0]), _PROTOCOL_ORDER.index(usable[-1])
    if len(usable) != last - first + 1:
        raise TlsConfigError(f"{param}: enabled TLS protocols must form a contiguous range")
    return _SUPPORTED[usable[0]], _SUPPORTED[usable[-1]]


def _no_passphrase() -> bytes:
    raise TlsConfigError("encrypted private key")


def _check_readable(path: str, param: str, marker: str, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise TlsConfigError(f"{param}: cannot read {path}: {exc.strerror or exc}") from None
    if marker.encode() not in data:
        raise TlsConfigError(f"{param}: no {what} found in {path} (PEM format expected)")


def server_context(cert_file: str, key_file: str = "", protocols: Sequence[str] | str = (">=TLSv1.2",)
                   ) -> ssl.SSLContext:
    """An SSLContext for the SMTP server: certificate chain and key loaded,
    protocol range set, no client certificates requested.  TlsConfigError
    on any problem (see the module docstring)."""
    if not cert_file:
        raise TlsConfigError("smtpd_tls_cert_file is empty: TLS needs a certificate")
    key_file = key_file or cert_file
    minimum, maximum = parse_protocols(protocols)
    _check_readable(cert_file, "smtpd_tls_cert_file", "-----BEGIN CERTIFICATE-----", "certificate")
    _check_readable(key_file, "smtpd_tls_key_file", "PRIVATE KEY-----", "private key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    ctx.verify_mode = ssl.CERT_NONE  # Postfix smtpd_tls_ask_ccert = no
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_DH_USE
                    | ssl.OP_SINGLE_ECDH_USE | getattr(ssl, "OP_NO_RENEGOTIATION", 0))
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except TlsConfigError:
        raise TlsConfigError(f"smtpd_tls_key_file: private key in {key_file} is encrypted; "
                             f"a key without a passphrase is needed") from None
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".lower()
        if "key_values_mismatch" in text or "key values mismatch" in text:
            raise TlsConfigError(f"smtpd_tls_key_file: private key in {key_file} does not match "
                                 f"the certificate in {cert_file}") from None
        raise TlsConfigError(f"cannot load certificate {cert_file} with key {key_file}: "
                             f"{exc.reason or exc.strerror or exc}") from None
    except OSError as exc:
        raise TlsConfigError(f"cannot load certificate {cert_file} with key {key_file}: "
                             f"{exc.strerror or exc}") from None
    return ctx


def client_context(level: str, cafile: str = "") -> ssl.SSLContext | None:
    """An SSLContext for the SMTP client per ``smtp_tls_security_level``.

    ``none`` → None; ``may`` and ``encrypt`` → encryption without
    certificate checks (Postfix: opportunistic/mandatory encryption do not
    authenticate the server); ``verify`` and ``secure`` → the server
    certificate must chain to ``cafile`` (or the system store) and match
    the host name given to the handshake.  TLSv1.2 and later.
    """
    if level == "none":
        return None
    if level in ("may", "encrypt"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif level in ("verify", "secure"):
        try:
            ctx = ssl.create_default_context(cafile=cafile or None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"smtp_tls_CAfile: cannot load {cafile}: {getattr(exc, 'strerror', None) or exc}"
                                 ) from None
    else:
        raise TlsConfigError(f"smtp_tls_security_level: unknown level {level!r}")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TlsContextHolder:
    """The server's current TLS context, swapped on :meth:`reload`.

    ``holder.context`` is what STARTTLS (or an implicit-TLS listener) should
    use.  Each context the holder builds carries an SNI callback that moves
    a starting handshake to the holder's newest context, so a listener
    created once with ``ssl=holder.context`` still serves the new
    certificate after a reload.  (That switch carries the certificate and
    key; a changed ``smtpd_tls_protocols`` applies to listeners and
    STARTTLS sessions that take ``holder.context`` afresh.)
    """

    def __init__(self, cert_file: str, key_file: str = "", protocols: Sequence[str] | str = (">=TLSv1.2",),
                 *, log: Callable[[str], None] | None = None):
        self.cert_file = cert_file
        self.key_file = key_file or cert_file
        self.protocols = protocols
        self.log = log
        self._signature = self._signatures()
        self._context = self._build()

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def _signatures(self) -> tuple[Any, Any]:
        return (_file_signature(self.cert_file), _file_signature(self.key_file))

    def _build(self) -> ssl.SSLContext:
        ctx = server_context(self.cert_file, self.key_file, self.protocols)
        ctx.sni_callback = self._sni_switch
        return ctx

    def _sni_switch(self, ssl_object: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._context
        if ctx is not current:
            ssl_object.context = current
        return None

    def reload(self, *, force: bool = False) -> bool:
        """Rebuild the context if the certificate or key file changed (or
        ``force``).  True if a new context is in place.  On TlsConfigError
        the previous context stays in service and the error is raised."""
        signature = self._signatures()
        if not force and signature == self._signature:
            return False
        context = self._build()
        self._context, self._signature = context, signature
        if self.log is not None:
            self.log(f"TLS certificate reloaded from {self.cert_file}")
        return True

    def reconfigure(self, cert_file: str, key_file: str = "", protocols: Sequence[str] | str = (">=TLSv1.2",)
                    ) -> bool:
        """Apply new settings (configuration reload); rebuilds when anything
        changed.  On TlsConfigError nothing changes."""
        key_file = key_file or cert_file
        if (cert_file, key_file, protocols) == (self.cert_file, self.key_file, self.protocols):
            return self.reload()
        old = (self.cert_file, self.key_file, self.protocols)
        self.cert_file, self.key_file, self.protocols = cert_file, key_file, protocols
        try:
            return self.reload(force=True)
        except TlsConfigError:
            self.cert_file, self.key_file, self.protocols = old
            raise


# --------------------------------------------------------------------------
# Texts


def _cipher_bits(ssl_object: Any, name: str, secret_bits: int) -> tuple[int, int]:
    try:
        for cipher in ssl_object.context.get_ciphers():
            if cipher.get("name") == name:
                return int(cipher.get("strength_bits", secret_bits)), int(cipher.get("alg_bits", secret_bits))
    except (AttributeError, ssl.SSLError, TypeError, ValueError):
        pass
    return secret_bits, secret_bits


def tls_description(ssl_object: Any) -> str:
    """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`` (Postfix:
    protocol, cipher, used/algorithm bits); ``""`` without TLS."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    if not cipher:
        return ""
    name, _proto, secret_bits = cipher
    used, alg = _cipher_bits(ssl_object, name, int(secret_bits or 0))
    version = ssl_object.version() or cipher[1]
    return f"{version} with cipher {name} ({used}/{alg} bits)"


def tls_summary(ssl_object: Any) -> str:
    """The Received header comment: ``(using TLSv1.3 with cipher
    TLS_AES_256_GCM_SHA384 (256/256 bits))``; ``""`` without TLS."""
    text = tls_description(ssl_object)
    return f"(using {text})" if text else ""


def tls_log_line(ssl_object: Any, client: str) -> str:
    """Postfix's log line after a server handshake, e.g. ``Anonymous TLS
    connection established from host[1.2.3.4]: TLSv1.3 with cipher ...``
    (anonymous: no client certificate is requested)."""
    return f"Anonymous TLS connection established from {client}: {tls_description(ssl_object)}"
