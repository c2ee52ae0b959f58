"""Configuration: one typed, immutable :class:`Config` from ``config.toml``.

Postfix's main.cf and master.cf in one TOML file.  Top-level keys are Postfix
parameter names with Postfix defaults; ``[services.NAME]`` tables are the
master.cf equivalent (listeners).  Values may reference other parameters as
``$name`` or ``${name}``; durations take Postfix units (``300s``, ``5m``,
``5d``, ``1w``) with the parameter's default unit for bare numbers; lists are
TOML arrays or Postfix's comma/space-separated strings; booleans are TOML
booleans or ``yes``/``no``.

Contract:

* Every parameter is declared in :data:`PARAMETERS` with its kind and its
  Postfix default (as Postfix writes it, e.g. ``"$myhostname, localhost"``).
* ``Config`` is immutable: reload builds a new one.
* Any problem — unknown key, wrong type, bad unit, ``$name`` that does not
  exist, a ``$name`` cycle — raises :class:`ConfigError` whose ``str`` is one
  line naming the file and the key (with a close-match suggestion for
  misspelt names).  Callers print it; no traceback.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping


class ConfigError(Exception):
    """A configuration problem, described in one line."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


# --------------------------------------------------------------------------
# Parameter declarations


@dataclass(frozen=True, slots=True)
class Param:
    kind: str  # str | int | bool | time | size | list
    default: Any  # Postfix-style default (string for str/list/time, int/bool otherwise)
    unit: str = "s"  # default unit for bare numbers (time only)
    choices: tuple[str, ...] = ()
    doc: str = ""


def _p(kind: str, default: Any, unit: str = "s", choices: Iterable[str] = (), doc: str = "") -> Param:
    return Param(kind, default, unit, tuple(choices), doc)


