"""Asynchronous DNS resolution for mail routing, with a TTL cache.

Responsibility
    Answer the questions the SMTP client (and, later, the SMTP server's
    RBL and reverse-DNS checks) ask of the DNS: the MX hosts of a domain
    with their addresses (:meth:`Resolver.mx_hosts`), the addresses of a
    host (:meth:`Resolver.addresses`) and raw record lookups
    (:meth:`Resolver.lookup`).  Built on ``dns.asyncresolver`` (dnspython).

Contract
    * ``Resolver(nameservers, timeout, inet_protocols)``: nameservers as
      ``"192.0.2.1"``, ``"127.0.0.1:5353"``, ``"[::1]:53"`` (IP addresses
      only, each with its own port); ``None`` reads ``/etc/resolv.conf``
      (falling back to 127.0.0.1 if there is none).  ``timeout`` is the
      total time for one lookup.  Keyword-only: ``clock``, ``rng``, ``log``
      (warnings such as skipped MX hosts) and the default
      ``smtp_mx_address_limit``.
    * Results are cached per ``(name, type)`` for the record TTL; negative
      answers (NXDOMAIN and NODATA) for the SOA-derived negative TTL
      (``min(SOA TTL, SOA minimum)``, RFC 2308) or 60 s when the answer
      carries no SOA.  Temporary failures are never cached.  The clock is
      injectable (``clock=``, default :func:`time.monotonic`).
    * MX semantics follow Postfix ``smtp_domain_addr()``/RFC 5321 §5.1:
      hosts sorted by preference, equal preferences shuffled (injectable
      ``rng=``); no MX records (NODATA) means the implicit MX "the domain
      itself, preference 0"; a lone ``MX 0 .`` is a null MX (RFC 7505);
      MX targets that are IP literals or invalid host names are skipped
      with a warning; MX hosts whose address lookup fails are skipped; the
      total number of addresses is capped at ``smtp_mx_address_limit``.
    * ``addresses()`` returns A records first, then AAAA, as permitted by
      ``inet_protocols`` ("all", "ipv4" or "ipv6"); an IP literal is
      returned as is.  It never returns an empty list: no address at all
      is a :class:`DnsError` (4.4.3 if a lookup failed temporarily, else
      5.4.4 "Host not found" / "No address associated with hostname").
    * ``mx_hosts()`` errors: NXDOMAIN → 5.4.4, SERVFAIL/timeout → 4.4.3,
      null MX → 5.1.10, no usable MX host → 5.4.4 (4.4.3 if any MX host's
      address lookup failed temporarily).

Failure modes
    Every failure that callers must act on is a :class:`DnsError` carrying
    ``temporary`` (retry later), an RFC 3463 ``status`` and a Postfix-style
    ``text`` ("Host or domain name not found. Name service error for
    name=example.com type=MX: Host not found, try again").  dnspython and
    socket exceptions are translated in one place, :func:`_classify`;
    anything unrecognised counts as a temporary failure.  ``lookup()``
    returns ``[]`` for NXDOMAIN/NODATA and raises only for temporary or
    malformed-name failures.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Callable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["DnsError", "MxHost", "Resolver", "parse_nameserver"]

_logger = logging.getLogger(__name__)

NEGATIVE_TTL_DEFAULT = 60.0
MAX_CACHE_TTL = 86400.0
CACHE_MAX_ENTRIES = 10000

# Postfix dns_strerror() wording.
_TXT_NOTFOUND = "Host not found"
_TXT_AGAIN = "Host not found, try again"
_TXT_NODATA = "No address associated with hostname"
_TXT_MALFORMED = "Malformed or unexpected name server reply"
_TXT_BADNAME = "Malformed domain name"


class DnsError(Exception):
    """A DNS failure as the delivery agents report it.

    ``temporary`` — retry later (4.x.x) or give up (5.x.x); ``status`` — the
    RFC 3463 enhanced status code; ``text`` — the human-readable reason.
    """

    def __init__(self, temporary: bool, status: str, text: str):
        super().__init__(text)
        self.temporary = temporary
        self.status = status
        self.text = text

    def __repr__(self) -> str:
        return f"DnsError({self.temporary!r}, {self.status!r}, {self.text!r})"


@dataclass(frozen=True)
class MxHost:
    """One mail exchanger with the addresses to try, in order."""

    preference: int
    hostname: str
    addresses: tuple[str, ...]


def _not_found_text(name: str, rdtype: str, why: str) -> str:
    return (
        "Host or domain name not found. "
        f"Name service error for name={name} type={rdtype}: {why}"
    )


def parse_nameserver(spec: str) -> tuple[str, int]:
    """Parse ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6
    address into ``(ip, port)``.  Raises :class:`ValueError` when the host is
    not an IP address (a resolver needs addresses, not names)."""
    spec = spec.strip()
    port = 53
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ValueError(f"malformed nameserver {spec!r}")
        host, rest = spec[1:end], spec[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"malformed nameserver {spec!r}")
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, _, p = spec.partition(":")
        if not p.isdigit():
            raise ValueError(f"malformed nameserver {spec!r}")
        port = int(p)
    else:
        host = spec
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver must be an IP address: {spec!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver port: {spec!r}")
    return host, port


_LABEL_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _is_ip_literal(name: str) -> bool:
    candidate = name.strip("[]")
    if candidate.lower().startswith("ipv6:"):
        candidate = candidate[5:]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def valid_hostname(name: str) -> bool:
    """Postfix valid_hostname(): LDH(+underscore) labels of 1..63 octets,
    at most 255 octets in total, not all-numeric."""
    name = name.rstrip(".")
    if not name or len(name) > 255:
        return False
    labels = name.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return False
    return not name.replace(".", "").isdigit()


# --- one DNS answer, as cached --------------------------------------------

_OK, _NXDOMAIN, _NODATA, _TEMP, _INVALID = "ok", "nxdomain", "nodata", "temp", "invalid"


@dataclass(frozen=True)
class _Result:
    kind: str
    rdatas: tuple = ()
    ttl: float = 0.0
    why: str = ""


def _negative_ttl(response) -> float:
    if response is None:
        return NEGATIVE_TTL_DEFAULT
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_DEFAULT


def _classify(exc: BaseException) -> _Result:
    """THE translation point for dnspython/socket exceptions."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses = exc.kwargs.get("responses") or {}
        response = next(iter(responses.values()), None)
        return _Result(_NXDOMAIN, ttl=_negative_ttl(response), why=_TXT_NOTFOUND)
    if isinstance(exc, dns.resolver.NoAnswer):
        response = exc.kwargs.get("response")
        return _Result(_NODATA, ttl=_negative_ttl(response), why=_TXT_NODATA)
    if isinstance(exc, (dns.resolver.NoNameservers, dns.exception.Timeout, OSError)):
        return _Result(_TEMP, why=_TXT_AGAIN)
    if isinstance(
        exc,
        (
            dns.name.EmptyLabel,
            dns.name.LabelTooLong,
            dns.name.NameTooLong,
            dns.name.BadEscape,
            dns.name.IDNAException,
            dns.exception.SyntaxError,
            dns.resolver.YXDOMAIN,
            UnicodeError,
        ),
    ):
        return _Result(_INVALID, why=_TXT_BADNAME)
    # Unknown (a bug, a new dnspython exception, ...): temporary.
    return _Result(_TEMP, why=f"{_TXT_AGAIN} ({type(exc).__name__}: {exc})")


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


