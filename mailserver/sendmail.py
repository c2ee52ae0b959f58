"""The sendmail-compatible submission command (Postfix: sendmail, postdrop).

``mailserver sendmail [options] [recipient ...]`` reads a message on
standard input and writes it, with its envelope, atomically into
``maildrop/`` (:meth:`Spool.write_maildrop`); the server's pickup task
moves it into the queue.  It works whether the server runs or not; when it
runs it is nudged over the control socket so the message is queued at once.

Options (Postfix sendmail(1)): ``-t`` (recipients from To/Cc/Bcc, or their
Resent- forms when present; Bcc headers are removed), ``-f sender`` /
``-r sender``, ``-F full_name`` (``$NAME``), ``-i``/``-oi`` (a line with a
single ``.`` does not end the input), ``-bm`` (default), ``-bp`` (mailq),
``-bs`` (SMTP on stdin/stdout), ``-bi``/``-I`` (newaliases), ``-q`` (flush),
``-qR site``, ``-qI id``, ``-C config``; ``-o*``, ``-v``, ``-m``, ``-n``,
``-U``, ``-G``, ``-A*``, ``-B``, ``-h``, ``-L``, ``-N``, ``-O``, ``-R``,
``-V``, ``-X`` are accepted and ignored.

A bare sender or recipient is qualified with ``@$myorigin``.  Exit status
(sysexits): 0, EX_USAGE 64 (bad option, no recipients, bad address),
EX_DATAERR 65 (message over ``message_size_limit``, unreadable input),
EX_TEMPFAIL 75 (maildrop cannot be written), EX_CONFIG 78.  On any error
nothing is left in maildrop.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import sys
from dataclasses import dataclass, field
from typing import BinaryIO

from . import address as addr_mod
from . import control
from .config import Config
from .reply import ReplyError
from .spool import MAILDROP_SUFFIX, MaildropRecord, Spool, SpoolError

EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 69, 70, 75, 78

# Postfix sendmail's getopt string: options that take an argument.
_WITH_ARG = set("ABCFLNORVXbefhopqrx")
_IGNORED = set("ABGLNORUVXhmnvcx")


class SubmitError(Exception):
    def __init__(self, text: str, status: int):
        super().__init__(text)
        self.status = status


@dataclass
class SendmailArgs:
    mode: str = "m"  # m (deliver), p (mailq), s (SMTP), i (newaliases), q (flush), d (daemon), other
    extract: bool = False  # -t
    sender: str | None = None
    fullname: str | None = None
    dot_ends: bool = True  # without -i / -oi
    config: str | None = None
    flush_site: str | None = None
    flush_id: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> SendmailArgs:
    """sendmail's command line (getopt-style, options before recipients)."""
    args = SendmailArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg == "-q":
            args.mode = "q"
            i += 1
            continue
        pos = 1
        while pos < len(arg):
            opt = arg[pos]
            value = None
            if opt in _WITH_ARG:
                value = arg[pos + 1:]
                if not value and opt != "q":
                    i += 1
                    if i >= len(argv):
                        raise SubmitError(f"option requires an argument -- '{opt}'", EX_USAGE)
                    value = argv[i]
                pos = len(arg)
            else:
                pos += 1
            if opt == "t":
                args.extract = True
            elif opt == "i":
                args.dot_ends = False
            elif opt == "I":
                args.mode = "i"
            elif opt in ("f", "r"):
                args.sender = value
            elif opt == "F":
                args.fullname = value
            elif opt == "C":
                args.config = value
            elif opt == "o":
                if value == "i":
                    args.dot_ends = False
                # -oem, -oA..., -o7... and the rest: accepted and ignored, as Postfix does
            elif opt == "b":
                if value in ("m", "p", "s", "i", "d"):
                    args.mode = value
                elif value in ("h", "H", "v", "t"):
                    pass
                else:
                    raise SubmitError(f"unsupported: -b{value}", EX_USAGE)
            elif opt == "q":
                args.mode = "q"
                if value and value[0] == "R":
                    args.flush_site = value[1:] or (argv[i + 1] if i + 1 < len(argv) else "")
                    if not value[1:]:
                        i += 1
                elif value and value[0] == "I":
                    args.flush_id = value[1:] or (argv[i + 1] if i + 1 < len(argv) else "")
                    if not value[1:]:
                        i += 1
                elif value and value[0] == "S":
                    raise SubmitError("-qS is not implemented; use -q", EX_USAGE)
                elif value:
                    args.mode = "ignore"  # -q<interval>: a daemon option, ignored
            elif opt in _IGNORED or opt in "Ee7":
                pass
            else:
                raise SubmitError(f"invalid option -- '{opt}'", EX_USAGE)
        i += 1
    args.recipients = argv[i:]
    return args