PARAMETERS: dict[str, Param] = {
    # --- identity (postconf(5)) ---
    "myhostname": _p("str", "", doc="system FQDN when empty"),
    "mydomain": _p("str", "", doc="myhostname minus its first label when empty"),
    "myorigin": _p("str", "$myhostname"),
    "mydestination": _p("list", "$myhostname, localhost.$mydomain, localhost"),
    "mynetworks": _p("list", "127.0.0.0/8, [::1]/128"),
    "relay_domains": _p("list", ""),
    "relayhost": _p("str", ""),
    "inet_interfaces": _p("list", "all"),
    "inet_protocols": _p("str", "all", choices=("all", "ipv4", "ipv6")),
    "mail_name": _p("str", "mailserver"),
    "smtpd_banner": _p("str", "$myhostname ESMTP"),
    # --- files and directories ---
    "queue_directory": _p("str", "/var/spool/mailserver"),
    "mail_spool_directory": _p("str", "/var/mail"),
    "home_mailbox": _p("str", ""),
    "alias_maps": _p("list", "hash:/etc/aliases"),
    "alias_database": _p("list", "$alias_maps"),
    "forward_path": _p("list", "$home/.forward"),
    "allow_mail_to_commands": _p("list", "alias, forward"),
    "allow_mail_to_files": _p("list", "alias, forward"),
    "local_recipient_maps": _p("list", "unix:passwd.byname $alias_maps"),
    "recipient_delimiter": _p("str", ""),
    "default_privs": _p("str", "nobody"),
    "command_time_limit": _p("time", "1000s"),
    "maillog_file": _p("str", ""),
    "maillog_syslog_prefix": _p("bool", True, doc="prefix log lines with 'Mon DD HH:MM:SS host'"),
    "syslog_name": _p("str", "mailserver"),
    "pid_file": _p("str", "$queue_directory/pid/master.pid"),
    # --- virtual mailboxes ---
    "virtual_mailbox_domains": _p("list", "$virtual_mailbox_maps"),
    "virtual_mailbox_base": _p("str", ""),
    "virtual_mailbox_maps": _p("list", ""),
    "virtual_uid_maps": _p("list", ""),
    "virtual_gid_maps": _p("list", ""),
    "virtual_minimum_uid": _p("int", 100),
    "virtual_alias_domains": _p("list", "$virtual_alias_maps"),
    "virtual_alias_maps": _p("list", ""),
    "virtual_alias_recursion_limit": _p("int", 1000),
    "virtual_alias_expansion_limit": _p("int", 1000),
    # --- routing ---
    "transport_maps": _p("list", ""),
    "default_transport": _p("str", "smtp"),
    "local_transport": _p("str", "local:$myhostname"),
    "virtual_transport": _p("str", "virtual"),
    "relay_transport": _p("str", "relay"),
    "dns_nameservers": _p("list", "", doc="host[:port] list instead of /etc/resolv.conf"),
    "smtp_tcp_port": _p("int", 25),
    # --- smtpd limits ---
    "message_size_limit": _p("size", 10240000),
    "smtpd_recipient_limit": _p("int", 1000),
    "hopcount_limit": _p("int", 50),
    "header_size_limit": _p("size", 102400),
    "line_length_limit": _p("int", 2048),
    "smtpd_timeout": _p("time", "300s"),
    "smtpd_forbid_bare_newline": _p("str", "reject", choices=("reject", "normalize")),
    "smtpd_forbid_unauth_pipelining": _p("bool", True, doc="554 and disconnect a client that sends ahead "
                                                           "without PIPELINING (Postfix 3.9+)"),
    "smtpd_helo_required": _p("bool", False),
    "smtpd_peername_lookup": _p("bool", True),
    "queue_minfree": _p("size", 0),
    "smtpd_soft_error_limit": _p("int", 10),
    "smtpd_hard_error_limit": _p("int", 20),
    "always_add_missing_headers": _p("bool", False),
    # --- smtpd: TLS and SASL (issue: the SMTP edge) ---
    "smtpd_tls_cert_file": _p("str", ""),
    "smtpd_tls_key_file": _p("str", "$smtpd_tls_cert_file"),
    "smtpd_tls_protocols": _p("list", ">=TLSv1.2"),
    "smtpd_tls_auth_only": _p("bool", True),
    "smtpd_tls_received_header": _p("bool", True),
    "smtpd_sasl_password_maps": _p("str", "", doc="passwd-file:/path (Dovecot passwd-file format)"),
    "smtpd_auth_failure_limit": _p("int", 3),
    "smtpd_sender_login_maps": _p("list", ""),
    # --- smtpd: restrictions (smtpd(8), postconf(5)) ---
    "smtpd_client_restrictions": _p("list", ""),
    "smtpd_helo_restrictions": _p("list", ""),
    "smtpd_sender_restrictions": _p("list", ""),
    "smtpd_relay_restrictions": _p("list", "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"),
    "smtpd_recipient_restrictions": _p("list", ""),
    "smtpd_data_restrictions": _p("list", ""),
    "smtpd_end_of_data_restrictions": _p("list", ""),
    "smtpd_etrn_restrictions": _p("list", ""),
    "smtpd_delay_reject": _p("bool", True),
    "smtpd_restriction_classes": _p("list", ""),
    "smtpd_reject_unlisted_recipient": _p("bool", True),
    "smtpd_reject_unlisted_sender": _p("bool", False),
    "smtpd_policy_hooks": _p("list", "", doc="Python policy hooks registered by name"),
    "smtpd_policy_service_timeout": _p("time", "100s"),
    "parent_domain_matches_subdomains": _p("list", "debug_peer_list, fast_flush_domains, mynetworks, "
                                                   "permit_mx_backup_networks, qmqpd_authorized_clients, "
                                                   "relay_domains, smtpd_access_maps"),
    "reject_code": _p("int", 554),
    "defer_code": _p("int", 450),
    "relay_domains_reject_code": _p("int", 554),
    "access_map_reject_code": _p("int", 554),
    "access_map_defer_code": _p("int", 450),
    "invalid_hostname_reject_code": _p("int", 501),
    "non_fqdn_reject_code": _p("int", 504),
    "unknown_address_reject_code": _p("int", 450),
    "unknown_client_reject_code": _p("int", 450),
    "unknown_hostname_reject_code": _p("int", 450),
    "unknown_local_recipient_reject_code": _p("int", 550),
    "unknown_virtual_alias_reject_code": _p("int", 550),
    "unknown_virtual_mailbox_reject_code": _p("int", 550),
    "unknown_relay_recipient_reject_code": _p("int", 550),
    "maps_rbl_reject_code": _p("int", 554),
    "plaintext_reject_code": _p("int", 450),
    "unverified_sender_reject_code": _p("int", 450),
    "reject_tempfail_action": _p("str", "defer_if_permit"),
    "unknown_helo_hostname_tempfail_action": _p("str", "$reject_tempfail_action"),
    "unknown_address_tempfail_action": _p("str", "$reject_tempfail_action"),
    "header_checks": _p("list", ""),
    "body_checks": _p("list", ""),
    "body_checks_size_limit": _p("size", 51200),
    # --- smtpd: abuse limits (anvil(8)) ---
    "smtpd_client_connection_count_limit": _p("int", 50),
    "smtpd_client_connection_rate_limit": _p("int", 0),
    "smtpd_client_message_rate_limit": _p("int", 0),
    "smtpd_client_recipient_rate_limit": _p("int", 0),
    "smtpd_client_auth_rate_limit": _p("int", 0),
    "smtpd_client_event_limit_exceptions": _p("list", "$mynetworks"),
    "anvil_rate_time_unit": _p("time", "60s"),
    "smtpd_process_limit": _p("int", 5000, doc="global concurrent SMTP sessions (master.cf maxproc; "
                                               "one process here, so a connection cap)"),
    "smtpd_stress_threshold": _p("int", 0, doc="sessions above which timeouts shrink (0: 80% of smtpd_process_limit)"),
    "smtpd_stress_timeout": _p("time", "10s"),
    "smtpd_session_time_limit": _p("time", "3600s", doc="absolute per-session deadline"),
    "smtpd_error_sleep_time": _p("time", "1s"),
    "smtpd_junk_command_limit": _p("int", 100),
    # --- operations (issue: operating it) ---
    "syslog_facility": _p("str", "mail"),
    "maillog_format": _p("str", "text", choices=("text", "json")),
    "maillog_to_syslog": _p("bool", False),
    "control_socket": _p("str", "$queue_directory/public/control"),
    "pickup_poll_interval": _p("time", "1s"),
    "stop_timeout": _p("time", "10s"),
    # --- performance ---
    "event_loop": _p("str", "asyncio", choices=("asyncio", "uvloop")),
    "io_engine": _p("str", "auto", choices=("auto", "io_uring", "threads"),
                    doc="queue file I/O: io_uring (Linux), worker threads, or auto (io_uring where the kernel allows it)"),
    # --- queue manager ---
    "minimal_backoff_time": _p("time", "300s"),
    "maximal_backoff_time": _p("time", "4000s"),
    "queue_run_delay": _p("time", "300s"),
    "maximal_queue_lifetime": _p("time", "5d", unit="d"),
    "bounce_queue_lifetime": _p("time", "5d", unit="d"),
    "delay_warning_time": _p("time", "0h", unit="h"),
    "qmgr_message_active_limit": _p("int", 20000),
    "initial_destination_concurrency": _p("int", 5),
    "default_destination_concurrency_limit": _p("int", 20),
    "default_destination_recipient_limit": _p("int", 50),
    "local_destination_concurrency_limit": _p("int", 2),
    "local_destination_recipient_limit": _p("int", 1),
    "default_process_limit": _p("int", 100),
    "defer_transports": _p("list", "", doc="transports that do not deliver until a flush"),
    # --- bounces ---
    "bounce_size_limit": _p("size", 50000),
    "notify_classes": _p("list", "resource, software"),
    "bounce_notice_recipient": _p("str", "postmaster"),
    "2bounce_notice_recipient": _p("str", "postmaster"),
    "delay_notice_recipient": _p("str", "postmaster"),
    "double_bounce_sender": _p("str", "double-bounce"),
    # --- smtp client ---
    "smtp_connect_timeout": _p("time", "30s"),
    "smtp_helo_timeout": _p("time", "300s"),
    "smtp_mail_timeout": _p("time", "300s"),
    "smtp_rcpt_timeout": _p("time", "300s"),
    "smtp_data_init_timeout": _p("time", "120s"),
    "smtp_data_xfer_timeout": _p("time", "180s"),
    "smtp_data_done_timeout": _p("time", "600s"),
    "smtp_quit_timeout": _p("time", "300s"),
    "smtp_mx_address_limit": _p("int", 5),
    "smtp_tls_security_level": _p("str", "may", choices=("none", "may", "encrypt", "verify", "secure")),
    "smtp_tls_CAfile": _p("str", ""),
    "lmtp_tls_security_level": _p("str", "none", choices=("none", "may", "encrypt", "verify", "secure")),
    "lmtp_tcp_port": _p("int", 24, doc="port of an LMTP next hop that names none"),
    "smtp_connection_cache_time_limit": _p("time", "2s"),
    "smtp_connection_reuse_time_limit": _p("time", "300s"),
    "dns_timeout": _p("time", "10s"),
}

