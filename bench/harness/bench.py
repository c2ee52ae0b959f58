#!/usr/bin/env python3
"""Loopback SMTP throughput harness (stdlib only; run as root).

Every run starts every server afresh in a fresh state directory, drives it
with Postfix's smtp-source, waits for the scenario's completion condition,
stops everything it started (by PID / process group / its own cgroup) and
appends one JSON line per run to --out.  `--report FILE` prints the table.

Cases (mode in brackets):
  sink-direct              smtp-source -> smtp-sink             [direct]
  postfix-accept           Postfix, messages put on HOLD        [accept]
  postfix-relay            Postfix -> smtp-sink                 [relay]
  postfix-local            Postfix -> virtual(8) -> Maildir     [local]
  aiosmtpd-discard[-uvloop]            baseline, 250 after parse     [accept]
  aiosmtpd-fsync[-uvloop]              file + fsync(file,dir) in threads [accept]
  aiosmtpd-fsync-inline                same, blocking the event loop [accept]
  target-accept / target-relay / target-local   $TARGET_CMD (see README.md)

Completion conditions (the timer starts just before smtp-source is spawned):
  direct, accept : smtp-source has exited (every DATA got its 250); for target-accept
                   with mailserver also N envelopes (ID.env) in the queue directory the
                   adapter names in $BENCH_RUNDIR/accept-queue (hold/, or deferred/ while
                   mailserver has no HOLD)
  relay          : smtp-sink's counter shows N messages received (-c output)
  local          : N*R files exist in Maildir/new + Maildir/cur
"""
import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
VENV_PY = os.path.join(BENCH, ".venv", "bin", "python")
AIOSERVER = os.path.join(HERE, "aiosmtpd_server.py")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count()

LOCAL_DOMAIN = "dom.test"
RELAY_DOMAIN = "relay.test"
SENDER = "sender@src.test"


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# CPU accounting: one cgroup (v1 cpuacct, else v2) per role; /proc/stat for
# the whole box; kernel threads from /proc; BSD process accounting (acct(2))
# for a per-command breakdown of the target's processes.
# --------------------------------------------------------------------------
class CGroups:
    def __init__(self, roles):
        self.kind = None
        self.dirs = {}
        tag = "mtabench-%d" % os.getpid()
        for kind, base in (("v1", "/sys/fs/cgroup/cpuacct"), ("v2", "/sys/fs/cgroup/unified"), ("v2", "/sys/fs/cgroup")):
            probe = os.path.join(base, "cpuacct.usage" if kind == "v1" else "cgroup.procs")
            if not os.path.exists(probe):
                continue
            try:
                for r in roles:
                    d = os.path.join(base, tag, r)
                    os.makedirs(d, exist_ok=True)
                    self.dirs[r] = d
                self.usage(roles[0])
                self.kind = kind
                self.base = os.path.join(base, tag)
                break
            except OSError:
                self.dirs = {}
        if not self.kind:
            log("warning: no usable cgroup; per-role CPU will be missing")

    def usage(self, role):
        """CPU seconds used by everything that ever ran in the role's cgroup."""
        d = self.dirs.get(role)
        if not d:
            return None
        if os.path.exists(os.path.join(d, "cpuacct.usage")):
            with open(os.path.join(d, "cpuacct.usage")) as f:
                return int(f.read()) / 1e9
        with open(os.path.join(d, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "usage_usec":
                    return int(v) / 1e6
        return None

    def usage_split(self, role):
        """(user, system) CPU seconds for the role's cgroup, or (None, None)."""
        d = self.dirs.get(role)
        if not d:
            return None, None
        try:
            if os.path.exists(os.path.join(d, "cpuacct.usage_user")):
                with open(os.path.join(d, "cpuacct.usage_user")) as f:
                    u = int(f.read()) / 1e9
                with open(os.path.join(d, "cpuacct.usage_sys")) as f:
                    return u, int(f.read()) / 1e9
            with open(os.path.join(d, "cpu.stat")) as f:
                kv = dict(line.split() for line in f)
            return int(kv["user_usec"]) / 1e6, int(kv["system_usec"]) / 1e6
        except (OSError, KeyError, ValueError):
            return None, None

    def pids(self, role):
        d = self.dirs.get(role)
        if not d:
            return []
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def wrap(self, role, argv):
        """argv prefixed so the process enters the cgroup before it execs."""
        d = self.dirs.get(role)
        if not d:
            return argv
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', d] + list(argv)

    def cleanup(self):
        if not self.kind:
            return
        for d in self.dirs.values():
            try:
                os.rmdir(d)
            except OSError as e:
                log("warning: cannot remove cgroup %s: %s" % (d, e))
        try:
            os.rmdir(self.base)
        except OSError:
            pass


def proc_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / HZ, "iowait": iowait / HZ, "steal": steal / HZ,
            "idle": idle / HZ, "softirq": (irq + softirq) / HZ}


def kthread_cpu():
    """{pid: cpu seconds} for kernel threads (kworkers come and go: diff per pid)."""
    tot = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % p) as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        # rest[1] = ppid; kernel threads are children of kthreadd (pid 2)
        if rest[1] == "2" or p == "2":
            tot[int(p)] = (int(rest[11]) + int(rest[12])) / HZ
    return tot


def kthread_delta(before, after):
    """CPU used by kernel threads in between; threads that exited meanwhile are lost (small)."""
    return sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in after.items())


