#!/usr/bin/env bash
# Profile mailserver on one benchmark case with py-spy (not part of the test suite).
#
#   bench/profile.sh accept|relay|local [N]
#
# Starts mailserver through targets/mailserver.sh exactly as the benchmark does
# (same config; accept mode = HOLD when it works), on BENCH_PORT+2000 (14525) and a
# private scratch directory, drives it with smtp-source (20 sessions, 2000-byte
# messages), samples it with `py-spy record` for the whole run (all threads, the
# GIL holder marked) and prints the top self-time and inclusive-time frames
# (bench/harness/pyspy_top.py).  Outputs: $OUT/profile-<case>.txt (collapsed
# stacks) and $OUT/profile-<case>.top.txt.  py-spy: `pip install py-spy`.
#
# Environment: N (5000), OUT (bench/results/profile), PROFILE_RUNDIR (/tmp/msprof),
# PYSPY_RATE (250 samples/s), PYSPY_ARGS (extra py-spy options, e.g. --gil).
set -euo pipefail
OUT=$(realpath -m "${OUT:-$(dirname "$0")/results/profile}")
cd "$(dirname "$0")"
MODE=${1:?accept|relay|local}
N=${2:-${N:-5000}}
PORT=$(( ${BENCH_PORT:-12525} + 2000 ))
SINKPORT=$(( ${SINK_PORT:-12626} + 2000 ))
RUNDIR=${PROFILE_RUNDIR:-/tmp/msprof}
mkdir -p "$OUT"
rm -rf "$RUNDIR"; mkdir -p "$RUNDIR"/spool "$RUNDIR"/mail/Maildir/{new,cur,tmp}
export BENCH_MODE=$MODE BENCH_HOLD=$([ "$MODE" = accept ] && echo 1 || echo 0)
export BENCH_LISTEN=127.0.0.1:$PORT BENCH_LISTEN_HOST=127.0.0.1 BENCH_LISTEN_PORT=$PORT
export BENCH_LOCAL_DOMAIN=dom.test BENCH_MAILDIR=$RUNDIR/mail/Maildir BENCH_RELAY_DOMAIN=relay.test
export BENCH_RELAY_HOST=127.0.0.1 BENCH_RELAY_PORT=$SINKPORT BENCH_SPOOL=$RUNDIR/spool BENCH_RUNDIR=$RUNDIR
if [ -z "${MAILSERVER_BIN:-}" ]; then
    MAILSERVER_BIN=$( (command -v pyenv >/dev/null && pyenv which mailserver 2>/dev/null) || command -v mailserver)
fi
export MAILSERVER_BIN
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
if [ "$MODE" = relay ]; then
    smtp-sink -u nobody -c 127.0.0.1:$SINKPORT 1024 > "$RUNDIR/sink.out" 2>&1 &
    pids+=($!)
fi
bash targets/mailserver.sh > "$RUNDIR/server.log" 2>&1 &
server=$!
pids+=($server)
for _ in $(seq 600); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    sleep 0.1
done
pypid=$(pgrep -P "$server" -n || echo "$server")   # exec'd: the adapter's pid is the server
[ -d /proc/$server ] && pypid=$server
if [ "${PROFILER:-py-spy}" = none ]; then      # just the rate and CPU split
    sleep 3600 &
elif [ "${PROFILER:-py-spy}" = perf ]; then    # exact counts of a few events, little overhead
    perf stat -e syscalls:sys_enter_futex,syscalls:sys_enter_fsync,syscalls:sys_enter_getpid,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,context-switches,cpu-migrations \
        -o "$OUT/perf-$MODE.txt" -p "$pypid" &
elif [ "${PROFILER:-py-spy}" = perf-futex ]; then   # who calls futex (C call chains)
    perf record -e syscalls:sys_enter_futex -g -o "$OUT/perf-futex-$MODE.data" -p "$pypid" 2> "$RUNDIR/perf.out" &
