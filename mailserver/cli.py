"""The ``mailserver`` command line: thin commands over the library.

``-c CONFIG`` is a global option accepted before or after the subcommand;
without it ``$MAILSERVER_CONFIG`` (like Postfix's ``MAIL_CONFIG``), else the
embedded default configuration (``config.toml`` shipped with the package)
is used.  Configuration errors print one line and exit 78 (EX_CONFIG) —
never a traceback.

Subcommands (Postfix equivalents in brackets): ``run`` (foreground server;
SIGTERM/SIGINT stop it gracefully, SIGHUP reloads), ``check``, ``conf``
[postconf: ``-n``, ``-d``, ``NAME...``, ``-e``, ``-X``, ``-M``], ``queue``
[postqueue/postsuper/postcat/qshape: ``list``, ``show``, ``flush``,
``delete``, ``hold``, ``release``, ``requeue``, ``summary``], ``sendmail``
[sendmail], ``aliases`` [newaliases], ``map`` [postmap], ``status``,
``reload``, ``stop`` [postfix status/reload/stop], ``passwd USER``,
``install-links DIR``.  Invoked as ``sendmail``, ``mailq`` or
``newaliases`` (argv[0], e.g. a symlink) the program is that command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import sysconfig
import time

from . import __version__
from .config import PARAMETERS, Config, ConfigError, default_config_path, split_list

EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = \
    0, 64, 65, 69, 70, 73, 75, 78
QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold")
LINK_NAMES = ("sendmail", "mailq", "newaliases")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", dest="config", default=argparse.SUPPRESS,
                        help="configuration file (default: $MAILSERVER_CONFIG or the embedded config.toml)")
    parser = argparse.ArgumentParser(prog="mailserver", parents=[common],
                                     description="A Postfix-class mail transfer agent in one asyncio process.")
    parser.add_argument("--version", action="version", version=f"mailserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", parents=[common], help="run the server in the foreground")
    run.add_argument("--log-format", choices=("text", "json"), default=None,
                     help="log line format (overrides maillog_format)")
    run.add_argument("--capture", action="store_true",
                     help="test-capture mode: accept every recipient, deliver nothing, keep mail as Maildir")
    run.add_argument("--capture-dir", default="./var/capture",
                     help="where --capture keeps its queue and Maildir (default ./var/capture)")
    run.set_defaults(func=cmd_run)

    cap = sub.add_parser("capture", parents=[common], help="list mail captured by 'run --capture'")
    cap.add_argument("action", choices=("list",))
    cap.add_argument("--capture-dir", default="./var/capture")
    cap.set_defaults(func=cmd_capture)

    check = sub.add_parser("check", parents=[common], help="validate configuration, directories and permissions")
    check.set_defaults(func=cmd_check)

    conf = sub.add_parser("conf", parents=[common], help="show or edit configuration parameters (postconf)")
    conf.add_argument("-n", dest="non_default", action="store_true", help="only parameters set in the file")
    conf.add_argument("-d", dest="defaults", action="store_true", help="default values")
    conf.add_argument("-e", dest="edit", action="store_true", help="edit: NAME=VALUE ... (services.NAME.KEY=VALUE)")
    conf.add_argument("-X", dest="remove", action="store_true", help="remove the named parameters from the file")
    conf.add_argument("-M", dest="services", action="store_true", help="list services (master.cf)")
    conf.add_argument("names", nargs="*", metavar="NAME")
    conf.set_defaults(func=cmd_conf)

    queue = sub.add_parser("queue", parents=[common], help="the mail queue (postqueue, postsuper, postcat, qshape)")
    qsub = queue.add_subparsers(dest="action", metavar="ACTION")
    qsub.required = True
    ql = qsub.add_parser("list", parents=[common], help="list the queue (mailq)")
    ql.add_argument("--json", action="store_true", help="one JSON object per message (postqueue -j)")
    ql.set_defaults(func=cmd_queue_list)
    qs = qsub.add_parser("show", parents=[common], help="show a queued message (postcat -q)")
    qs.add_argument("-e", dest="envelope", action="store_true", help="envelope only")
    qs.add_argument("-H", "--header", dest="header", action="store_true", help="header only")
    qs.add_argument("-b", dest="body", action="store_true", help="body only")
    qs.add_argument("queue_id", metavar="ID")
    qs.set_defaults(func=cmd_queue_show)
    qf = qsub.add_parser("flush", parents=[common], help="deliver deferred mail now (postqueue -f, -i, -s)")
    qf.add_argument("-s", dest="site", metavar="DOMAIN", help="only mail for this destination")
    qf.add_argument("ids", nargs="*", metavar="ID")
    qf.set_defaults(func=cmd_queue_flush)
    for action, text in (("delete", "delete messages (postsuper -d)"), ("hold", "put messages on hold (postsuper -h)"),
                         ("release", "release held messages (postsuper -H)"),
                         ("requeue", "requeue messages through cleanup (postsuper -r)")):
        qa = qsub.add_parser(action, parents=[common], help=text)
        qa.add_argument("targets", nargs="+", metavar="ID|ALL|-",
                        help="queue IDs, ALL, or - (IDs on stdin); optionally followed by queue names")
        qa.set_defaults(func=cmd_queue_operation, operation=action)
    qq = qsub.add_parser("summary", parents=[common], help="queue shape by domain and age (qshape)")
    qq.add_argument("-s", dest="by_sender", action="store_true", help="sender domains instead of recipient domains")
    qq.add_argument("-n", dest="top", type=int, default=None, help="only the top N domains")
    qq.add_argument("queues", nargs="*", metavar="QUEUE", help="queues to show (default: incoming active)")
    qq.set_defaults(func=cmd_queue_summary)

    sendmail = sub.add_parser("sendmail", parents=[common], help="submit a message (sendmail)", add_help=False)
    sendmail.set_defaults(func=None)

    aliases = sub.add_parser("aliases", parents=[common], help="check and compile the alias tables (newaliases)")
    aliases.set_defaults(func=cmd_aliases)

    map_ = sub.add_parser("map", parents=[common], help="query or compile a lookup table (postmap)")
    map_.add_argument("-q", dest="query", metavar="KEY", help="look up KEY")
    map_.add_argument("table", metavar="TYPE:NAME")
    map_.set_defaults(func=cmd_map)

    status = sub.add_parser("status", parents=[common], help="is the server running? what is it doing?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    reload_ = sub.add_parser("reload", parents=[common], help="re-read the configuration and tables")
    reload_.set_defaults(func=cmd_reload)
    stop = sub.add_parser("stop", parents=[common], help="stop the running server gracefully")
    stop.set_defaults(func=cmd_stop)

    passwd = sub.add_parser("passwd", parents=[common], help="set a SASL password (read from stdin)")
    passwd.add_argument("user", metavar="USER")
    passwd.set_defaults(func=cmd_passwd)

    links = sub.add_parser("install-links", parents=[common], help="install sendmail, mailq, newaliases links")
    links.add_argument("directory", metavar="DIR")
    links.add_argument("-f", "--force", action="store_true", help="replace existing files")
    links.set_defaults(func=cmd_install_links)
    return parser


def config_path(path: str | None = None) -> str:
    return path or os.environ.get("MAILSERVER_CONFIG") or default_config_path()


def load_config(args: argparse.Namespace) -> Config:
    # MAILSERVER_<PARAM> environment variables override the file (containers).
    return Config.from_file(config_path(getattr(args, "config", None)), environ=os.environ)


def _split_sendmail(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """``mailserver [-c F] sendmail ARGS``: sendmail's options are not ours."""
    config = None
    i = 0
    while i < len(argv):
        if argv[i] in ("-c", "--config") and i + 1 < len(argv):
            config = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            config = argv[i].split("=", 1)[1]
            i += 1
        elif argv[i] == "sendmail":
            return config, argv[i + 1:]
        else:
            return None
    return None


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        prog = prog or os.path.basename(sys.argv[0])
    try:
        if prog in LINK_NAMES:
            return _main_as(prog, argv)
        split = _split_sendmail(argv)
        if split is not None:
            return _sendmail(split[1], split[0])
        args = _parser().parse_args(argv)
        return args.func(args)
    except ConfigError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _main_as(prog: str, argv: list[str]) -> int:
    """argv[0] dispatch: the program was invoked as sendmail, mailq or newaliases."""
    if prog == "sendmail":
        return _sendmail(argv, None)
    config = None
    rest = list(argv)
    if len(rest) >= 2 and rest[0] in ("-c", "-C"):
        config = rest[1]
    args = argparse.Namespace(config=config)
    if prog == "mailq":
        args.json = False
        return cmd_queue_list(args)
    return cmd_aliases(args)


