#!/usr/bin/env bash
# TARGET_CMD adapter: runs the project's `mailserver` under the bench harness's
# BENCH_* contract (see ../README.md). MAILSERVER_BIN points at the project's CLI
# (default: the `mailserver` on PATH).
#
# accept mode (BENCH_HOLD=1): every message must be accepted, durably queued and
# never delivered.  Postfix does that with
#   smtpd_data_restrictions = check_client_access static:HOLD   (-> hold/)
# and so does this adapter when mailserver really holds mail that way.  Otherwise
# it falls back to defer_transports: the queue manager picks each message up,
# skips the delivery attempt ("deferred transport") and parks it in deferred/
# with a 1-2 h backoff, so nothing is delivered during the run.
#
#   MAILSERVER_ACCEPT=auto (default)  HOLD if `mailserver conf -d smtpd_data_restrictions`
#                                     succeeds AND a one-message probe instance (own port,
#                                     own spool and Maildir) files the message in hold/;
#                                     else the defer_transports fallback
#   MAILSERVER_ACCEPT=hold | defer    force one of them
#
# The adapter tells the harness which queue the messages must end up in by writing
# "hold" or "deferred" to $BENCH_RUNDIR/accept-queue (the harness waits for N
# envelopes, ID.env, there and verifies the count).
set -euo pipefail
BIN=${MAILSERVER_BIN:-mailserver}
PY=${PYTHON:-python3}
ACCEPT_MODE=${MAILSERVER_ACCEPT:-auto}
EXTRA_TOML=${MAILSERVER_EXTRA_TOML:-}
# mailserver reads every MAILSERVER_<PARAM> variable as a parameter override and
# refuses unknown ones: the adapter's own knobs (MAILSERVER_BIN, _REF, _ACCEPT,
# _EXTRA_TOML) must not reach it.  Settings for the server go in MAILSERVER_EXTRA_TOML.
for v in $(compgen -e); do case $v in MAILSERVER_*) unset "$v" ;; esac; done
CFG="$BENCH_RUNDIR/mailserver.toml"
maildir_name=$(basename "$BENCH_MAILDIR")
vmap="$BENCH_RUNDIR/vmailbox"; tmap="$BENCH_RUNDIR/transport"
: > "$vmap"
for i in "" 2 3 4 5 6 7 8 9 10; do echo "${i}rcpt@$BENCH_LOCAL_DOMAIN $maildir_name/" >> "$vmap"; done
echo "$BENCH_RELAY_DOMAIN smtp:[$BENCH_RELAY_HOST]:$BENCH_RELAY_PORT" > "$tmap"
# BENCH_TRANSPORT_EXTRA: more "domain transport" lines (harness/cases.py: queue100k's dead
# destination); their domains are added to relay_domains.
relay_domains="\"$BENCH_RELAY_DOMAIN\""
if [ -n "${BENCH_TRANSPORT_EXTRA:-}" ]; then
    printf '%s\n' "$BENCH_TRANSPORT_EXTRA" >> "$tmap"
    relay_domains+=$(printf '%s\n' "$BENCH_TRANSPORT_EXTRA" | awk 'NF { printf ", \"%s\"", $1 }')
fi

HOLD_TOML='smtpd_data_restrictions = ["check_client_access static:HOLD"]'
DEFER_TOML='defer_transports = ["virtual", "smtp", "relay"]
minimal_backoff_time = "1h"
maximal_backoff_time = "2h"'

write_cfg() {  # FILE QUEUE_DIR MAILBOX_BASE LISTEN EXTRA_TOML
    cat > "$1" <<TOML
myhostname = "mailserver.bench.test"
mydestination = []
mynetworks = ["127.0.0.0/8"]
queue_directory = "$2"
virtual_mailbox_domains = ["$BENCH_LOCAL_DOMAIN"]
virtual_mailbox_base = "$3"
virtual_mailbox_maps = "texthash:$vmap"
relay_domains = [$relay_domains]
transport_maps = "texthash:$tmap"
$5
$EXTRA_TOML

[services.smtp]
listen = ["$4"]
TOML
}