SERVICE_KEYS = {"listen", "tls", "auth", "type"}
# Names expanded at delivery time, not at load time (local(8) forward_path).
LATE_BOUND: dict[str, frozenset[str]] = {
    "forward_path": frozenset({"home", "user", "local", "extension", "recipient", "domain", "shell"}),
}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


@dataclass(frozen=True, slots=True)
class Service:
    """One listener (a master.cf ``smtp inet`` line)."""

    name: str
    listen: tuple[str, ...]
    tls: str = "none"
    auth: str = "none"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def endpoints(self) -> list[tuple[str, int]]:
        return [parse_hostport(item, default_port=25) for item in self.listen]


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


# --------------------------------------------------------------------------
# Value conversion


def parse_time(value: Any, unit: str = "s") -> float:
    """Postfix time value → seconds (``300s``, ``5m``, ``1h``, ``5d``, ``1w``)."""
    if isinstance(value, bool):
        raise ValueError("expected a time value")
    if isinstance(value, (int, float)):
        return float(value) * _TIME_UNITS[unit]
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
    if not m:
        raise ValueError(f"bad time value {value!r} (use e.g. 300s, 5m, 2h, 5d)")
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or unit]


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", str(value))
    if not m:
        raise ValueError(f"bad size {value!r} (bytes)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "1", "on"):
        return True
    if text in ("no", "false", "0", "off"):
        return False
    raise ValueError(f"bad boolean {value!r} (use yes or no)")


def split_list(value: Any) -> list[str]:
    """A TOML array, or Postfix's comma/whitespace-separated string.

    Braced groups (``inline:{ a=b, c=d }``) stay in one item, as Postfix does.
    """
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"list items must be strings, not {type(item).__name__}")
            out.extend(split_list(item) if _has_separators(item) else [item.strip()] if item.strip() else [])
        return out
    if not isinstance(value, str):
        raise ValueError(f"expected a list or string, not {type(value).__name__}")
    items, depth, cur = [], 0, []
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (ch in ", \t\r\n"):
            if cur:
                items.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        items.append("".join(cur))
    return items


