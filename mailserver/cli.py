"""The ``mailserver`` command line: thin commands over the library.

``-c CONFIG`` is a global option accepted before or after the subcommand;
without it the embedded default configuration (``config.toml`` shipped with
the package) is used.  Configuration errors print one line and exit 78
(EX_CONFIG) — never a traceback.

Subcommands: ``run`` (foreground server; SIGTERM/SIGINT stop it
gracefully), ``check`` (validate configuration, directories, permissions),
``conf`` (postconf: ``-n``, ``-d``, ``NAME...``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from . import __version__
from .config import PARAMETERS, Config, ConfigError, default_config_path

EX_OK, EX_USAGE, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 70, 75, 78


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", dest="config", default=argparse.SUPPRESS,
                        help="configuration file (default: the embedded config.toml)")
    parser = argparse.ArgumentParser(prog="mailserver", parents=[common],
                                     description="A Postfix-class mail transfer agent in one asyncio process.")
    parser.add_argument("--version", action="version", version=f"mailserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", parents=[common], help="run the server in the foreground")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", parents=[common], help="validate configuration, directories and permissions")
    check.set_defaults(func=cmd_check)

    conf = sub.add_parser("conf", parents=[common], help="print configuration parameters (postconf)")
    conf.add_argument("-n", dest="non_default", action="store_true", help="only parameters set in the file")
    conf.add_argument("-d", dest="defaults", action="store_true", help="default values")
    conf.add_argument("names", nargs="*", metavar="NAME")
    conf.set_defaults(func=cmd_conf)
    return parser


def load_config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None) or default_config_path()
    return Config.from_file(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    return asyncio.run(_run(config))


async def _run(config: Config) -> int:
    from .server import MailServer, StartupError

    server = MailServer(config)
    loop = asyncio.get_running_loop()
    try:
        await server.start()
    except StartupError as exc:
        print(f"mailserver: fatal: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.serve_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
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
    try:
        AddressResolver(config, warn=lambda text: (warnings if warnings is not None else problems).append(
            text.removeprefix("warning: ")))
    except (TableError, ValueError) as exc:
        problems.append(str(exc))
    return problems


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
    config = load_config(args)
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