# ---------------------------------------------------------------- message handling
def read_message(stream: BinaryIO, *, dot_ends: bool, limit: int) -> bytes:
    """Read the message, CRLF-normalised; a lone ``.`` line ends it unless
    ``-i``.  Raises SubmitError(EX_DATAERR) over ``limit`` bytes."""
    out = bytearray()
    try:
        for line in stream:
            body = line.rstrip(b"\n").rstrip(b"\r") if line.endswith(b"\n") else line
            if dot_ends and body == b"." and line.endswith(b"\n"):
                break
            out += body + b"\r\n"
            if limit and len(out) > limit:
                raise SubmitError(f"message file too big (message_size_limit = {limit})", EX_DATAERR)
    except OSError as exc:
        raise SubmitError(f"cannot read the message: {exc.strerror or exc}", EX_DATAERR) from None
    return bytes(out)


_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def split_header(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """Header fields (each a list of physical CRLF lines) and the rest."""
    fields: list[list[bytes]] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\r\n", pos)
        end = len(message) if end < 0 else end + 2
        line = message[pos:end]
        if line in (b"\r\n", b""):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _HEADER_LINE.match(line):
            fields.append([line])
        else:
            break
        pos = end
    return fields, message[pos:]


def _field_name(f: list[bytes]) -> str:
    return f[0].split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _field_value(f: list[bytes]) -> str:
    raw = b"".join(f).split(b":", 1)[1]
    return raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip()


def extract_recipients(message: bytes) -> tuple[list[str], bytes]:
    """``-t``: addresses from To/Cc/Bcc (Resent-To/Cc/Bcc when the message
    has Resent- headers, as Postfix cleanup), and the message with its Bcc
    headers removed."""
    fields, rest = split_header(message)
    names = [_field_name(f) for f in fields]
    resent = any(n.startswith("resent-") for n in names)
    wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
    values = [_field_value(f) for f, n in zip(fields, names) if n in wanted]
    addresses = [a for _name, a in email.utils.getaddresses(values) if a]
    kept = [f for f, n in zip(fields, names) if n not in ("bcc", "resent-bcc")]
    return addresses, b"".join(b"".join(f) for f in kept) + rest


def add_from_header(message: bytes, sender: str, fullname: str) -> bytes:
    """``-F``/``$NAME``: a ``From: Full Name <sender>`` header when the
    message has none (Postfix hfrom_format = standard)."""
    fields, rest = split_header(message)
    if any(_field_name(f) == "from" for f in fields):
        return message
    header = f"From: {email.utils.formataddr((fullname, sender))}\r\n".encode("utf-8")
    if not fields:
        return header + (rest if rest.startswith(b"\r\n") else b"\r\n" + rest)
    return b"".join(b"".join(f) for f in fields) + header + rest


def qualify(address: str, myorigin: str, *, sender: bool = False) -> str:
    """Validate one envelope address; a bare ``user`` gets ``@$myorigin``."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if sender and text == "":
        return ""
    try:
        parsed = addr_mod.parse_address(text)
    except ValueError:
        raise SubmitError(f"bad address syntax: {address!r}", EX_USAGE) from None
    if not parsed.domain:
        parsed = parsed.with_domain(myorigin)
    return str(parsed)


def login_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def command_line_recipients(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if "<" in item or "," in item:
            out += [a for _n, a in email.utils.getaddresses([item]) if a]
        elif item.strip():
            out.append(item.strip())
    return out


def build_record(config: Config, args: SendmailArgs, message: bytes) -> MaildropRecord:
    """The maildrop record for one submission (pure apart from the login
    name and $NAME)."""
    myorigin = config.myorigin
    if args.sender is not None:
        sender = qualify(args.sender, myorigin, sender=True)
    else:
        sender = qualify(login_name(), myorigin, sender=True)
    recipients = [qualify(a, myorigin) for a in command_line_recipients(args.recipients)]
    if args.extract:
        extracted, message = extract_recipients(message)
        recipients += [qualify(a, myorigin) for a in extracted]
    if not recipients:
        raise SubmitError("no recipient addresses found in message header" if args.extract
                          else "recipients must be specified on the command line or via the -t option", EX_USAGE)
    fullname = args.fullname if args.fullname is not None else os.environ.get("NAME", "")
    if fullname and sender:
        message = add_from_header(message, sender, fullname)
    unique = list(dict.fromkeys(recipients))
    return MaildropRecord(sender=sender, recipients=[(r, r) for r in unique], content=message)


def drop(config: Config, record: MaildropRecord) -> str:
    """Write the record into maildrop/ and nudge a running server.  Returns
    the queue ID the message will get."""
    spool = Spool(config.queue_directory)
    try:
        if not os.path.isdir(spool.state_dir("maildrop")):
            spool.create_directories()  # the queue of a server that never ran (unprivileged setups)
        name = spool.write_maildrop(record)
    except (SpoolError, OSError) as exc:
        raise SubmitError(f"cannot write to maildrop {spool.state_dir('maildrop')}: {exc}", EX_TEMPFAIL) from None
    try:
        control.request(config.control_socket, "pickup", timeout=2.0)
    except (control.NotRunning, control.ControlError):
        pass  # the server picks it up on its next scan, or when it starts
    return name[:-len(MAILDROP_SUFFIX)]


def submit(config: Config, args: SendmailArgs, stream: BinaryIO) -> str:
    """The whole ``sendmail`` (-bm) path; returns the queue ID."""
    limit = config.message_size_limit
    if args.extract or args.recipients:
        message = read_message(stream, dot_ends=args.dot_ends, limit=limit)
    else:
        raise SubmitError("recipients must be specified on the command line or via the -t option", EX_USAGE)
    record = build_record(config, args, message)
    return drop(config, record)


# ---------------------------------------------------------------- -bs
def smtp_session(config: Config, inp: BinaryIO, out: BinaryIO) -> int:
    """``sendmail -bs``: an SMTP dialogue on stdin/stdout; each message goes
    to maildrop.  Local submission: no relay restrictions (Postfix runs
    smtpd for the local user the same way)."""
    myorigin = config.myorigin
    limit = config.message_size_limit

    def reply(text: str) -> None:
        out.write(text.encode("utf-8") + b"\r\n")
        out.flush()

    reply(f"220 {config.myhostname} ESMTP {config.mail_name}")
    sender: str | None = None
    rcpts: list[str] = []
    esmtp = False
    while True:
        raw = inp.readline(2048)
        if not raw:
            return EX_OK
        line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            if not arg.strip():
                reply(f"501 5.5.4 Syntax: {verb} hostname")
                continue
            esmtp = verb == "EHLO"
            sender, rcpts = None, []
            if esmtp:
                reply(f"250-{config.myhostname}\r\n250-PIPELINING\r\n250-SIZE {limit}\r\n250-ENHANCEDSTATUSCODES\r\n"
                      f"250-8BITMIME\r\n250 SMTPUTF8")
            else:
                reply(f"250 {config.myhostname}")
        elif verb == "MAIL":
            if sender is not None:
                reply("503 5.5.1 Error: nested MAIL command")
                continue
            if not arg.upper().startswith("FROM:"):
                reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                continue
            try:
                address, _params = addr_mod.parse_mail_from(arg[5:].lstrip())
            except ReplyError as exc:
                reply(" ".join(exc.reply.lines()))
                continue
            sender = str(address if address.is_null or address.domain else address.with_domain(myorigin))
            reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            if sender is None:
                reply("503 5.5.1 Error: need MAIL command")
                continue
            if not arg.upper().startswith("TO:"):
                reply("501 5.5.4 Syntax: RCPT TO:<address>")
                continue
            try:
                address, _params = addr_mod.parse_rcpt_to(arg[3:].lstrip())
            except ReplyError as exc:
                reply(" ".join(exc.reply.lines()))
                continue
            rcpts.append(str(address if address.domain else address.with_domain(myorigin)))
            reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if sender is None:
                reply("503 5.5.1 Error: need MAIL command")
                continue
            if not rcpts:
                reply("554 5.5.1 Error: no valid recipients")
                continue
            reply("354 End data with <CR><LF>.<CR><LF>")
            content = bytearray()
            too_big = False
            while True:
                data = inp.readline()
                if not data:
                    return EX_DATAERR  # EOF inside DATA: nothing is queued
                body = data.rstrip(b"\r\n")
                if body == b".":
                    break
                if body.startswith(b"."):
                    body = body[1:]
                if not too_big:
                    content += body + b"\r\n"
                    too_big = bool(limit) and len(content) > limit
            if too_big:
                reply("552 5.3.4 Error: message file too big")
            else:
                record = MaildropRecord(sender=sender, recipients=[(r, r) for r in dict.fromkeys(rcpts)],
                                        content=bytes(content))
                try:
                    queue_id = drop(config, record)
                except SubmitError as exc:
                    reply(f"451 4.3.0 Error: {exc}")
                else:
                    reply(f"250 2.0.0 Ok: queued as {queue_id}")
            sender, rcpts = None, []
        elif verb == "RSET":
            sender, rcpts = None, []
            reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            reply("250 2.0.0 Ok")
        elif verb == "VRFY":
            reply("252 2.0.0 Send mail and I will try my best")
        elif verb == "QUIT":
            reply("221 2.0.0 Bye")
            return EX_OK
        else:
            reply("502 5.5.2 Error: command not recognized")


def main(argv: list[str], *, load_config, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
         name: str = "sendmail") -> int:
    """The ``sendmail`` command; ``load_config(path_or_None)`` returns the
    Config.  ``mailq``/``newaliases`` modes are dispatched by the caller."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    try:
        args = parse_args(argv)
        config = load_config(args.config)
        if args.mode == "s":
            return smtp_session(config, stdin, stdout)
        submit(config, args, stdin)
        return EX_OK
    except SubmitError as exc:
        print(f"{name}: fatal: {exc}", file=sys.stderr)
        return exc.status
