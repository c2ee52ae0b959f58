#!/usr/bin/env bash
# Loopback SMTP throughput benchmark of mailserver against Postfix (plus smtp-sink
# and bare aiosmtpd baselines).  Debian 12, run as root.  See README.md.
# Not part of the test suite.
#
#   bench/run.sh [full|main|quick|latency|queue100k|conns2000|cases|install|report FILE...]
#     full   (default) install, fsync probe, main matrix, sweeps, fsync probe, the three cases below, tables
#     main   install, fsync probe, main matrix only
#     quick  smoke test: main cases, N=2000, 1 repetition
#     latency | queue100k | conns2000   one of the harness/cases.py cases (README.md "Latency, large
#            queue, many connections"); cases = all three
#
# Environment (defaults in brackets):
#   TARGET_CMD ['exec targets/mailserver.sh']  server under test, started per run with bash -c in
#                  bench/ (must stay in the foreground, listen on $BENCH_LISTEN, honour BENCH_*
#                  variables; see README.md).  Its cases are target-accept / -relay / -local.
#   MAILSERVER_BIN [the `mailserver` on PATH]  the CLI that targets/mailserver.sh runs
#   MAILSERVER_REF     benchmark this commit (e.g. HEAD) instead of the installed working tree:
#                  exported read-only with `git archive`, run with the same interpreter
#   BENCH_PORT [12525]  SINK_PORT [12626]   loopback ports (127.0.0.1 only)
#   REPS [3]  N [20000]  SESSIONS [20]  SIZE [2000]   main-matrix parameters
#   CASES          override the main-matrix case list
#   RUN_TIMEOUT [300]  max seconds per measured run (every run is also bounded by N)
#   BENCH_RUNDIR [/tmp/mtabench]   scratch state (queue, Maildir) - a new one per run; finished
#                  ones are deleted after the last run (BENCH_DELETE_EACH_RUN=1: after each)
#   SKIP_INSTALL=1 skip apt/pip steps
#   harness/cases.py (latency, queue100k, conns2000): CASE_REPS [$REPS]  CASES_SERVERS [mailserver postfix]
#                  CASES_PORT [13525] CASES_SINK_PORT [13626] CASES_DEAD_PORT [13727]
#                  CASES_RUNDIR [/tmp/mtabench-cases]; LAT_N [3000] LAT_RATE [100] LAT_SESSIONS [4]
#                  LAT_WARMUP [50]; QUEUE_N [100000] QUEUE_NEW [100] QUEUE_OBSERVE [30] QUEUE_LAYOUT
#                  [split] QUEUE_LIST QUEUE_CACHE [warm]; CONNS [2000] CONNS_HOLD [5] CONNS_SOURCES [8]
#                  CONNS_RATE [0] POSTFIX_PROCESS_LIMIT [2100] SERVER_NOFILE [inherit]  (see README.md)
set -euo pipefail
if [ "${1:-}" = report ]; then   # report FILE...: resolve the paths before leaving the caller's directory
    args=(report); for f in "${@:2}"; do args+=("$(realpath -- "$f")"); done; set -- "${args[@]}"
fi
cd "$(dirname "$0")"
BENCH=$(pwd)
MODE=${1:-full}
REPS=${REPS:-3}
N=${N:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-2000}
export BENCH_PORT=${BENCH_PORT:-12525} SINK_PORT=${SINK_PORT:-12626} BENCH_RUNDIR=${BENCH_RUNDIR:-/tmp/mtabench}
export RUN_TIMEOUT=${RUN_TIMEOUT:-300}
export TARGET_CMD=${TARGET_CMD-exec targets/mailserver.sh}
PY=${PYTHON:-python3}
if [ -z "${MAILSERVER_BIN:-}" ]; then
    # the real entry point, not a pyenv shim (keeps the target's process tree and acct(2) names clean)
    MAILSERVER_BIN=$( (command -v pyenv >/dev/null && pyenv which mailserver 2>/dev/null) || command -v mailserver || true)
fi
if [ -n "${MAILSERVER_REF:-}" ] && [ "${1:-full}" != report ] && [ "${1:-full}" != install ]; then
    # Benchmark a commit, not the working tree: `git archive` (read-only) of the package into a
    # scratch directory, run with that directory first on PYTHONPATH by the same interpreter.
    sha=$(git -C .. rev-parse --verify "$MAILSERVER_REF^{commit}")
    interp=$(head -1 "${MAILSERVER_BIN:-/nonexistent}" 2>/dev/null | sed -n 's/^#! *//p')
    [ -x "${interp%% *}" ] || interp=$(command -v "$PY")
    # (one export per commit AND interpreter: MAILSERVER_BIN's interpreter is what is measured)
    src="${BENCH_RUNDIR}-src/${sha:0:12}-$(printf %s "$interp" | md5sum | cut -c1-8)"
    if [ ! -x "$src/mailserver-bin" ]; then
        rm -rf "$src"; mkdir -p "$src"
        git -C .. archive "$sha" mailserver config.toml | tar -x -C "$src"
        printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s -m mailserver "$@"\n' "$src" "$interp" > "$src/mailserver-bin"
        chmod +x "$src/mailserver-bin"
    fi
    MAILSERVER_BIN="$src/mailserver-bin"
    BENCH_MS_PYTHON=$(sed -n 's/.* exec \([^ ]*\) -m mailserver.*/\1/p' "$MAILSERVER_BIN"); BENCH_MS_PYTHONPATH=$src