def _sendmail(argv: list[str], config: str | None) -> int:
    from . import sendmail

    def load(path: str | None) -> Config:
        return Config.from_file(config_path(path or config), environ=os.environ)

    # Modes that are other commands (Postfix sendmail runs postqueue/postalias).
    try:
        parsed = sendmail.parse_args(argv)
    except sendmail.SubmitError as exc:
        print(f"sendmail: fatal: {exc}", file=sys.stderr)
        return exc.status
    args = argparse.Namespace(config=parsed.config or config)
    if parsed.mode == "p":
        args.json = False
        return cmd_queue_list(args)
    if parsed.mode == "i":
        return cmd_aliases(args)
    if parsed.mode == "q":
        args.site = parsed.flush_site
        args.ids = [parsed.flush_id] if parsed.flush_id else []
        return cmd_queue_flush(args)
    if parsed.mode == "d":
        print("sendmail: fatal: use 'mailserver run' to start the mail system", file=sys.stderr)
        return EX_USAGE
    if parsed.mode == "ignore":
        return EX_OK
    return sendmail.main(argv, load_config=load)


# ---------------------------------------------------------------- run
def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit, as Postfix's
    master does (``open_limit(INT_MAX)``): every SMTP session, queue file
    and delivery needs a descriptor, and one process holds them all (the
    common default soft limit, 1024, would cap the server near 1000
    sessions).  Returns the (soft, hard) limits now in force."""
    import resource

    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != infinity and (hard == infinity or soft < hard):
        # An "unlimited" hard limit is capped by the kernel (Linux fs.nr_open,
        # macOS kern.maxfilesperproc): try decreasing values.
        for target in ([hard] if hard != infinity else [1 << 20, 1 << 16, 10240]):
            if target <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                continue
            soft = target
            break
    return soft, hard


GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """The server process's cyclic garbage collector runs after every
    10,000 net container allocations instead of CPython's 700.  A plain-text
    session leaves no reference cycles behind (see ``SMTPSession._release``), so
    the young generation holds little but objects still in use; at 700 the
    collector ran about twice per 50 accepted messages and a full
    collection (every hundredth) stopped the event loop for ~17 ms
    (measured: 0.2 s of collector time per 10,000 messages at 700, under
    0.01 s at 10,000).  Only ``mailserver run`` does this: an application
    that embeds :class:`~mailserver.server.MailServer` keeps its own
    settings."""
    import gc

    gc.set_threshold(*GC_THRESHOLD)


def cmd_run(args: argparse.Namespace) -> int:
    from .config import environment_overrides

    path = config_path(getattr(args, "config", None))
    overrides = environment_overrides(os.environ, source=path)
    if args.log_format:
        overrides["maillog_format"] = args.log_format
    config = Config.from_file(path, **overrides)
    raise_open_file_limit()
    tune_gc()
    loop_factory = None
    if config.event_loop == "uvloop":  # optional: pip install "mailserver[uvloop]"
        try:
            import uvloop
        except ImportError:
            raise ConfigError("event_loop = uvloop, but the uvloop package is not installed",
                              key="event_loop", source=path) from None
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if args.capture:
            return runner.run(_run_capture(config, args.capture_dir))
        return runner.run(_run(config, overrides))


async def _run_capture(config: Config, directory: str) -> int:
    """``run --capture``: a developer's catch-all on the configured listeners."""
    from .server import MailServer
    from .testing import CAPTURE_TRANSPORT, MailCapture, capture_config

    root = os.path.abspath(directory)
    os.makedirs(root, exist_ok=True)
    listen = [item for svc in config.services for item in svc.listen] or ["127.0.0.1:2525"]
    capture_cfg = capture_config(root)
    capture_cfg = capture_cfg.replace(services={"smtp": {"listen": listen}}, myhostname=config.myhostname)
    mail = MailCapture(os.path.join(root, "Maildir"))
    server = MailServer(capture_cfg, control=False, transports={CAPTURE_TRANSPORT: mail._transport})
    return await _serve(server)


