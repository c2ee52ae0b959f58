#!/usr/bin/env bash
# Interleaved A/B of two mailserver commits on one case (not part of the test suite).
#
#   bench/ab.sh accept|relay|local PAIRS N REF_A REF_B      e.g. bench/ab.sh local 4 10000 HEAD~3 HEAD
#
# Whole benchmark invocations (run.sh) differ by 5-10 % from one to the next (Postfix's
# medians too), more than most single changes.  This runs the two commits alternately
# (A, B, A, B, ...) through profile.sh with PROFILER=none, so that both see the same
# minutes of the machine, and prints per run: msgs/s, server CPU and event-loop-thread
# CPU per message; then the medians and B's change against A.  REF_B may be "worktree"
# (the working tree).  Each commit is exported with `git archive` into $AB_DIR/<sha>/
# and run by PYTHON (default: python3) with that directory first on PYTHONPATH.
# Figures are for comparing versions in the same minutes, not for the ratio table.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:?accept|relay|local}
PAIRS=${2:?pairs}
N=${3:?messages per run}
REF_A=${4:?commit A}
REF_B=${5:?commit B or worktree}
PY=${PYTHON:-python3}
AB_DIR=${AB_DIR:-/tmp/mailserver-ab}
mkdir -p "$AB_DIR"

wrapper() {  # REF -> path of an executable that runs that version's `mailserver`
    local ref=$1 src
    if [ "$ref" = worktree ]; then
        src=$(cd .. && pwd)
    else
        local sha
        sha=$(git -C .. rev-parse --verify "$ref^{commit}")
        src="$AB_DIR/${sha:0:12}"
        if [ ! -d "$src/mailserver" ]; then
            rm -rf "$src"; mkdir -p "$src"
            git -C .. archive "$sha" mailserver | tar -x -C "$src"
        fi
    fi
    local bin
    bin="$AB_DIR/run-$(printf %s "$src $PY" | md5sum | cut -c1-8)"
    printf '#!/bin/sh\ncd / && PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s -m mailserver "$@"\n' "$src" "$PY" > "$bin"
    chmod +x "$bin"
    echo "$bin"
}

bin_a=$(wrapper "$REF_A")
bin_b=$(wrapper "$REF_B")
out="$AB_DIR/ab-$MODE-$$.txt"
: > "$out"
for i in $(seq "$PAIRS"); do
    for side in A B; do
        bin=$bin_a; [ "$side" = B ] && bin=$bin_b
        line=$(MAILSERVER_ACCEPT=hold MAILSERVER_BIN=$bin PROFILER=none N=$N OUT="$AB_DIR/profile" \
               bash profile.sh "$MODE" 2>&1 | tail -1)
        # "<mode>: N msgs in Ts = R msg/s; server CPU C ms/msg (...; event-loop thread L; under the profiler)"
        rate=$(sed -nE 's/.*= ([0-9]+) msg\/s.*/\1/p' <<<"$line")
        cpu=$(sed -nE 's/.*server CPU ([0-9.]+) ms\/msg.*/\1/p' <<<"$line")
        loop=$(sed -nE 's/.*event-loop thread ([0-9.]+);.*/\1/p' <<<"$line")
        if [ -z "$rate" ] || [ -z "$loop" ]; then
            echo "pair $i $side: no result: $line" >&2
            exit 1
        fi
        printf '%s %s %s %s\n' "$side" "$rate" "$cpu" "$loop" | tee -a "$out"
    done
done
"$PY" - "$out" "$REF_A" "$REF_B" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
col = lambda side, k: [float(r[k]) for r in rows if r[0] == side]
names = {1: "msgs/s", 2: "server CPU ms/msg", 3: "event-loop CPU ms/msg"}
print(f"A = {sys.argv[2]}, B = {sys.argv[3]}; medians of {len(col('A', 1))} runs each")
for k, name in names.items():
    a, b = statistics.median(col("A", k)), statistics.median(col("B", k))
    pairs = list(zip(col("A", k), col("B", k)))
    better = sum((y > x) if k == 1 else (y < x) for x, y in pairs)
    print(f"  {name:24} A {a:8.2f}   B {b:8.2f}   B/A {b / a - 1:+6.1%}   B better in {better}/{len(pairs)} pairs")
EOF