elif [ -n "${MAILSERVER_BIN:-}" ] && [ "${1:-full}" != report ] && [ "${1:-full}" != install ]; then
    BENCH_MS_PYTHON=$(head -1 "$MAILSERVER_BIN" 2>/dev/null | sed -n 's/^#! *\([^ ]*python[^ ]*\).*/\1/p')
    if [ -n "$BENCH_MS_PYTHON" ] && ! (cd / && "$BENCH_MS_PYTHON" -c 'import mailserver') 2>/dev/null; then
        # The installed entry point cannot import the package (e.g. an editable install made from a
        # checkout at another path): run this working tree with the same interpreter instead.
        wt=$(cd .. && pwd)
        src="${BENCH_RUNDIR}-src/worktree-$(printf %s "$wt" | md5sum | cut -c1-8)"
        mkdir -p "$src"
        printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s -m mailserver "$@"\n' "$wt" "$BENCH_MS_PYTHON" > "$src/mailserver-bin"
        chmod +x "$src/mailserver-bin"
        echo "note: $MAILSERVER_BIN cannot import mailserver; using the working tree $wt via $src/mailserver-bin" >&2
        MAILSERVER_BIN="$src/mailserver-bin"; BENCH_MS_PYTHONPATH=$wt
    fi
fi
# the interpreter (+ PYTHONPATH) that runs mailserver: harness/mkqueue.py imports mailserver.spool with it
export MAILSERVER_BIN BENCH_MS_PYTHON=${BENCH_MS_PYTHON:-} BENCH_MS_PYTHONPATH=${BENCH_MS_PYTHONPATH:-}

install() {
    [ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
    if ! command -v smtp-source >/dev/null || ! command -v swaks >/dev/null || ! command -v postfix >/dev/null; then
        # "No configuration": the package's own instance is never configured nor started.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 postfix swaks
    fi
    if ! .venv/bin/python -c 'import aiosmtpd, uvloop' 2>/dev/null; then
        rm -rf .venv
        if ! $PY -m venv .venv; then   # Debian's own python3 needs python3-venv for ensurepip
            rm -rf .venv
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 python3-venv
            $PY -m venv .venv
        fi
        .venv/bin/pip install -q -r requirements.txt
    fi
}

tgt() { [ -n "${TARGET_CMD:-}" ] && echo "$@" || true; }

bench() {  # bench OUTFILE CASES [bench.py args...]
    local out=$1 cases=$2; shift 2
    # progress (stderr) goes to the terminal and $OUT/log.txt; the per-file table is printed at the end
    timeout $(( 3600 * 3 )) $PY harness/bench.py --cases "$cases" --reps "$REPS" --out "$out" --logdir "$OUT/logs" "$@" 2>&1 >/dev/null \
        | tee -a "$OUT/log.txt"
}

cases() {  # cases OUTFILE "CASE..." [cases.py args...]: harness/cases.py (latency, queue100k, conns2000)
    local out=$1 list=$2 servers=${CASES_SERVERS:-"mailserver postfix"}; shift 2
    if [ -z "${TARGET_CMD:-}" ]; then servers=postfix; list=${list/queue100k/}; fi
    [ -n "${list// /}" ] || return 0
    timeout $(( 3600 * 3 )) $PY harness/cases.py --cases "$list" --servers "$servers" --reps "${CASE_REPS:-$REPS}" \
        --out "$out" --logdir "$OUT/logs" "$@" 2>&1 >/dev/null | tee -a "$OUT/log.txt"
}

MAIN_CASES=${CASES:-"sink-direct postfix-accept postfix-relay postfix-local aiosmtpd-discard aiosmtpd-discard-uvloop aiosmtpd-fsync aiosmtpd-fsync-uvloop aiosmtpd-fsync-inline $(tgt target-accept target-relay target-local)"}

case $MODE in
    install) install; exit 0 ;;
    report)  shift; $PY harness/bench.py --report "$@"; exit 0 ;;
    quick)   REPS=1; N=2000 ;;
    main|full) ;;
    latency|queue100k|conns2000|cases) ;;
    *) echo "usage: $0 [full|main|quick|latency|queue100k|conns2000|cases|install|report FILE...]" >&2; exit 2 ;;
esac

[ -n "${SKIP_INSTALL:-}" ] || install
if [[ "${TARGET_CMD:-}" == *targets/mailserver.sh* ]] && ! [ -x "${MAILSERVER_BIN:-}" ]; then
    echo "mailserver not found: install the project (pip install -e .) or set MAILSERVER_BIN" >&2; exit 1