class Resolver:
    """Caching asynchronous resolver (see the module docstring).

    ``nameservers``: ``["192.0.2.1", "127.0.0.1:5353", "[::1]:53"]``; ``None``
    reads the system configuration (``/etc/resolv.conf``).  ``timeout`` is the
    total time allowed for one lookup (dnspython ``lifetime``).
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        timeout: float = 10.0,
        inet_protocols: str = "all",
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
        smtp_mx_address_limit: int = 5,
    ):
        if inet_protocols not in ("all", "ipv4", "ipv6"):
            raise ValueError(f"bad inet_protocols: {inet_protocols!r}")
        self._log = log or _logger.warning
        if nameservers is None:
            try:
                self._resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                self._log("no usable /etc/resolv.conf: using nameserver 127.0.0.1")
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = ["127.0.0.1"]
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            parsed = [parse_nameserver(ns) for ns in nameservers]
            if not parsed:
                raise ValueError("empty nameserver list")
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in parsed
            ]
        self._resolver.cache = None  # we cache ourselves
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(2.0, timeout)
        self.timeout = timeout
        self.inet_protocols = inet_protocols
        self.smtp_mx_address_limit = smtp_mx_address_limit
        self._clock = clock
        self._rng = rng or random.Random()
        self._cache: dict[tuple[str, str], tuple[float, _Result]] = {}

    # -- low level -----------------------------------------------------

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _query(self, name: str, rdtype: str) -> _Result:
        key = (_normalize(name), rdtype.upper())
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[key]
        try:
            qname = dns.name.from_text(key[0] or ".")
            answer = await self._resolver.resolve(
                qname, key[1], search=False, raise_on_no_answer=False
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # translated in _classify
            result = _classify(exc)
        else:
            if answer.rrset is None:
                result = _Result(
                    _NODATA, ttl=_negative_ttl(answer.response), why=_TXT_NODATA
                )
            else:
                ttl = min(
                    [answer.rrset.ttl] + [r.ttl for r in answer.response.answer]
                )
                result = _Result(_OK, tuple(answer.rrset), float(ttl))
        if result.kind in (_OK, _NXDOMAIN, _NODATA) and result.ttl > 0:
            self._store(key, result, now)
        return result

    def _store(self, key: tuple[str, str], result: _Result, now: float) -> None:
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[k]
            while len(self._cache) >= CACHE_MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + min(result.ttl, MAX_CACHE_TTL), result)

    # -- public API ----------------------------------------------------

    async def lookup(self, name: str, rdtype: str) -> list[str]:
        """Records of ``rdtype`` for ``name`` as text.

        A/AAAA: addresses; PTR/CNAME/NS: host names without the trailing
        dot; MX: "preference host"; TXT: the character-strings concatenated
        and decoded (UTF-8, replacement on error); other types: the
        presentation form.  NXDOMAIN and NODATA give ``[]``.
        """
        rdtype = rdtype.upper()
        result = await self._query(name, rdtype)
        if result.kind == _OK:
            return [_rdata_text(rdtype, r) for r in result.rdatas]
        if result.kind in (_NXDOMAIN, _NODATA):
            return []
        raise self._error(result, _normalize(name), rdtype)

    async def addresses(self, hostname: str) -> list[str]:
        """The addresses of ``hostname`` per ``inet_protocols`` (A first).

        Raises :class:`DnsError`: temporary (4.4.3) when no address was found
        and a lookup failed temporarily; permanent (5.4.4) when the host does
        not exist or has no address records.
        """
        host = hostname.strip().strip("[]")
        if _is_ip_literal(host):
            if host.lower().startswith("ipv6:"):
                host = host[5:]
            ip = ipaddress.ip_address(host)
            if (ip.version == 4 and self.inet_protocols == "ipv6") or (
                ip.version == 6 and self.inet_protocols == "ipv4"
            ):
                raise DnsError(
                    False, "5.4.4", f"address family of {host} is disabled"
                )
            return [str(ip)]
        name = _normalize(host)
        types = {"all": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}[
            self.inet_protocols
        ]
        results = await asyncio.gather(*(self._query(name, t) for t in types))
        found = [
            _rdata_text(t, r)
            for t, res in zip(types, results)
            if res.kind == _OK
            for r in res.rdatas
        ]
        if found:
            return found
        for t, res in zip(types, results):
            if res.kind == _TEMP:
                raise self._error(res, name, t)
        for t, res in zip(types, results):
            if res.kind == _INVALID:
                raise self._error(res, name, t)
        # NXDOMAIN beats NODATA in the explanation.
        for t, res in zip(types, results):
            if res.kind == _NXDOMAIN:
                raise self._error(res, name, t)
        raise self._error(results[0], name, types[0])

    async def mx_hosts(
        self,
        domain: str,
        smtp_mx_address_limit: int | None = None,
        rng: random.Random | None = None,
    ) -> list[MxHost]:
        """Mail exchangers of ``domain`` with their addresses, best first.

        See the module docstring for the rules; raises :class:`DnsError`.
        """
        limit = smtp_mx_address_limit
        if limit is None:
            limit = self.smtp_mx_address_limit
        if limit <= 0:
            limit = 1 << 30  # Postfix: 0 means no limit
        rng = rng or self._rng
        name = _normalize(domain)
        result = await self._query(name, "MX")
        if result.kind == _NXDOMAIN:
            raise DnsError(False, "5.4.4", _not_found_text(name, "MX", _TXT_NOTFOUND))
        if result.kind == _TEMP:
            raise DnsError(True, "4.4.3", _not_found_text(name, "MX", result.why))
        if result.kind == _INVALID:
            raise DnsError(False, "5.4.4", _not_found_text(name, "MX", result.why))
        if result.kind == _NODATA:
            addrs = await self.addresses(name)
            return [MxHost(0, name, tuple(addrs[:limit]))]

        records = list(result.rdatas)
        if len(records) == 1 and records[0].exchange == dns.name.root:
            raise DnsError(
                False, "5.1.10", f"Domain {name} does not accept mail (nullMX)"
            )
        candidates: list[tuple[int, str]] = []
        for rr in records:
            host = rr.exchange.to_text(omit_final_dot=True)
            if rr.exchange == dns.name.root:
                self._log(f"ignoring null MX record among others for domain {name}")
                continue
            if _is_ip_literal(host):
                self._log(
                    f"numeric domain name in resource data of MX record "
                    f"for {name}: {host}"
                )
                continue
            if not valid_hostname(host):
                self._log(f"invalid host name in MX record for {name}: {host!r}")
                continue
            candidates.append((int(rr.preference), host.lower()))
        if not candidates:
            raise DnsError(False, "5.4.4", _not_found_text(name, "MX", _TXT_MALFORMED))

        # Sort first so that the result depends only on the rng, not on the
        # order the server sent; then shuffle and stable-sort by preference.
        candidates = sorted(set(candidates))
        rng.shuffle(candidates)
        candidates.sort(key=lambda c: c[0])

        hosts: list[MxHost] = []
        total = 0
        last_temp: DnsError | None = None
        last_perm: DnsError | None = None
        for pref, host in candidates:
            if total >= limit:
                break
            try:
                addrs = await self.addresses(host)
            except DnsError as err:
                self._log(f"skipping MX host {host} for {name}: {err.text}")
                if err.temporary:
                    last_temp = err
                else:
                    last_perm = err
                continue
            addrs = addrs[: limit - total]
            total += len(addrs)
            hosts.append(MxHost(pref, host, tuple(addrs)))
        if hosts:
            return hosts
        self._log(f"no MX host for {name} has a valid address record")
        if last_temp is not None:
            raise DnsError(True, "4.4.3", last_temp.text)
        assert last_perm is not None
        raise DnsError(False, "5.4.4", last_perm.text)

    # -- helpers -------------------------------------------------------

    @staticmethod
    def _error(result: _Result, name: str, rdtype: str) -> DnsError:
        if result.kind == _TEMP:
            return DnsError(True, "4.4.3", _not_found_text(name, rdtype, result.why))
        return DnsError(
            False, "5.4.4", _not_found_text(name, rdtype, result.why or _TXT_NOTFOUND)
        )


def _rdata_text(rdtype: str, rdata) -> str:
    if rdtype in ("A", "AAAA"):
        return rdata.address
    if rdtype in ("PTR", "CNAME", "NS", "DNAME"):
        return rdata.target.to_text(omit_final_dot=True)
    if rdtype == "MX":
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}"
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()