def cmd_capture(args: argparse.Namespace) -> int:
    """mailq-like listing of captured mail (newest last)."""
    import email
    import email.policy
    import time as _time

    new = os.path.join(os.path.abspath(args.capture_dir), "Maildir", "new")
    names = sorted(os.listdir(new)) if os.path.isdir(new) else []
    if not names:
        print("Mail capture is empty")
        return EX_OK
    print("-Capture ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------")
    total = 0
    for name in names:
        path = os.path.join(new, name)
        with open(path, "rb") as fh:
            data = fh.read()
        total += len(data)
        msg = email.message_from_bytes(data, policy=email.policy.default)
        when = _time.strftime("%a %b %d %H:%M:%S", _time.localtime(os.path.getmtime(path)))
        sender = (msg.get("Return-Path") or "").strip("<>")
        print(f"{name.split('.', 1)[0]:<12} {len(data):>9} {when}  {sender or 'MAILER-DAEMON'}")
        for rcpt in (msg.get("Delivered-To") or "").split(","):
            print(f"{'':>42}{rcpt.strip()}")
        print(f"{'':>42}Subject: {msg.get('Subject', '')}")
        print()
    print(f"-- {max(1, total // 1024)} Kbytes in {len(names)} Messages.")
    return EX_OK


async def _run(config: Config, overrides: dict | None = None) -> int:
    from .server import MailServer

    return await _serve(MailServer(config, config_overrides=overrides or {}))