say() { echo "mailserver.sh: $*" >&2; }

probe_hold() {
    # Start a throw-away instance with the HOLD configuration on its own port, spool and
    # Maildir, send it one message, and see whether it lands in hold/.  Bounded (~40 s max).
    local dir="$BENCH_RUNDIR/hold-probe" port=$(( ${BENCH_LISTEN_PORT:-12525} + 1000 )) pid rc=1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        say "HOLD probe: port $port is in use by someone else; not probing"
        return 1
    fi
    mkdir -p "$dir/mail/$maildir_name/new" "$dir/mail/$maildir_name/cur" "$dir/mail/$maildir_name/tmp"
    write_cfg "$dir/probe.toml" "$dir/spool" "$dir/mail" "127.0.0.1:$port" "$HOLD_TOML"
    "$BIN" run -c "$dir/probe.toml" > "$dir/probe.log" 2>&1 &
    pid=$!
    timeout 35 "$PY" - "$port" "$dir/spool/hold" "$dir/mail/$maildir_name" "$BENCH_LOCAL_DOMAIN" "$pid" <<'PY' >&2 && rc=0 || rc=$?
import os, smtplib, sys, time
port, hold, maildir, domain, pid = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
deadline = time.monotonic() + 20
while True:
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        break
    except OSError:
        try:   # not our child: a dead instance stays a zombie until the adapter reaps it
            with open("/proc/%d/stat" % pid) as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            alive = False
        if not alive or time.monotonic() > deadline:
            print("mailserver.sh: HOLD probe: the probe instance did not start (see hold-probe/probe.log)")
            sys.exit(2)
        time.sleep(0.2)
try:
    s.sendmail("probe@src.test", ["rcpt@" + domain], b"Subject: hold probe\r\n\r\nprobe\r\n")
    s.quit()
except smtplib.SMTPException as e:
    print("mailserver.sh: HOLD probe: message refused: %s" % e)
    sys.exit(3)
def count(d, suffix=""):
    try:
        return sum(1 for x in os.listdir(d) if x.endswith(suffix))
    except OSError:
        return 0
end = time.monotonic() + 5
while time.monotonic() < end:
    if count(hold, ".env"):
        sys.exit(0)
    if count(os.path.join(maildir, "new")) + count(os.path.join(maildir, "cur")):
        print("mailserver.sh: HOLD probe: the message was delivered, not held")
        sys.exit(1)
    time.sleep(0.05)
print("mailserver.sh: HOLD probe: the message did not reach hold/ within 5 s")
sys.exit(1)
PY
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return $rc
}

accept_toml=""
if [ "${BENCH_HOLD:-}" = 1 ]; then
    mode=$ACCEPT_MODE
    if [ "$mode" = auto ]; then
        if ! "$BIN" conf -d smtpd_data_restrictions >/dev/null 2>&1; then
            say "smtpd_data_restrictions is unknown to mailserver"
            mode=defer
        elif probe_hold; then
            mode=hold
        else
            mode=defer
        fi
    fi
    case $mode in
        hold)  accept_toml=$HOLD_TOML;  echo hold > "$BENCH_RUNDIR/accept-queue"
               say "accept mode: static:HOLD (messages go to hold/)" ;;
        defer) accept_toml=$DEFER_TOML; echo deferred > "$BENCH_RUNDIR/accept-queue"
               say "accept mode: no working HOLD; defer_transports fallback (messages are parked in deferred/)" ;;
        *)     say "MAILSERVER_ACCEPT must be auto, hold or defer"; exit 2 ;;
    esac
fi
write_cfg "$CFG" "$BENCH_SPOOL" "$(dirname "$BENCH_MAILDIR")" "$BENCH_LISTEN" "$accept_toml"
exec "$BIN" run -c "$CFG"