def thread_cpu(pids):
    """{(pid, tid): [comm, cpu_s]} for every thread of the given processes."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            try:
                with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                    st = f.read()
            except OSError:
                continue
            comm = st[st.find("(") + 1:st.rfind(")")]
            rest = st[st.rfind(")") + 2:].split()
            out[(pid, int(tid))] = [comm, (int(rest[11]) + int(rest[12])) / HZ]
    return out


def thread_summary(before, after, span):
    """Busiest threads over the window (cores), and the sum of all others."""
    deltas = []
    for key, (comm, cpu) in after.items():
        d = cpu - before.get(key, [comm, 0.0])[1]
        role = "main" if key[0] == key[1] else "thread"
        deltas.append((d, "%s:%s/%d" % (comm, role, key[1])))
    deltas.sort(reverse=True)
    top = [{"thread": name, "cores": round(d / span, 3)} for d, name in deltas[:3]]
    rest = sum(d for d, _ in deltas[3:])
    return {"top": top, "rest_cores": round(rest / span, 3), "threads": len(deltas)}


class Acct:
    """BSD process accounting v3 via acct(2): one record per exited process."""
    FMT = "<ccHIIIIIIf8H16s"
    SIZE = struct.calcsize(FMT)

    def __init__(self, path):
        self.path = path
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.on = False

    def start(self):
        open(self.path, "wb").close()
        if self.libc.acct(self.path.encode()) != 0:
            log("note: acct(2) unavailable (errno %d); no per-process breakdown" % ctypes.get_errno())
            return False
        self.on = True
        return True

    def stop(self):
        if self.on:
            self.libc.acct(None)
            self.on = False

    @staticmethod
    def _comp(c):
        return (c & 0x1FFF) << (3 * (c >> 13))

    def records(self):
        out = []
        with open(self.path, "rb") as f:
            data = f.read()
        for off in range(0, len(data) - self.SIZE + 1, self.SIZE):
            r = struct.unpack_from(self.FMT, data, off)
            if (r[1][0] & 0x7F) != 3:
                continue
            out.append({"pid": r[6], "ppid": r[7], "btime": r[8], "etime": r[9] / 100.0,
                        "user": self._comp(r[10]) / 100.0, "sys": self._comp(r[11]) / 100.0,
                        "cpu": (self._comp(r[10]) + self._comp(r[11])) / 100.0,
                        "comm": r[18].split(b"\0", 1)[0].decode(errors="replace")})
        return out

    def breakdown(self, roots, since_epoch):
        """CPU seconds per command name, over the descendants of `roots`."""
        recs = self.records()
        tree = set(roots)
        changed = True
        while changed:
            changed = False
            for r in recs:
                if r["pid"] not in tree and r["ppid"] in tree:
                    tree.add(r["pid"])
                    changed = True
        agg = {}
        for r in recs:
            if r["pid"] in tree and r["btime"] + r["etime"] >= since_epoch - 1:
                a = agg.setdefault(r["comm"], [0.0, 0, 0.0])
                a[0] += r["cpu"]
                a[1] += 1
                a[2] += r["sys"]
        return {k: {"cpu_s": round(v[0], 2), "sys_s": round(v[2], 2), "procs": v[1]}
                for k, v in sorted(agg.items(), key=lambda kv: -kv[1][0])}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def port_busy(port):
    s = socket.socket()
    try:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        s.close()


def wait_smtp_ready(port, timeout, alive):
    """Wait for a 220 banner on 127.0.0.1:port, then QUIT politely."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited before listening on port %d" % port)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                f = s.makefile("rb")
                line = f.readline()
                if line.startswith(b"220"):
                    # consume a multi-line banner, then quit
                    while line[3:4] == b"-":
                        line = f.readline()
                    s.sendall(b"QUIT\r\n")
                    f.readline()
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("no SMTP banner on port %d within %ss" % (port, timeout))


def count_maildir(md):
    n = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(os.path.join(md, sub)) as it:
                for _ in it:
                    n += 1
        except FileNotFoundError:
            pass
    return n


def count_files(d):
    n = 0
    for root, _dirs, files in os.walk(d):
        n += len(files)
    return n


def count_env(d):
    """Messages in one of mailserver's queue directories: one ID.env per message
    (+ ID.msg once its envelope was rewritten)."""
    n = 0
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".env"):
                    n += 1
    except FileNotFoundError:
        pass
    return n


STALL_S = 30   # accept case: give up when the queue count has not moved for this long after smtp-source exited

MS_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")

LOG_PROBLEM = re.compile(rb": (warning|error|fatal|panic): |Traceback \(most recent|status=(deferred|bounced)")


def scan_log(path):
    """Problem lines in a server log: counts by kind and the first few lines of each kind."""
    counts, samples = {}, {}
    try:
        with open(path, "rb") as f:
            for line in f:
                m = LOG_PROBLEM.search(line)
                if not m:
                    continue
                if m.group(1):
                    kind = m.group(1).decode()
                elif m.group(2):
                    kind = "status=" + m.group(2).decode()
                else:
                    kind = "traceback"
                counts[kind] = counts.get(kind, 0) + 1
                lst = samples.setdefault(kind, [])
                if len(lst) < 5:
                    lst.append(line.decode(errors="replace").rstrip()[:400])
    except OSError:
        return None
    return {"counts": counts, "samples": samples}


def save_log(src, dst):
    """gzip a copy of a server log into the results directory."""
    import gzip
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as fi, gzip.open(dst, "wb", compresslevel=3) as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        return dst
    except OSError as e:
        log("warning: cannot save log %s: %s" % (src, e))
        return None