async def _serve(server) -> int:
    from .server import StartupError

    loop = asyncio.get_running_loop()
    try:
        await server.start()
    except StartupError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    try:
        await server.serve_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop(server.config.stop_timeout)
    return EX_OK


# ---------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args)
    warnings: list[str] = []
    problems = check_config(config, warnings)
    for warning in warnings:
        print(f"mailserver: warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"mailserver: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"mailserver: configuration {config.source} is valid")
    return EX_OK


def check_config(config: Config, warnings: list[str] | None = None) -> list[str]:
    """Everything ``mailserver check`` reports (blocking; for the CLI)."""
    from .resolve import AddressResolver
    from .tables import TableError

    problems = []
    try:
        _check_log_settings(config)
    except ConfigError as exc:
        problems.append(str(exc))
    if not config.services:
        problems.append("no [services.NAME] listener is configured")
    qdir = config.queue_directory
    problems += _dir_problem("queue_directory", qdir)
    if not config.home_mailbox:
        problems += _dir_problem("mail_spool_directory", config.mail_spool_directory)
    if config.virtual_mailbox_maps or config.virtual_mailbox_base:
        if not config.virtual_mailbox_base:
            problems.append("virtual_mailbox_maps is set but virtual_mailbox_base is empty")
        else:
            problems += _dir_problem("virtual_mailbox_base", config.virtual_mailbox_base)
    warn = (lambda text: (warnings if warnings is not None else problems).append(text.removeprefix("warning: ")))
    try:
        resolver = AddressResolver(config, warn=warn)
    except (TableError, ValueError) as exc:
        problems.append(str(exc))
        return problems
    problems += _check_services(config, resolver)
    return problems


def _check_services(config: Config, resolver) -> list[str]:
    """TLS files and restriction lists of every service (what Postfix's
    smtpd would refuse to start with)."""
    from .smtpd.restrictions import RestrictionChecker
    from .tls import TlsConfigError, server_context

    problems: list[str] = []
    for service in config.services:
        params = {**{name: config[name] for name in config.names()}, **dict(service.overrides)}
        if service.tls != "none":
            try:
                server_context(params["smtpd_tls_cert_file"], params["smtpd_tls_key_file"],
                               params["smtpd_tls_protocols"])
            except TlsConfigError as exc:
                problems.append(f"service {service.name}: {exc}")
        if service.auth != "none" and not config.smtpd_sasl_password_maps:
            problems.append(f"service {service.name}: auth = {service.auth} but smtpd_sasl_password_maps is not set")
        checker = RestrictionChecker(config, resolver=resolver, dns=None, is_mynetworks=lambda ip: False,
                                     params=params)
        problems += [f"service {service.name}: {p}" for p in checker.configuration_problems()]
    return sorted(set(problems))


def _dir_problem(name: str, path: str) -> list[str]:
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.exists(path):
        if not os.access(probe or ".", os.W_OK):
            return [f"{name} {path} does not exist and cannot be created ({probe} is not writable)"]
        return []
    if not os.path.isdir(path):
        return [f"{name} {path} is not a directory"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"{name} {path} is not writable by uid {os.geteuid()}"]
    return []