def _has_separators(item: str) -> bool:
    # "inline:{ a=b }" inside an array keeps its spaces; plain words split.
    return ("," in item or " " in item) and "{" not in item


# --------------------------------------------------------------------------
# Derived defaults


def system_hostname() -> str:
    """Postfix: gethostname(), made fully qualified when the resolver knows how."""
    name = socket.gethostname() or "localhost"
    if "." not in name:
        fqdn = socket.getfqdn(name)
        if "." in fqdn and not fqdn.startswith("localhost"):
            name = fqdn
    return name.lower().rstrip(".")


def _derived_defaults(hostname: str | None = None) -> dict[str, str]:
    return {"myhostname": hostname or system_hostname()}


# --------------------------------------------------------------------------
# The Config object


class Config:
    """An immutable, typed configuration.

    ``config.NAME`` returns the typed value of parameter NAME (``$name``
    references expanded; durations in seconds as float; lists as tuples).
    ``config.raw(NAME)`` returns the expanded text as ``postconf`` prints it.
    """

    __slots__ = ("_values", "_raw", "_explicit", "_given", "services", "source")

    def __init__(self, params: Mapping[str, Any] | None = None, *, services: Mapping[str, Any] | None = None,
                 source: str = "<config>", hostname: str | None = None, **kwparams: Any):
        merged = dict(params or {})
        merged.update(kwparams)
        object.__setattr__(self, "source", source)
        values, raw, explicit = _build(merged, source, hostname)
        object.__setattr__(self, "_values", MappingProxyType(values))
        object.__setattr__(self, "_raw", MappingProxyType(raw))
        object.__setattr__(self, "_explicit", frozenset(explicit))
        object.__setattr__(self, "_given", MappingProxyType(merged))
        text = values.pop("_text")
        object.__setattr__(self, "services", _build_services(services or {}, source, text))

    # construction -------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, *, hostname: str | None = None,
                  environ: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Read ``path``; ``overrides`` (Postfix names) win over the file.
        With ``environ`` (the CLI passes ``os.environ``), ``MAILSERVER_<PARAM>``
        variables override the file too (see :func:`environment_overrides`)."""
        path = os.fspath(path)
        if environ is not None:
            overrides = {**environment_overrides(environ, source=path), **overrides}
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("configuration file not found", source=path) from None
        except OSError as exc:
            raise ConfigError(f"cannot read configuration: {exc.strerror}", source=path) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"TOML syntax error: {exc}", source=path) from None
        return cls.from_mapping(data, source=path, hostname=hostname, **overrides)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "<config>", hostname: str | None = None,
                     **overrides: Any) -> "Config":
        data = dict(data)
        services = data.pop("services", {})
        if not isinstance(services, dict):
            raise ConfigError("'services' must be a table of [services.NAME] tables", key="services", source=source)
        data.update(overrides)
        return cls(data, services=services, source=source, hostname=hostname)

    def replace(self, **changes: Any) -> "Config":
        """A new Config with some parameters changed (for tests and embedding)."""
        params = dict(self._given)
        services = changes.pop("services", None)
        params.update(changes)
        svc = services if services is not None else {
            s.name: {"listen": list(s.listen), "tls": s.tls, "auth": s.auth, **dict(s.overrides)} for s in self.services
        }
        return Config(params, services=svc, source=self.source, hostname=self._values["myhostname"])

    # access ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is immutable; use Config.replace()")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def raw(self, name: str) -> str:
        return self._raw[name]

    def is_explicit(self, name: str) -> bool:
        return name in self._explicit

    def names(self) -> list[str]:
        return sorted(self._values)

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"Config(source={self.source!r}, myhostname={self._values['myhostname']!r})"


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _build(given: Mapping[str, Any], source: str, hostname: str | None) -> tuple[dict, dict, set]:
    classes = set(split_list(given.get("smtpd_restriction_classes", ""))) if isinstance(
        given.get("smtpd_restriction_classes", ""), (str, list)) else set()
    # smtpd_restriction_classes names become list parameters (Postfix restriction classes).
    specs = dict(PARAMETERS)
    specs.update({name: Param("list", "") for name in classes if name not in PARAMETERS})
    for key in given:
        if key not in specs:
            raise ConfigError(f"unknown parameter '{key}'{_suggest(key, PARAMETERS)}", key=key, source=source)
    # Check the shape of given values before expansion so type errors name the key.
    for key, value in given.items():
        kind = specs[key].kind
        if isinstance(value, dict):
            raise ConfigError(f"parameter '{key}' must be a value, not a table", key=key, source=source)
        if kind == "list" and not isinstance(value, (str, list)):
            raise ConfigError(f"parameter '{key}' must be a list or a string, not {type(value).__name__}",
                              key=key, source=source)
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ConfigError(f"parameter '{key}': list items must be strings", key=key, source=source)
        if kind in ("str",) and not isinstance(value, str):
            raise ConfigError(f"parameter '{key}' must be a string, not {type(value).__name__}", key=key, source=source)
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise ConfigError(f"parameter '{key}' must be an integer, not {type(value).__name__}", key=key, source=source)

    text: dict[str, str] = {}
    for key, spec in specs.items():
        text[key] = _to_text(given[key]) if key in given else _to_text(spec.default)
    derived = _derived_defaults(hostname)
    if not text["myhostname"]:
        text["myhostname"] = derived["myhostname"]
    if not text["mydomain"]:
        host = _expand_one("myhostname", text, source, ())
        text["mydomain"] = host.split(".", 1)[1] if "." in host else "localdomain"

    expanded: dict[str, str] = {}
    for key in specs:
        expanded[key] = _expand_one(key, text, source, ())

    values: dict[str, Any] = {}
    for key, spec in specs.items():
        raw_value = given.get(key, None)
        try:
            values[key] = _convert(spec, expanded[key], raw_value)
        except ValueError as exc:
            raise ConfigError(f"parameter '{key}': {exc}", key=key, source=source) from None
    _check_semantics(values, source)
    values["_text"] = text  # for $name expansion in service overrides; removed by Config
    return values, expanded, set(given)


def _expand_one(key: str, text: Mapping[str, str], source: str, stack: tuple[str, ...]) -> str:
    if key in stack:
        raise ConfigError(f"parameter '{stack[0]}': recursive reference to ${key}", key=stack[0], source=source)
    value = text[key]

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in text and name in LATE_BOUND.get(stack[0] if stack else key, ()):
            return m.group(0)
        if name not in text:
            raise ConfigError(f"parameter '{stack[0] if stack else key}' references undefined ${name}"
                              f"{_suggest(name, PARAMETERS)}", key=stack[0] if stack else key, source=source)
        return _expand_one(name, text, source, stack + (key,))

    return _VAR.sub(sub, value) if "$" in value else value


def _convert(spec: Param, text: str, given: Any) -> Any:
    kind = spec.kind
    if kind == "str":
        if spec.choices and text not in spec.choices:
            raise ValueError(f"must be one of {', '.join(spec.choices)}, not {text!r}")
        return text
    if kind == "int":
        if isinstance(given, int) and not isinstance(given, bool):
            return given
        if not re.fullmatch(r"-?\d+", text.strip()):
            raise ValueError(f"expected an integer, not {text!r}")
        return int(text)
    if kind == "bool":
        return parse_bool(given if isinstance(given, bool) else text)
    if kind == "time":
        return parse_time(given if isinstance(given, (int, float)) and not isinstance(given, bool) else text,
                          spec.unit)
    if kind == "size":
        return parse_size(given if isinstance(given, int) and not isinstance(given, bool) else text)
    if kind == "list":
        return tuple(split_list(text))
    raise AssertionError(kind)


def _check_semantics(values: Mapping[str, Any], source: str) -> None:
    for net in values["mynetworks"]:
        try:
            parse_network(net)
        except ValueError:
            raise ConfigError(f"parameter 'mynetworks': bad network {net!r}", key="mynetworks", source=source) from None
    for key in ("message_size_limit", "smtpd_recipient_limit", "qmgr_message_active_limit",
                "default_destination_recipient_limit", "initial_destination_concurrency"):
        if values[key] < 0:
            raise ConfigError(f"parameter '{key}' must not be negative", key=key, source=source)
    if values["minimal_backoff_time"] > values["maximal_backoff_time"]:
        raise ConfigError("parameter 'minimal_backoff_time' is larger than maximal_backoff_time",
                          key="minimal_backoff_time", source=source)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``127.0.0.0/8``, ``[::1]/128``, ``192.0.2.1`` → network."""
    t = text.strip()
    if t.startswith("["):
        t = t.replace("[", "").replace("]", "")
    return ipaddress.ip_network(t, strict=False)