class Proc:
    """A child process in its own session/process group, with an exit-time waiter."""

    def __init__(self, name, argv, cg, role, env=None, stdout=None, stderr=None, cwd=None):
        self.name = name
        self.p = subprocess.Popen(cg.wrap(role, argv), env=env, stdout=stdout, stderr=stderr, cwd=cwd,
                                  start_new_session=True, stdin=subprocess.DEVNULL)
        self.pid = self.p.pid
        self.exit_time = None
        self.rc = None
        self._t = threading.Thread(target=self._wait, daemon=True)
        self._t.start()

    def _wait(self):
        self.rc = self.p.wait()
        self.exit_time = time.monotonic()

    def alive(self):
        return self.exit_time is None

    def signal_group(self, sig):
        # Only the process group that this harness created (pgid == our child's pid).
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def stop_role(cg, role, procs, grace):
    """Wait until every process of the role's cgroup is gone; SIGKILL stragglers by PID."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        left = cg.pids(role) if cg.kind else [p.pid for p in procs if p.alive()]
        if not left:
            return True
        time.sleep(0.1)
    left = cg.pids(role) if cg.kind else [p.pid for p in procs if p.alive()]
    for pid in left:
        log("warning: SIGKILL straggler pid %d (%s)" % (pid, role))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    return False


# --------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------
class PostfixTarget:
    def __init__(self, a, rundir, mode):
        self.a, self.rundir, self.mode = a, rundir, mode
        self.etc = os.path.join(rundir, "postfix-etc")
        self.maildir = os.path.join(rundir, "mail", "Maildir")
        self.proc = None

    def prepare(self):
        for d in ("postfix-etc", "spool", "data", "mail/Maildir/new", "mail/Maildir/cur", "mail/Maildir/tmp"):
            os.makedirs(os.path.join(self.rundir, d), exist_ok=True)
        shutil.chown(os.path.join(self.rundir, "data"), "postfix")
        for root, dirs, _ in os.walk(os.path.join(self.rundir, "mail")):
            for d in [root] + [os.path.join(root, x) for x in dirs]:
                os.chown(d, 65534, 65534)
        for name in ("main.cf", "master.cf"):
            with open(os.path.join(BENCH, "postfix", name + ".in")) as f:
                txt = f.read()
            txt = (txt.replace("@RUN@", self.rundir).replace("@LISTEN@", str(self.a.port))
                   .replace("@SINK@", str(self.a.sink_port)))
            if name == "main.cf" and self.mode == "accept":
                txt += ("\n# accept-only mode: every message goes to the hold queue; nothing is delivered.\n"
                        "smtpd_data_restrictions = check_client_access static:HOLD\n")
            if name == "main.cf" and self.a.postfix_extra:
                txt += "\n# extra settings from --postfix-extra\n" + "\n".join(self.a.postfix_extra) + "\n"
            with open(os.path.join(self.etc, name), "w") as f:
                f.write(txt)

    def start(self, cg):
        self.out = open(os.path.join(self.rundir, "postfix-start.out"), "wb")
        self.proc = Proc("postfix", ["postfix", "-c", self.etc, "start-fg"], cg, "target",
                         stdout=self.out, stderr=subprocess.STDOUT)
        return [self.proc]

    def root_pids(self):
        return [self.proc.pid]

    def stop(self, cg):
        subprocess.run(["postfix", "-c", self.etc, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
        ok = stop_role(cg, "target", [self.proc], 30)
        self.out.close()
        return ok

    def verify(self, n, rcpts):
        if self.mode == "accept":
            held = count_files(os.path.join(self.rundir, "spool", "hold"))
            return held, held == n
        return None, True

    def accept_dir(self):
        return None   # cleanup(8) files the message in hold/ before smtpd answers 250

    def log_path(self):
        return os.path.join(self.rundir, "maillog")

    def queue_counts(self):
        return {q: count_files(os.path.join(self.rundir, "spool", q))
                for q in ("incoming", "active", "deferred", "hold", "corrupt")}

    def diag(self):
        try:
            with open(os.path.join(self.rundir, "maillog"), "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 3000))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class CmdTarget:
    def __init__(self, a, rundir, mode, argv, label):
        self.a, self.rundir, self.mode, self.argv, self.label = a, rundir, mode, argv, label
        self.maildir = os.path.join(rundir, "mail", "Maildir")
        self.proc = None

    def prepare(self):
        for d in ("spool", "mail/Maildir/new", "mail/Maildir/cur", "mail/Maildir/tmp"):
            os.makedirs(os.path.join(self.rundir, d), exist_ok=True)

    def env(self):
        e = dict(os.environ)
        e.update({
            "BENCH_MODE": self.mode,
            "BENCH_HOLD": "1" if self.mode == "accept" else "0",
            "BENCH_LISTEN": "127.0.0.1:%d" % self.a.port,
            "BENCH_LISTEN_HOST": "127.0.0.1",
            "BENCH_LISTEN_PORT": str(self.a.port),
            "BENCH_LOCAL_DOMAIN": LOCAL_DOMAIN,
            "BENCH_MAILDIR": self.maildir,
            "BENCH_RELAY_DOMAIN": RELAY_DOMAIN,
            "BENCH_RELAY_HOST": "127.0.0.1",
            "BENCH_RELAY_PORT": str(self.a.sink_port),
            "BENCH_RELAY_TO": "127.0.0.1:%d" % self.a.sink_port,
            "BENCH_SPOOL": os.path.join(self.rundir, "spool"),
            "BENCH_RUNDIR": self.rundir,
        })
        return e

    def start(self, cg):
        self.out = open(os.path.join(self.rundir, "target.out"), "wb")
        self.proc = Proc(self.label, self.argv, cg, "target", env=self.env(), stdout=self.out,
                         stderr=subprocess.STDOUT, cwd=BENCH)
        return [self.proc]

    def root_pids(self):
        return [self.proc.pid]

    def stop(self, cg):
        self.proc.signal_group(signal.SIGTERM)
        ok = stop_role(cg, "target", [self.proc], 30)
        self.out.close()
        return ok

    def accept_dir(self):
        """For TARGET_CMD in accept mode: the queue directory (mailserver layout: one ID.env per message) that
        must end up holding N envelopes, as named by the adapter in $BENCH_RUNDIR/accept-queue
        ("hold", or "deferred" for the defer_transports fallback); None = no such check."""
        if self.mode != "accept" or not self.label.startswith("target"):
            return None
        try:
            with open(os.path.join(self.rundir, "accept-queue")) as f:
                q = f.read().strip()
        except OSError:
            return None
        return os.path.join(self.rundir, "spool", q) if q in MS_QUEUES else None

    def log_path(self):
        return os.path.join(self.rundir, "target.out")

    def queue_counts(self):
        if not self.label.startswith("target"):
            return None
        return {q: count_env(os.path.join(self.rundir, "spool", q)) for q in MS_QUEUES}

    def verify(self, n, rcpts):
        if self.label.startswith("aiosmtpd-fsync"):
            c = count_files(os.path.join(self.rundir, "spool"))
            return c, c == n
        d = self.accept_dir()
        if d:
            c = count_env(d)
            return c, c == n
        return None, True

    def diag(self):
        try:
            with open(os.path.join(self.rundir, "target.out"), "rb") as f:
                return f.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""


class Sink:
    """smtp-sink with -c; a reader thread tracks its message counter."""

    def __init__(self, a, cg, expect):
        self.expect = expect
        self.count = 0
        self.done_time = None
        self.proc = Proc("smtp-sink", [SMTP_SINK, "-u", "nobody", "-c", "127.0.0.1:%d" % a.sink_port, "1024"],
                         cg, "sink", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.tail = b""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        rx = re.compile(rb"mesg=(\d+)")
        fd = self.proc.p.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf = self.tail + chunk
            m = None
            for m in rx.finditer(buf):
                pass
            if m:
                self.count = int(m.group(1))
                if self.done_time is None and self.expect and self.count >= self.expect:
                    self.done_time = time.monotonic()
            self.tail = buf[-64:]

    def stop(self, cg):
        self.proc.signal_group(signal.SIGTERM)
        return stop_role(cg, "sink", [self.proc], 10)


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------
def aio(mode, uv=False):
    argv = [VENV_PY, AIOSERVER, "--mode", mode]
    if uv:
        argv.append("--uvloop")
    return argv


CASES = {
    "sink-direct": ("sink", "direct", None),
    "postfix-accept": ("postfix", "accept", None),
    "postfix-relay": ("postfix", "relay", None),
    "postfix-local": ("postfix", "local", None),
    "aiosmtpd-discard": ("cmd", "accept", aio("discard")),
    "aiosmtpd-discard-uvloop": ("cmd", "accept", aio("discard", True)),
    "aiosmtpd-fsync": ("cmd", "accept", aio("fsync")),
    "aiosmtpd-fsync-uvloop": ("cmd", "accept", aio("fsync", True)),
    "aiosmtpd-fsync-inline": ("cmd", "accept", aio("fsync-inline")),
    "target-accept": ("target", "accept", None),
    "target-relay": ("target", "relay", None),
    "target-local": ("target", "local", None),
}


def retire(a, rundir):
    """Move a finished run's directory aside; main() deletes them all after
    the last run (BENCH_DELETE_EACH_RUN=1: delete it now, as before).

    Why: on ext4 without a journal (this benchmark's VM), every new inode
    allocation scans past the inodes freed in the last 60-360 s
    (fs/ext4/ialloc.c, recently_deleted()), one buffer-cache lookup each.
    Deleting the previous run's 5 000-40 000 files just before a run made
    file creation several times dearer for whichever server came next (the
    same mailserver commit measured 570 and 770 msgs/s relayed in one
    invocation; up to a fifth of the server's CPU in ext4_create).  Files a
    server deletes during its own run still count, for Postfix and
    mailserver alike."""
    if not os.path.exists(rundir):
        return
    if os.environ.get("BENCH_DELETE_EACH_RUN") == "1":
        shutil.rmtree(rundir, ignore_errors=True)
        return
    retired = os.path.join(a.rundir, "retired")
    os.makedirs(retired, exist_ok=True)
    os.rename(rundir, os.path.join(retired, "%d-%d" % (os.getpid(), len(os.listdir(retired)))))


def run_once(a, case, rep, cg, acct):
    kind, mode, argv = CASES[case]
    rundir = os.path.join(a.rundir, "run")
    retire(a, rundir)
    os.makedirs(rundir)
    os.chmod(a.rundir, 0o755)
    os.chmod(rundir, 0o755)
    n, s, l, r = a.n, a.sessions, a.size, a.rcpts
    rec = {"case": case, "mode": mode, "rep": rep, "n": n, "sessions": s, "size": l, "rcpts": r,
           "reuse": bool(a.reuse), "ok": False, "error": None, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "label": a.label}
    if kind == "target":
        if not a.target_cmd:
            raise SystemExit("case %s needs TARGET_CMD / --target-cmd" % case)
        argv = ["/bin/bash", "-c", a.target_cmd]
        rec["target_cmd"] = a.target_cmd

    for port in (a.port, a.sink_port):
        if port_busy(port):
            raise SystemExit("port %d on 127.0.0.1 is already in use by someone else; pick --port/--sink-port" % port)

    target = None
    sink = None
    src = None
    procs_target = []
    epoch0 = 0.0
    try:
        # -- start servers -------------------------------------------------
        if mode in ("relay", "direct"):
            sink = Sink(a, cg, n if mode == "relay" else None)
            wait_smtp_ready(a.sink_port, 30, sink.proc.alive)
        if kind == "postfix":
            target = PostfixTarget(a, rundir, mode)
        elif kind in ("cmd", "target"):
            target = CmdTarget(a, rundir, mode, argv, case)
        if target:
            target.prepare()
            procs_target = target.start(cg)
            wait_smtp_ready(a.port, a.start_timeout, procs_target[0].alive)
        dest_port = a.sink_port if mode == "direct" else a.port
        domain = RELAY_DOMAIN if mode in ("relay", "direct") else LOCAL_DOMAIN
        maildir = target.maildir if target else None
        expect_files = n * r

        os.sync()
        time.sleep(a.settle)

        # -- measure ----------------------------------------------------------
        if acct and target:
            acct.start()
        cg0 = {k: cg.usage(k) for k in ("source", "target", "sink")}
        tsplit0 = cg.usage_split("target")
        try:
            thr0 = thread_cpu(cg.pids("target")) if (target and cg.kind) else {}
        except Exception:  # noqa - diagnostics only
            thr0 = {}
        st0, kt0, self0 = proc_stat(), kthread_cpu(), resource.getrusage(resource.RUSAGE_SELF)
        epoch0 = time.time()
        t0 = time.monotonic()
        argv_src = [SMTP_SOURCE, "-M", "client.bench.test", "-s", str(s), "-m", str(n), "-l", str(l),
                    "-f", SENDER, "-t", "rcpt@" + domain]
        if r > 1:
            argv_src[1:1] = ["-r", str(r)]
        if a.reuse:
            argv_src.insert(1, "-d")
        argv_src.append("127.0.0.1:%d" % dest_port)
        rec["source_cmd"] = " ".join(argv_src)
        src_err = open(os.path.join(rundir, "smtp-source.err"), "wb")
        src = Proc("smtp-source", argv_src, cg, "source", stdout=src_err, stderr=subprocess.STDOUT)

        deadline = t0 + a.timeout
        accept_dir = target.accept_dir() if (target and mode == "accept") else None
        if accept_dir:
            rec["accept_queue"] = os.path.basename(accept_dir)
        first_look = True
        stalled = False
        last_change = 0.0
        t_done = None
        last_count = 0
        next_scan = t0
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if src.exit_time is not None and src.rc != 0:
                break
            if mode in ("accept", "direct"):
                if src.exit_time is not None:
                    if accept_dir is None:
                        t_done = src.exit_time
                        break
                    # mailserver accept case: wait until N envelopes sit in hold/ (or deferred/)
                    if time.monotonic() >= next_scan:
                        ts = time.monotonic()
                        c = count_env(accept_dir)
                        if c >= n:
                            last_count = c
                            # complete at the first look after smtp-source exited: count it as done then
                            t_done = src.exit_time if first_look else time.monotonic()
                            break
                        if first_look or c != last_count:
                            last_change = ts
                        elif ts - last_change > STALL_S:
                            stalled = True
                            break
                        last_count = c
                        first_look = False
                        next_scan = ts + max(0.05, 20 * (time.monotonic() - ts))
            elif mode == "relay":
                if sink.done_time is not None:
                    t_done = sink.done_time
                    break
                if not sink.proc.alive():
                    break
            elif mode == "local" and time.monotonic() >= next_scan:
                ts = time.monotonic()
                last_count = count_maildir(maildir)
                if last_count >= expect_files:
                    t_done = time.monotonic()
                    break
                # keep the directory scans below ~5% of one core
                next_scan = ts + max(0.05, 20 * (time.monotonic() - ts))
            if target and not procs_target[0].alive():
                break
        # The last message can reach the sink (relay) or the Maildir (local) a moment before
        # smtp-source has read its last replies and exited: wait for it (to the deadline)
        # instead of failing the run.  The rate still ends at t_done.
        while t_done is not None and src.exit_time is None and time.monotonic() < deadline:
            time.sleep(0.02)
        t_end = time.monotonic()
        st1, kt1, self1 = proc_stat(), kthread_cpu(), resource.getrusage(resource.RUSAGE_SELF)
        cg1 = {k: cg.usage(k) for k in ("source", "target", "sink")}
        tsplit1 = cg.usage_split("target")
        try:
            if target and cg.kind and t_end > t0:
                rec["target_threads"] = thread_summary(thr0, thread_cpu(cg.pids("target")), t_end - t0)
        except Exception:  # noqa - diagnostics only
            pass

        # -- results ----------------------------------------------------------
        if src.exit_time is not None:
            rec["source_rc"] = src.rc
            rec["accept_s"] = round(src.exit_time - t0, 4)
            rec["accept_msgs_per_s"] = round(n / (src.exit_time - t0), 1)
        if t_done is not None and src.rc == 0:
            rec["ok"] = True
            rec["wall_s"] = round(t_done - t0, 4)
            rec["msgs_per_s"] = round(n / (t_done - t0), 1)
        else:
            why = []
            if src.exit_time is None:
                why.append("smtp-source still running at timeout %ss" % a.timeout)
            elif src.rc != 0:
                why.append("smtp-source exit %s" % src.rc)
            if mode == "relay":
                why.append("sink counted %d/%d" % (sink.count, n))
            if mode == "local":
                why.append("maildir has %d/%d files" % (last_count, expect_files))
            if accept_dir:
                why.append("%s/ has %d/%d envelopes%s" % (os.path.basename(accept_dir), last_count, n,
                                                          " (no change for %ds)" % STALL_S if stalled else ""))
                delivered = count_maildir(maildir) if maildir else 0
                if delivered:
                    why.append("but %d messages were delivered to the Maildir: the target did not hold them"
                               % delivered)
            if target and not procs_target[0].alive():
                why.append("target exited rc=%s" % procs_target[0].rc)
            rec["error"] = "; ".join(why) or "timeout"
        if mode == "relay":
            rec["sink_count"] = sink.count
        if mode == "local":
            rec["maildir_files"] = count_maildir(maildir)
        span = t_end - t0
        cpu = {}
        for k in ("source", "target", "sink"):
            if cg0[k] is not None and cg1[k] is not None:
                cpu[k] = round(cg1[k] - cg0[k], 3)
        if None not in tsplit0 and None not in tsplit1:
            cpu["target_user"] = round(tsplit1[0] - tsplit0[0], 3)
            cpu["target_sys"] = round(tsplit1[1] - tsplit0[1], 3)
        cpu["harness"] = round((self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime), 3)
        cpu["kthreads"] = round(kthread_delta(kt0, kt1), 3)
        busy = st1["busy"] - st0["busy"]
        cpu["box_busy"] = round(busy, 3)
        cpu["other"] = round(busy - sum(v for k, v in cpu.items() if k in ("source", "target", "sink", "harness", "kthreads")), 3)
        cpu["iowait"] = round(st1["iowait"] - st0["iowait"], 3)
        cpu["box_irq"] = round(st1["softirq"] - st0["softirq"], 3)  # already inside box_busy
        cpu["steal"] = round(st1["steal"] - st0["steal"], 3)
        cpu["span_s"] = round(span, 4)
        cpu["capacity_s"] = round(span * NCPU, 3)
        rec["cpu"] = cpu
    except Exception as e:  # noqa
        rec["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        # -- stop everything this run started ----------------------------------
        if src and src.alive():
            src.signal_group(signal.SIGTERM)
            stop_role(cg, "source", [src], 5)
        if target and target.proc:
            if not target.stop(cg):
                rec.setdefault("warnings", []).append("target needed SIGKILL")
        if sink:
            sink.stop(cg)
        if acct and acct.on:
            acct.stop()
            if target and target.proc:
                rec["breakdown"] = acct.breakdown(target.root_pids(), epoch0)
        if target and rec.get("error") is None:
            got, good = target.verify(n, r)
            if got is not None:
                rec["verified"] = got
                if not good:
                    rec["ok"] = False
                    rec["error"] = "verification failed: %s stored, %s expected" % (got, n)
        if not rec["ok"]:
            try:
                with open(os.path.join(rundir, "smtp-source.err"), "rb") as f:
                    rec["source_out"] = f.read()[-1000:].decode(errors="replace")
            except OSError:
                pass
            if target:
                rec["target_diag"] = target.diag()[-2000:]
        if target:
            try:
                qc = target.queue_counts()
                if qc is not None:
                    rec["queue_after"] = qc
            except Exception:  # noqa - diagnostics only
                pass
            lp = target.log_path()
            scan = scan_log(lp)
            if scan is not None:
                rec["log_problems"] = scan
            if a.logdir and os.path.exists(lp):
                saved = save_log(lp, os.path.join(a.logdir, "%s%s-rep%d.log.gz"
                                                  % (case, "-" + a.label if a.label else "", rep)))
                if saved:
                    rec["log_saved"] = os.path.relpath(saved)
        if not a.keep:
            retire(a, rundir)
    return rec


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
NOISY_CORES = 0.10


def fmt_rate(xs):
    if not xs:
        return "FAILED"
    med = statistics.median(xs)
    return "%7.0f [%5.0f-%5.0f]" % (med, min(xs), max(xs))


def report(paths, out=sys.stdout):
    recs = []
    for p in paths:
        with open(p) as f:
            recs += [json.loads(x) for x in f if x.strip()]
    # records of harness/cases.py (latency, queue100k, conns2000) have their own tables
    case_recs = [r for r in recs if r.get("suite") == "cases"]
    recs = [r for r in recs if r.get("suite") != "cases"]
    if recs:
        throughput_report(recs, out)
    if case_recs:
        import cases
        cases.report_cases(case_recs, out)


def throughput_report(recs, out=sys.stdout):
    groups = {}
    for r in recs:
        key = (r.get("label") or "", r["case"], r["sessions"], r["size"], r["rcpts"], r["n"], r.get("reuse", False))
        groups.setdefault(key, []).append(r)
    hdr = ("%-26s %4s %6s %3s %6s %-1s | %-22s | %-22s | %-5s | %-5s | %s"
           % ("case", "s", "size", "r", "N", "d", "msgs/s med [min-max]", "accept/s med [min-max]", "ok/n",
              "ms/m", "CPU cores, median: target (sys%) / source / sink / kthreads / other ; top target processes"))
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for key in groups:
        rs = groups[key]
        label, case, s, l, r, n, reuse = key
        good = [x for x in rs if x["ok"]]
        rates = [x["msgs_per_s"] for x in good]
        acc = [x["accept_msgs_per_s"] for x in good if "accept_msgs_per_s" in x]

        def cores(k):
            v = [x["cpu"][k] / x["cpu"]["span_s"] for x in good if k in x.get("cpu", {}) and x["cpu"]["span_s"] > 0]
            return "%.2f" % statistics.median(v) if v else "-"

        top = {}
        for x in good:
            for comm, v in (x.get("breakdown") or {}).items():
                top.setdefault(comm, []).append(v["cpu_s"] / x["cpu"]["span_s"])
        tops = sorted(((statistics.median(v), c) for c, v in top.items()), reverse=True)[:4]
        noisy = sum(1 for x in rs if x.get("cpu", {}).get("span_s") and
                    x["cpu"].get("other", 0) / x["cpu"]["span_s"] > NOISY_CORES)
        msper = [1000.0 * x["cpu"]["target"] / x["n"] for x in good if x.get("cpu", {}).get("target")]
        msstr = "%5.2f" % statistics.median(msper) if msper else "    -"
        sysfrac = [x["cpu"]["target_sys"] / x["cpu"]["target"] for x in good
                   if x.get("cpu", {}).get("target_sys") is not None and x["cpu"].get("target")]
        sysstr = "(%2.0f%% sys)" % (100 * statistics.median(sysfrac)) if sysfrac else "         "
        topstr = " ".join("%s=%.2f" % (c, v) for v, c in tops if v >= 0.01)
        busiest = [x["target_threads"]["top"][0]["cores"] for x in good
                   if x.get("target_threads", {}).get("top") and not case.startswith("postfix")]
        if busiest:
            topstr += " (busiest thread %.2f)" % statistics.median(busiest)
        name = case if not label else "%s(%s)" % (case, label)
        print("%-26s %4d %6d %3d %6d %-1s | %-22s | %-22s | %-5s | %s | %s %s / %s / %s / %s / %s%s ; %s"
              % (name, s, l, r, n, "y" if reuse else "n", fmt_rate(rates), fmt_rate(acc),
                 "%d/%d" % (len(good), len(rs)), msstr, cores("target"), sysstr, cores("source"), cores("sink"),
                 cores("kthreads"), cores("other"), " (%d noisy)" % noisy if noisy else "", topstr),
              file=out)
    print("ms/m = target CPU milliseconds per message (all target processes, user+sys).  'noisy' = runs in",
          "which CPU outside this benchmark exceeded %.2f cores on average." % NOISY_CORES, file=out)
    bad = [x for x in recs if not x["ok"]]
    for x in bad:
        print("FAILED %s rep %s: %s" % (x["case"], x["rep"], x.get("error")), file=out)
    problems = {}
    for x in recs:
        for kind, c in ((x.get("log_problems") or {}).get("counts") or {}).items():
            problems.setdefault(x["case"], {}).setdefault(kind, []).append(c)
    for case, kinds in problems.items():
        print("server log of %s: %s" % (case, ", ".join("%s lines per run %s" % (k, "/".join(map(str, v)))
                                                         for k, v in sorted(kinds.items()))), file=out)
    ratio_report(recs, out)


def ratio_report(recs, out=sys.stdout):
    """mailserver (target-*) vs Postfix (postfix-*) per case: medians, spread, ratio of medians."""
    groups = {}
    for r in recs:
        if not (r["case"].startswith("target-") or r["case"].startswith("postfix-")):
            continue
        side, mode = r["case"].split("-", 1)
        key = (r.get("label") or "", r["sessions"], r["size"], r["rcpts"], r["n"], r.get("reuse", False))
        groups.setdefault(key, {}).setdefault(mode, {}).setdefault(side, []).append(r)
    name = "target"
    if any("mailserver" in (r.get("target_cmd") or "") for r in recs):
        name = "mailserver"
    rows = [(k, m, sides) for k, modes in groups.items() for m, sides in modes.items()
            if "target" in sides and "postfix" in sides]
    if not rows:
        return
    order = {"accept": 0, "relay": 1, "local": 2}
    rows.sort(key=lambda x: (x[0], order.get(x[1], 9)))

    def stats(rs):
        good = [x for x in rs if x["ok"]]
        rates = [x["msgs_per_s"] for x in good]
        ms = [1000.0 * x["cpu"]["target"] / x["n"] for x in good if x.get("cpu", {}).get("target")]
        return (statistics.median(rates) if rates else None, rates,
                statistics.median(ms) if ms else None, "%d/%d" % (len(good), len(rs)))

    print("", file=out)
    print("%s / postfix — msgs/s over wall clock, median [min-max] of the ok runs; ratio = %s median / postfix "
          "median (>1: %s faster); ms/msg = server CPU (all its processes, user+sys) per message"
          % (name, name, name), file=out)
    hdr = ("%-7s %4s %6s %3s %6s %-1s | %-22s %-5s | %-22s %-5s | %-6s | %-8s %-8s %-6s"
           % ("case", "s", "size", "r", "N", "d", name + " msgs/s", "ok", "postfix msgs/s", "ok", "ratio",
              "ms/msg " + name[:2], "ms/msg pf", "CPU x"))
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    notes = set()
    for key, mode, sides in rows:
        label, s, l, r, n, reuse = key
        tm, trates, tms, tok = stats(sides["target"])
        pm, prates, pms, pok = stats(sides["postfix"])
        ratio = "%6.2f" % (tm / pm) if tm and pm else "     -"
        cpux = "%6.2f" % (tms / pms) if tms and pms else "     -"
        case = mode if not label else "%s(%s)" % (mode, label)
        print("%-7s %4d %6d %3d %6d %-1s | %-22s %-5s | %-22s %-5s | %s | %8s %8s  %s"
              % (case, s, l, r, n, "y" if reuse else "n", fmt_rate(trates), tok, fmt_rate(prates), pok, ratio,
                 "%.2f" % tms if tms else "-", "%.2f" % pms if pms else "-", cpux), file=out)
        qs = {x.get("accept_queue") for x in sides["target"] if x.get("accept_queue")}
        if mode == "accept" and "deferred" in qs:
            notes.add("accept: %s had no working HOLD (smtpd_data_restrictions = check_client_access "
                      "static:HOLD); its accept runs used the defer_transports fallback and end when N "
                      "envelopes sit in deferred/, so they include a queue-manager pass per message that "
                      "Postfix's hold/ case does not do." % name)
    print("CPU x = %s ms/msg / postfix ms/msg (<1: %s uses less CPU per message)." % (name, name), file=out)
    for note in sorted(notes):
        print("note: " + note, file=out)


# --------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sink-direct postfix-accept postfix-relay postfix-local",
                    help="space/comma separated; see list above")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=20000, help="messages per run (smtp-source -m)")
    ap.add_argument("-s", "--sessions", type=int, default=20, help="parallel sessions (smtp-source -s)")
    ap.add_argument("-l", "--size", type=int, default=2000, help="payload bytes (smtp-source -l)")
    ap.add_argument("-r", "--rcpts", type=int, default=1, help="recipients per message (smtp-source -r)")
    ap.add_argument("-d", "--reuse", action="store_true", help="reuse connections (smtp-source -d)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("BENCH_PORT", 2525)))
    ap.add_argument("--sink-port", type=int, default=int(os.environ.get("SINK_PORT", 2626)))
    ap.add_argument("--rundir", default=os.environ.get("BENCH_RUNDIR", "/tmp/mtabench"))
    ap.add_argument("--target-cmd", default=os.environ.get("TARGET_CMD"))
    ap.add_argument("--postfix-extra", action="append", default=[], help="extra main.cf line (repeatable)")
    ap.add_argument("--label", default="", help="free-form tag stored with each record")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("RUN_TIMEOUT", 300)),
                    help="max seconds per measured run")
    ap.add_argument("--start-timeout", type=float, default=60)
    ap.add_argument("--settle", type=float, default=1.0, help="pause after sync() before each run")
    ap.add_argument("--no-acct", action="store_true", help="skip acct(2) per-process breakdown")
    ap.add_argument("--keep", action="store_true", help="keep the last run directory")
    ap.add_argument("--logdir", default=None, help="save each run's server log here (gzipped)")
    ap.add_argument("--out", default=None, help="JSONL file to append to")
    ap.add_argument("--report", nargs="*", help="print the table for these JSONL files and exit")
    a = ap.parse_args()

    if a.report is not None:
        report(a.report)
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root (Postfix instance, cgroups, acct)")
    cases = [c for c in re.split(r"[\s,]+", a.cases) if c]
    for c in cases:
        if c not in CASES:
            raise SystemExit("unknown case %r; known: %s" % (c, " ".join(CASES)))
    os.makedirs(a.rundir, exist_ok=True)
    out = a.out or os.path.join(BENCH, "results", time.strftime("%Y%m%d-%H%M%S") + ".jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def _term(signum, frame):  # let the finally blocks stop every server we started
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    cg = CGroups(["source", "target", "sink"])
    acct = None if a.no_acct else Acct(os.path.join(a.rundir, "acct.dat"))
    shutil.rmtree(os.path.join(a.rundir, "retired"), ignore_errors=True)  # an interrupted earlier run's
    try:
        for rep in range(1, a.reps + 1):          # interleave cases across repetitions
            for c in cases:
                log("run %s rep %d/%d: n=%d s=%d l=%d r=%d%s" % (c, rep, a.reps, a.n, a.sessions, a.size, a.rcpts,
                                                                  " -d" if a.reuse else ""))
                rec = run_once(a, c, rep, cg, acct)
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if rec["ok"]:
                    cpu = rec.get("cpu", {})
                    log("  -> %.0f msgs/s (%.2fs; accept %.0f/s)  cpu target=%s source=%s sink=%s other=%s"
                        % (rec["msgs_per_s"], rec["wall_s"], rec.get("accept_msgs_per_s", 0), cpu.get("target"),
                           cpu.get("source"), cpu.get("sink"), cpu.get("other")))
                else:
                    log("  -> FAILED: %s" % rec["error"])
                    if rec.get("source_out"):
                        log("     smtp-source: %s" % rec["source_out"].strip()[-300:])
    finally:
        if acct:
            acct.stop()
        cg.cleanup()
        log("deleting the run directories")
        shutil.rmtree(os.path.join(a.rundir, "retired"), ignore_errors=True)
    log("results appended to %s" % out)
    report([out])


if __name__ == "__main__":
    main()
