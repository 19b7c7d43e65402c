#!/usr/bin/env bash
# What watching a run costs (issue 14): the same runs without an observer,
# with --trace, and with --timeline, alternating, REPS times each.
#
#   scripts/trace_cost.sh          # REPS=7 by default
#   REPS=11 scripts/trace_cost.sh
#
# Two workloads: `touch pages=2048` (first touch of each page is one shadow
# demand fault: an exit, a RESOLVE_PF hypercall, the shadow MMU, the host
# fault; cycles per page measured by the guest in ring 3) and wss under
# ksmd and kswapd on too little machine memory (aging, reclaim, swap,
# notifier invalidations and shootdowns from three threads; the run's wall
# time in-process and for the whole process, the trace's writing
# included). Prints medians and their ratios to the plain run.
# Needs /dev/kvm and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-7}

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/shadowvm
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# run NAME WORKLOAD OBSERVER: --json on stderr, guest output, process time.
run() {
    local name=$1 work=$2 obs=$3 args=()
    case $obs in
        plain) ;;
        trace) args=(--trace "$out/trace.json") ;;
        timeline) args=(--timeline "$out/timeline.svg") ;;
    esac
    local cmd
    case $work in
        touch) cmd=(run touch --json "${args[@]}" -- pages=2048) ;;
        wss) cmd=(run wss --mem 16M --machine-mem 4M --reclaim --reclaim-interval-ms 20
                  --ksm --ksm-pages-to-scan 1000 --ksm-sleep-ms 1 --json "${args[@]}"
                  -- cold=1024 hot=16 duration_ms=200) ;;
    esac
    local t0 t1
    t0=$(date +%s%N)
    if ! timeout 300 "$bin" "${cmd[@]}" >"$out/$name.out" 2>"$out/$name.json"; then
        echo "trace_cost: run $name failed:" >&2
        cat "$out/$name.out" "$out/$name.json" >&2
        exit 1
    fi
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000)) >"$out/$name.us"
    if [ "$obs" = trace ]; then stat -c %s "$out/trace.json" >"$out/$name.bytes"; fi
}

echo "trace_cost: $REPS reps of touch and wss, each plain, --trace, --timeline" >&2
for r in $(seq "$REPS"); do
    for work in touch wss; do
        for obs in plain trace timeline; do
            run "$work-$obs-$r" "$work" "$obs"
        done
    done
done

python3 - "$out" "$REPS" <<'PY'
import json, re, statistics, sys

out, reps = sys.argv[1], int(sys.argv[2])
med = statistics.median

def load(name):
    lines = open(f"{out}/{name}.json").read().splitlines()
    stats = json.loads([l for l in lines if l.startswith("{")][-1])
    guest = open(f"{out}/{name}.out").read()
    proc = int(open(f"{out}/{name}.us").read())
    return stats, guest, proc

def first_touch(guest):
    m = re.search(r"touch: first \d+ pages \d+ cycles (\d+) cycles/page", guest)
    return int(m.group(1))

def resolve_pf_us(s):
    return s["hypercall_us"]["resolve_pf"] / max(s["hypercalls"]["resolve_pf"], 1)

rows = {
    "touch": [
        ("first touch, cycles/page (guest, rdtsc)", lambda s, g, p: first_touch(g)),
        ("RESOLVE_PF in the VMM, us/call", lambda s, g, p: resolve_pf_us(s)),
        ("process wall time, ms", lambda s, g, p: p / 1000),
    ],
    "wss": [
        ("in-process wall time, ms", lambda s, g, p: s["wall_us"] / 1000),
        ("RESOLVE_PF in the VMM, us/call", lambda s, g, p: resolve_pf_us(s)),
        ("host flush, us/call", lambda s, g, p: s["host_invalidate"]["flush_ns"] / 1000 / max(s["host_invalidate"]["flushes"], 1)),
        ("process wall time, ms", lambda s, g, p: p / 1000),
    ],
}
print(f"medians of {reps} alternating runs; ratio to the plain run")
for work, metrics in rows.items():
    print()
    print(f"{work:<44} {'plain':>10} {'--trace':>16} {'--timeline':>16}")
    for label, f in metrics:
        v = {obs: med(f(*load(f"{work}-{obs}-{r}")) for r in range(1, reps + 1))
             for obs in ("plain", "trace", "timeline")}
        print(f"  {label:<42} {v['plain']:>10.1f} {v['trace']:>9.1f} ({v['trace'] / v['plain']:.2f}x)"
              f" {v['timeline']:>9.1f} ({v['timeline'] / v['plain']:.2f}x)")
    sizes = [int(open(f"{out}/{work}-trace-{r}.bytes").read()) for r in range(1, reps + 1)]
    print(f"  trace size: {med(sizes) / 1e6:.1f} MB")
PY