def _build_services(services: Mapping[str, Any], source: str, text: Mapping[str, str]) -> tuple[Service, ...]:
    out = []
    for name, table in services.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[services.{name}] must be a table", key=f"services.{name}", source=source)
        listen = table.get("listen")
        if listen is None:
            raise ConfigError(f"[services.{name}] needs 'listen'", key=f"services.{name}.listen", source=source)
        try:
            items = tuple(split_list(listen))
            for item in items:
                parse_hostport(item, 25)
        except ValueError as exc:
            raise ConfigError(f"[services.{name}] listen: {exc}", key=f"services.{name}.listen", source=source) from None
        tls = table.get("tls", "none")
        auth = table.get("auth", "none")
        if tls not in ("none", "may", "required", "implicit"):
            raise ConfigError(f"[services.{name}] tls must be none, may, required or implicit", key=f"services.{name}.tls",
                              source=source)
        if auth not in ("none", "optional", "required"):
            raise ConfigError(f"[services.{name}] auth must be none, optional or required", key=f"services.{name}.auth",
                              source=source)
        overrides = {}
        for key, value in table.items():
            if key in SERVICE_KEYS:
                continue
            if key not in PARAMETERS:
                raise ConfigError(f"[services.{name}] unknown key '{key}'{_suggest(key, list(PARAMETERS) + list(SERVICE_KEYS))}",
                                  key=f"services.{name}.{key}", source=source)
            if isinstance(value, list) and not all(isinstance(item, str) for item in value):
                raise ConfigError(f"[services.{name}] {key}: list items must be strings",
                                  key=f"services.{name}.{key}", source=source)
            # Overrides are expanded like master.cf -o values: $name refers to main parameters.
            scope = dict(text)
            scope["__override__"] = _to_text(value)
            try:
                expanded_value = _expand_one("__override__", scope, source, ())
            except ConfigError as exc:
                raise ConfigError(str(exc).split(": ", 1)[-1].replace("'__override__'", f"'{key}'"),
                                  key=f"services.{name}.{key}", source=source) from None
            try:
                overrides[key] = _convert(PARAMETERS[key], expanded_value, value)
            except ValueError as exc:
                raise ConfigError(f"[services.{name}] {key}: {exc}", key=f"services.{name}.{key}", source=source) from None
        out.append(Service(name, items, tls, auth, MappingProxyType(overrides)))
    return tuple(out)