# ---------------------------------------------------------------- conf (postconf)
def cmd_conf(args: argparse.Namespace) -> int:
    if args.edit or args.remove:
        return _conf_edit(args)
    config = load_config(args)
    if args.services:
        return _conf_services(config, args.names)
    if args.defaults:
        config = Config(source=config.source)  # Postfix postconf -d: built-in defaults only
    names = args.names or sorted(PARAMETERS)
    status = EX_OK
    for name in names:
        if name not in PARAMETERS:
            print(f"mailserver: warning: {name}: unknown parameter", file=sys.stderr)
            status = 1
            continue
        if args.non_default and not config.is_explicit(name):
            continue
        print(f"{name} = {config.raw(name)}")
    return status


def _conf_services(config: Config, names: list[str]) -> int:
    """postconf -M: one line per service, master.cf style."""
    status = EX_OK
    wanted = set(names)
    for svc in config.services:
        if wanted and svc.name not in wanted and f"{svc.name}/inet" not in wanted:
            continue
        options = "".join(f" -o {key}={_text(value)}" for key, value in svc.overrides.items())
        print(f"{svc.name:<10} inet  {','.join(svc.listen)}  tls={svc.tls} auth={svc.auth}{options}")
    missing = wanted - {s.name for s in config.services} - {f"{s.name}/inet" for s in config.services}
    for name in sorted(missing):
        print(f"mailserver: warning: {name}: no such service", file=sys.stderr)
        status = 1
    return status