fi
OUT=results/$(date +%Y%m%d-%H%M%S)-$MODE
mkdir -p "$OUT"
{
    echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cpus, $(free -g | awk '/Mem:/{print $2}') GiB"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo "fs: $(findmnt -no SOURCE,FSTYPE,OPTIONS --target "$BENCH_RUNDIR" 2>/dev/null || findmnt -no SOURCE,FSTYPE,OPTIONS /)"
    echo "postfix: $(postconf -d -h mail_version 2>/dev/null)  python: $($PY -V 2>&1)  venv: $(.venv/bin/pip list 2>/dev/null | grep -iE '^(aiosmtpd|uvloop) ' | tr -s ' ' | paste -sd, -)"
    echo "mode=$MODE reps=$REPS N=$N sessions=$SESSIONS size=$SIZE ports=$BENCH_PORT/$SINK_PORT target_cmd=${TARGET_CMD:-none}"
    for v in CASE_REPS CASES_SERVERS CASES_PORT CASES_SINK_PORT CASES_DEAD_PORT CASES_RUNDIR LAT_N LAT_RATE LAT_SESSIONS \
             LAT_WARMUP QUEUE_N QUEUE_NEW QUEUE_OBSERVE QUEUE_LAYOUT QUEUE_LIST QUEUE_CACHE CONNS CONNS_HOLD \
             CONNS_SOURCES CONNS_RATE POSTFIX_PROCESS_LIMIT SERVER_NOFILE; do
        [ -z "${!v:-}" ] || printf '%s=%s ' "$v" "${!v}"
    done; echo
    echo "ulimit -n: $(ulimit -Sn) (soft) / $(ulimit -Hn) (hard): inherited by the servers"
    if [ -n "${MAILSERVER_REF:-}" ]; then
        echo "mailserver: $MAILSERVER_BIN = commit $(git -C .. rev-parse --short "$MAILSERVER_REF^{commit}") ($MAILSERVER_REF), exported with git archive"
    elif [ -n "${MAILSERVER_BIN:-}" ]; then
        echo "mailserver: $MAILSERVER_BIN = working tree of commit $(git -C .. --no-optional-locks rev-parse --short HEAD 2>/dev/null || echo ?) with $(git -C .. --no-optional-locks status --porcelain 2>/dev/null | wc -l) changed/new files"
    fi
} | tee "$OUT/env.txt"

FSYNC_DIR=$BENCH_RUNDIR/fsync
case $MODE in latency|queue100k|conns2000|cases) FSYNC_DIR=${CASES_RUNDIR:-/tmp/mtabench-cases}/fsync ;; esac
echo "== fsync probe (before)"; $PY harness/fsync_bench.py --dir "$FSYNC_DIR" --json "$OUT/fsync-before.json" | tee "$OUT/fsync-before.txt"

case $MODE in
    latency|queue100k|conns2000)
        echo "== case $MODE"; cases "$OUT/cases.jsonl" "$MODE" ;;
    cases)
        echo "== cases: latency queue100k conns2000"; cases "$OUT/cases.jsonl" "latency queue100k conns2000" ;;
    *)
        echo "== main matrix: $MAIN_CASES (s=$SESSIONS l=$SIZE r=1 N=$N, x$REPS)"
        bench "$OUT/main.jsonl" "$MAIN_CASES" -n "$N" -s "$SESSIONS" -l "$SIZE" ;;
esac

if [ "$MODE" = full ]; then
    S1="sink-direct postfix-accept postfix-relay postfix-local aiosmtpd-discard-uvloop aiosmtpd-fsync-uvloop $(tgt target-accept target-relay target-local)"
    echo "== sweep: 1 session";        bench "$OUT/sweep-s1.jsonl"   "$S1" -n 3000 -s 1 -l "$SIZE"
    echo "== sweep: 100 sessions";     bench "$OUT/sweep-s100.jsonl" "$S1" -n "$N" -s 100 -l "$SIZE"
    echo "== sweep: 100 kB messages";  bench "$OUT/sweep-100k.jsonl" "sink-direct postfix-accept postfix-relay postfix-local aiosmtpd-fsync-uvloop $(tgt target-accept target-relay target-local)" -n 5000 -s "$SESSIONS" -l 100000
    echo "== sweep: 10 recipients";    bench "$OUT/sweep-r10.jsonl"  "postfix-accept postfix-relay postfix-local $(tgt target-accept target-relay target-local)" -n 5000 -s "$SESSIONS" -l "$SIZE" -r 10
    echo "== sweep: reused sessions";  bench "$OUT/sweep-reuse.jsonl" "sink-direct postfix-accept aiosmtpd-discard-uvloop aiosmtpd-fsync-uvloop $(tgt target-accept)" -n "$N" -s "$SESSIONS" -l "$SIZE" -d
    echo "== cases: latency queue100k conns2000"; cases "$OUT/cases.jsonl" "latency queue100k conns2000"
    echo "== fsync probe (after)"; $PY harness/fsync_bench.py --dir "$BENCH_RUNDIR/fsync" --json "$OUT/fsync-after.json" | tee "$OUT/fsync-after.txt"
fi

# full table (every case) followed by the mailserver/postfix ratio table
$PY harness/bench.py --report "$OUT"/*.jsonl | tee "$OUT/table.txt"
echo "raw results: $OUT  (server logs per run: $OUT/logs/)"