ENV_PREFIX = "MAILSERVER_"


def environment_overrides(environ: Mapping[str, str], *, source: str = "<environment>") -> dict[str, Any]:
    """``MAILSERVER_<PARAM>`` variables as parameter overrides (containers).

    The name is the Postfix parameter in upper case (``MAILSERVER_MYHOSTNAME``,
    ``MAILSERVER_SMTP_TLS_CAFILE``); the value is typed like the TOML value
    (lists comma-separated, booleans yes/no).  ``MAILSERVER_<PARAM>_FILE``
    reads the value from a file (Docker secrets), unless ``<param>_file`` is
    itself a parameter (``MAILSERVER_SMTPD_TLS_KEY_FILE`` sets
    ``smtpd_tls_key_file``).  An unknown name is a ConfigError.
    """
    by_upper = {name.upper(): name for name in PARAMETERS}
    out: dict[str, Any] = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var in ("MAILSERVER_CONFIG",):
            continue
        key = var[len(ENV_PREFIX):].upper()
        name = by_upper.get(key)
        if name is None and key.endswith("_FILE") and key[:-5] in by_upper:
            name = by_upper[key[:-5]]
            try:
                with open(value, "r", encoding="utf-8") as fh:
                    value = fh.read().strip()
            except OSError as exc:
                raise ConfigError(f"{var}: cannot read {value}: {exc.strerror}", key=name, source=source) from None
        if name is None:
            raise ConfigError(f"{var}: unknown parameter '{key.lower()}'{_suggest(key.lower(), PARAMETERS)}",
                              key=key.lower(), source="environment")
        spec = PARAMETERS[name]
        if spec.kind == "int" and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
        else:
            out[name] = value  # strings, lists ("a, b"), booleans (yes/no), times, sizes parse from text
    return out


def default_config_path() -> str:
    """The embedded default ``config.toml`` shipped inside the package."""
    return os.path.join(os.path.dirname(__file__), "default_config.toml")