def _text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _conf_edit(args: argparse.Namespace) -> int:
    """postconf -e / -X: edit config.toml in place, keeping comments and
    order (tomlkit); the result is validated before it replaces the file."""
    import tomllib

    import tomlkit

    path = config_path(getattr(args, "config", None))
    if os.path.realpath(path) == os.path.realpath(default_config_path()):
        print("mailserver: fatal: refusing to edit the embedded default configuration; use -c FILE",
              file=sys.stderr)
        return EX_USAGE
    if not args.names:
        print("mailserver: fatal: no parameters given", file=sys.stderr)
        return EX_USAGE
    try:
        with open(path, encoding="utf-8") as fh:
            doc = tomlkit.parse(fh.read())
    except FileNotFoundError:
        doc = tomlkit.document()
    except OSError as exc:
        print(f"mailserver: fatal: {path}: {exc.strerror}", file=sys.stderr)
        return EX_CONFIG
    except tomlkit.exceptions.ParseError as exc:
        print(f"mailserver: fatal: {path}: TOML syntax error: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        for item in args.names:
            if args.edit:
                name, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"{item}: expected NAME=VALUE")
                _toml_set(doc, name.strip(), value.strip())
            else:
                _toml_remove(doc, item.strip())
    except ValueError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_USAGE
    text = tomlkit.dumps(doc)
    try:
        _check_log_settings(Config.from_mapping(tomllib.loads(text), source=path))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        print(f"mailserver: fatal: {exc}; {path} is unchanged", file=sys.stderr)
        return EX_CONFIG
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o644
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        print(f"mailserver: fatal: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    return EX_OK


def _check_log_settings(config: Config) -> None:
    """What MailLog would refuse at start-up (config.py does not know it)."""
    from .maillog import SYSLOG_FACILITIES

    if config.syslog_facility not in SYSLOG_FACILITIES:
        raise ConfigError(f"parameter 'syslog_facility': unknown facility {config.syslog_facility!r} "
                          f"(use e.g. mail, daemon, local0)", key="syslog_facility", source=config.source)


def _typed(name: str, text: str, existing):
    """A TOML value for a postconf-style text value, in the file's style."""
    spec = PARAMETERS.get(name)
    if spec is None:
        return text
    if spec.kind == "list":
        if isinstance(existing, str):
            return text
        return split_list(text)
    if spec.kind == "int" and re.fullmatch(r"-?\d+", text):
        return int(text)
    if spec.kind == "bool" and text.lower() in ("yes", "no", "true", "false"):
        return text.lower() in ("yes", "true")
    return text


def _toml_set(doc, name: str, value: str) -> None:
    import tomlkit

    if name.startswith("services."):
        parts = name.split(".")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{name}: expected services.NAME.KEY")
        _, service, key = parts
        services = doc.get("services")
        if services is None:
            services = tomlkit.table(is_super_table=True)
            doc["services"] = services
        table = services.get(service)
        if table is None:
            table = tomlkit.table()
            services[service] = table
        existing = table.get(key)
        if key == "listen":
            table[key] = value if isinstance(existing, str) else split_list(value)
        elif key in ("tls", "auth", "type"):
            table[key] = value
        else:
            table[key] = _typed(key, value, existing)
        return
    if not name or name not in PARAMETERS and not name.isidentifier():
        raise ValueError(f"{name!r}: bad parameter name")
    doc[name] = _typed(name, value, doc.get(name))


def _toml_remove(doc, name: str) -> None:
    if name.startswith("services."):
        parts = name.split(".")
        services = doc.get("services")
        if services is None:
            return
        if len(parts) == 2:
            services.pop(parts[1], None)
        elif len(parts) == 3 and parts[1] in services:
            services[parts[1]].pop(parts[2], None)
        return
    doc.pop(name, None)


# ---------------------------------------------------------------- queue tools
def _spool(config: Config):
    from .spool import Spool

    return Spool(config.queue_directory)


def _queue_warning(text: str) -> None:
    print(f"mailserver: warning: {text}", file=sys.stderr)


def cmd_queue_list(args: argparse.Namespace) -> int:
    from .queuetools import collect, format_json, format_mailq

    config = load_config(args)
    spool = _spool(config)
    if not os.path.isdir(config.queue_directory):
        print(f"mailserver: fatal: queue directory {config.queue_directory} does not exist", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        messages = collect(spool, warn=_queue_warning)
    except PermissionError as exc:
        print(f"mailserver: fatal: cannot read the queue: {exc.strerror} ({exc.filename})", file=sys.stderr)
        return EX_UNAVAILABLE
    sys.stdout.write(format_json(messages) if getattr(args, "json", False) else format_mailq(messages))
    return EX_OK


def cmd_queue_show(args: argparse.Namespace) -> int:
    from .queuetools import QueueToolError, format_postcat

    config = load_config(args)
    only = args.envelope or args.header or args.body
    try:
        text = format_postcat(_spool(config), args.queue_id, envelope=args.envelope or not only,
                              header=args.header or not only, body=args.body or not only)
    except QueueToolError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return EX_OK


def cmd_queue_flush(args: argparse.Namespace) -> int:
    from .queuetools import QueueToolError, request_server

    config = load_config(args)
    request: dict = {}
    if getattr(args, "site", None):
        request["domain"] = args.site
    elif getattr(args, "ids", None):
        request["ids"] = args.ids
    try:
        response = request_server(config, "flush", **request)
    except QueueToolError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if response is None:
        print("mailserver: fatal: Cannot flush mail queue - mail system is down", file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK


def cmd_queue_operation(args: argparse.Namespace) -> int:
    from .queuetools import DONE_TEXT, SUMMARY_TEXT, QueueToolError, operate, read_ids
    from .spool import is_queue_id

    config = load_config(args)
    op = args.operation
    ids: list[str] | None = []
    queues: list[str] = []
    for target in args.targets:
        if target in QUEUE_NAMES:
            queues.append(target)
        elif target == "ALL":
            ids = None
        elif target == "-":
            if ids is not None:
                ids += read_ids(sys.stdin)
        elif ids is not None:
            ids.append(target.rstrip("*!"))
    if ids is not None:
        valid = []
        for qid in ids:
            if is_queue_id(qid):
                valid.append(qid)
            else:
                print(f"mailserver: warning: invalid mail queue id: {qid}", file=sys.stderr)
        ids = list(dict.fromkeys(valid))
        if not ids:
            return EX_OK if args.targets == ["-"] else EX_USAGE
    try:
        result = operate(config, op, ids, tuple(queues) or None,
                         log=lambda text: print(f"mailserver: {text}", file=sys.stderr))
    except QueueToolError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if result["via"] == "server":
        for qid in result["done"]:
            print(f"mailserver: {qid}: {DONE_TEXT[op]}", file=sys.stderr)
    for qid in result["pending"]:
        print(f"mailserver: {qid}: being delivered; {DONE_TEXT[op]} when the current attempt ends",
              file=sys.stderr)
    if ids is not None:
        for qid in result["missing"]:
            print(f"mailserver: warning: {qid}: no such message in the "
                  f"{', '.join(queues) or 'queue'}", file=sys.stderr)
    count = len(result["done"]) + len(result["pending"])
    if count:
        print(f"mailserver: {SUMMARY_TEXT[op]}: {count} message{'' if count == 1 else 's'}", file=sys.stderr)
    return EX_OK


def cmd_queue_summary(args: argparse.Namespace) -> int:
    from .queuetools import collect, qshape

    config = load_config(args)
    queues = args.queues or ["incoming", "active"]
    bad = [q for q in queues if q not in QUEUE_NAMES]
    if bad:
        print(f"mailserver: fatal: unknown queue {bad[0]!r} (use {', '.join(QUEUE_NAMES)})", file=sys.stderr)
        return EX_USAGE
    try:
        messages = collect(_spool(config), queues, warn=_queue_warning)
    except PermissionError as exc:
        print(f"mailserver: fatal: cannot read the queue: {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    sys.stdout.write(qshape(messages, time.time(), by_sender=args.by_sender, top=args.top))
    return EX_OK


# ---------------------------------------------------------------- aliases, map, passwd
_COMPILED_TYPES = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm")
_FILE_TYPES = ("texthash",) + _COMPILED_TYPES


def cmd_aliases(args: argparse.Namespace) -> int:
    """newaliases: parse every alias_database source, report problems as
    file:line, compile the types that need it."""
    from . import tables
    from .aliases import AliasSyntaxError, parse_aliases

    config = load_config(args)
    status = EX_OK
    compile_table = getattr(tables, "compile_table", None)
    for spec in config.alias_database:
        kind, sep, path = spec.partition(":")
        if not sep or kind not in _FILE_TYPES:
            continue  # inline:, static:, unix: ... nothing to check or build
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                table = parse_aliases(fh.read(), filename=path)
        except OSError as exc:
            print(f"mailserver: fatal: open {path}: {exc.strerror}", file=sys.stderr)
            status = 1
            continue
        except AliasSyntaxError as exc:
            print(f"mailserver: fatal: {exc}", file=sys.stderr)
            status = 1
            continue
        for warning in table.warnings:
            print(f"mailserver: warning: {warning}", file=sys.stderr)
        if kind in _COMPILED_TYPES and compile_table is not None:
            import inspect

            kwargs = {"fmt": "aliases"} if "fmt" in inspect.signature(compile_table).parameters else {}
            try:
                compile_table(spec, **kwargs)
            except (tables.TableError, OSError, ValueError) as exc:
                print(f"mailserver: fatal: {spec}: {exc}", file=sys.stderr)
                status = 1
                continue
        print(f"mailserver: {path}: {len(table)} aliases", file=sys.stderr)
    return status


def cmd_map(args: argparse.Namespace) -> int:
    """postmap: ``-q KEY TABLE`` looks a key up (exit 1 when not found);
    ``TABLE`` compiles it where its type needs that."""
    from . import tables

    load_config(args)  # validates -c like every command
    spec = args.table if ":" in args.table else f"hash:{args.table}"  # Postfix default_database_type
    name = "query_table" if args.query is not None else "compile_table"
    fn = getattr(tables, name, None)
    if fn is None:
        print(f"mailserver: fatal: this build has no mailserver.tables.{name}()", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        if args.query is not None:
            value = fn(spec, args.query)
            if value is None:
                return 1
            print(value)
        else:
            fn(spec)
    except (tables.TableError, OSError, ValueError) as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return 1
    return EX_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    """Set USER's SASL password (first line of stdin) in the
    smtpd_sasl_password_maps file."""
    config = load_config(args)
    spec = config.smtpd_sasl_password_maps
    if not spec:
        print("mailserver: fatal: smtpd_sasl_password_maps is not set", file=sys.stderr)
        return EX_CONFIG
    try:
        from . import sasl
    except ImportError:
        print("mailserver: fatal: this build has no SASL support (mailserver.sasl)", file=sys.stderr)
        return EX_UNAVAILABLE
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mailserver: fatal: no password on standard input", file=sys.stderr)
        return EX_USAGE
    path = spec.partition(":")[2] if ":" in spec else spec
    try:
        sasl.set_password(path, args.user, password)
    except (OSError, ValueError) as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return 1
    return EX_OK


# ---------------------------------------------------------------- status, reload, stop
def _not_running(config: Config) -> int:
    print("mailserver: the mail system is not running", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .queuetools import QueueToolError, request_server, server_pid

    config = load_config(args)
    try:
        status = request_server(config, "status")
    except QueueToolError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if status is None:
        pid = server_pid(config)
        if pid is not None:
            print(f"mailserver: the mail system is running (pid {pid}) but its control socket "
                  f"{config.control_socket} does not answer", file=sys.stderr)
            return EX_UNAVAILABLE
        if args.json:
            print(json.dumps({"running": False}))
        return _not_running(config)
    status.pop("ok", None)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EX_OK
    print(f"mailserver: the mail system is running: pid {status['pid']}, "
          f"up {_duration(status.get('uptime', 0))}, version {status.get('version')}")
    print(f"configuration: {status.get('config')} (reloads: {status.get('reloads', 0)})")
    print("listeners:")
    for item in status.get("listeners", []):
        print(f"  {item['service']:<12} {item['address']:<24} sessions={item['sessions']}")
    queue = status.get("queue", {})
    print("queue: " + " ".join(f"{name}={queue.get(name, 0)}" for name in
                               ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")))
    print(f"active deliveries: {status.get('active_deliveries', 0)} "
          f"(messages in the active queue: {status.get('active_messages', 0)})")
    destinations = status.get("destinations", [])
    if destinations:
        print("destinations:")
        for d in destinations:
            dead = f" dead ({d['dead_reason']})" if d.get("dead") else ""
            print(f"  {d['transport']}:{d['destination']:<30} busy={d['busy']} window={d['window']:g} "
                  f"limit={d['limit']} peak={d['peak']}{dead}")
    return EX_OK


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h{minutes}m"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def cmd_reload(args: argparse.Namespace) -> int:
    from .queuetools import QueueToolError, request_server

    config = load_config(args)
    try:
        response = request_server(config, "reload")
    except QueueToolError as exc:
        print(f"mailserver: fatal: reload failed, the running configuration is unchanged: {exc}", file=sys.stderr)
        return 1
    if response is None:
        return _not_running(config)
    for warning in response.get("warnings", []):
        print(f"mailserver: warning: {warning}", file=sys.stderr)
    print("mailserver: refreshing the mail system", file=sys.stderr)
    return EX_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from .queuetools import QueueToolError, request_server, server_pid

    config = load_config(args)
    try:
        response = request_server(config, "stop")
    except QueueToolError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return 1
    if response is None:
        return _not_running(config)
    print("mailserver: stopping the mail system", file=sys.stderr)
    deadline = time.monotonic() + float(response.get("stop_timeout") or config.stop_timeout) + 15.0
    while server_pid(config) is not None:
        if time.monotonic() >= deadline:
            print(f"mailserver: fatal: pid {response.get('pid')} did not stop in time", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return EX_OK


# ---------------------------------------------------------------- install-links
def cmd_install_links(args: argparse.Namespace) -> int:
    """Symlinks sendmail, mailq, newaliases -> the mailserver program: the
    one running (when run as ``mailserver``), else the one installed with
    this interpreter (its scripts directory, then the user's), else the
    one on PATH.  Never a version manager's shim: pyenv's shims run the
    program named like the link, so a sendmail link to one would run the
    system's sendmail."""
    candidates = []
    if os.path.basename(sys.argv[0]) == "mailserver":
        candidates.append(os.path.abspath(sys.argv[0]))
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:  # (no such scheme here)
            continue
        candidates.append(os.path.join(scripts, "mailserver"))
    candidates.append(shutil.which("mailserver") or "")
    target = next((c for c in candidates if c and os.access(c, os.X_OK) and "/shims/" not in c), None)
    if target is None:
        print("mailserver: fatal: cannot find the installed 'mailserver' program (not run as mailserver, "
              "not beside this Python, not on PATH)", file=sys.stderr)
        return EX_UNAVAILABLE
    target = os.path.realpath(target) if not os.path.islink(target) else os.path.abspath(target)
    os.makedirs(args.directory, exist_ok=True)
    status = EX_OK
    for name in LINK_NAMES:
        link = os.path.join(args.directory, name)
        if os.path.lexists(link):
            if not args.force:
                print(f"mailserver: warning: {link} exists (use --force to replace it)", file=sys.stderr)
                status = 1
                continue
            os.unlink(link)
        os.symlink(target, link)
        print(f"{link} -> {target}")
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