elif [ "${PROFILER:-py-spy}" = strace ]; then   # syscall counts instead (slows the server down)
    strace -f -c -o "$OUT/strace-$MODE.txt" -p "$pypid" 2> "$RUNDIR/strace.out" &
else
    py-spy record --rate "${PYSPY_RATE:-250}" --threads --format raw ${PYSPY_ARGS:-} \
        -o "$OUT/profile-$MODE.txt" --pid "$pypid" > "$RUNDIR/pyspy.out" 2>&1 &
fi
spy=$!
sleep 1
t0=$(date +%s.%N)
cpu0=$(awk '{print $14" "$15}' /proc/$pypid/stat)
loop0=$(awk '{print $14+$15}' /proc/$pypid/task/$pypid/stat)
smtp-source -M client.bench.test -s 20 -m "$N" -l 2000 -f sender@src.test \
    -t "rcpt@$([ "$MODE" = relay ] && echo relay.test || echo dom.test)" 127.0.0.1:$PORT
count() { case $MODE in
    accept) ls "$RUNDIR/spool/hold" 2>/dev/null | grep -c '\.env$' || true ;;
    local) ls "$RUNDIR/mail/Maildir/new" | wc -l ;;
    relay) ls "$RUNDIR/spool/active" "$RUNDIR/spool/incoming" 2>/dev/null | grep -c '\.env$' || true ;;
esac; }
for _ in $(seq 1200); do
    c=$(count)
    if [ "$MODE" = relay ]; then [ "$c" = 0 ] && break; else [ "$c" -ge "$N" ] && break; fi
    sleep 0.05
done
t1=$(date +%s.%N)
cpu1=$(awk '{print $14" "$15}' /proc/$pypid/stat)
loop1=$(awk '{print $14+$15}' /proc/$pypid/task/$pypid/stat)
if [ "${PROFILER:-py-spy}" = none ]; then kill -TERM $spy; else kill -INT $spy; fi 2>/dev/null; wait $spy || true
python3 - "$t0" "$t1" "$cpu0" "$cpu1" "$N" "$MODE" "$loop0" "$loop1" <<'PY' | tee "$OUT/profile-$MODE.summary.txt"
import os, sys
t0, t1, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[5])
(u0, s0), (u1, s1) = (map(int, sys.argv[3].split())), (map(int, sys.argv[4].split()))
hz = os.sysconf("SC_CLK_TCK")
ms = lambda ticks: ticks / hz * 1000 / n
print(f"{sys.argv[6]}: {n} msgs in {t1 - t0:.1f}s = {n / (t1 - t0):.0f} msg/s; server CPU "
      f"{ms(u1 - u0 + s1 - s0):.2f} ms/msg (user {ms(u1 - u0):.2f}, sys {ms(s1 - s0):.2f}; event-loop thread {ms(int(sys.argv[8]) - int(sys.argv[7])):.2f}; under the profiler)")
PY
if [ "${PROFILER:-py-spy}" = none ]; then
    :
elif [ "${PROFILER:-py-spy}" = perf-futex ]; then
    sleep 1
    perf report -i "$OUT/perf-futex-$MODE.data" --stdio --no-children -g caller,0.5,callee --percent-limit 2 2>/dev/null | head -120
elif [ "${PROFILER:-py-spy}" = perf ]; then
    sleep 0.5
    awk -v n="$N" '$1 ~ /^[0-9,]+$/ {c=$1; gsub(",","",c); printf "%12s  %-40s %8.2f/msg\n", $1, $2, c/n}' "$OUT/perf-$MODE.txt"
elif [ "${PROFILER:-py-spy}" = strace ]; then
    sleep 1
    awk -v n="$N" 'NR<=2 {print; next} $NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ {printf "%s  %8.2f/msg\n", $0, $4/n; next} {print}' \
        "$OUT/strace-$MODE.txt" | head -40
else
    python3 harness/pyspy_top.py "$OUT/profile-$MODE.txt" > "$OUT/profile-$MODE.top.txt"
    head -60 "$OUT/profile-$MODE.top.txt"
fi
