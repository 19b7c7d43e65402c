#!/usr/bin/env bash
# Issue 5's figures in one command: first-touch and re-touch cost per page,
# shadow vs kvm paging; the shadow fault round trip broken down; the cost of
# a TLB shootdown (HostTlbFlush::flush_frames) with 1 and 2 vCPUs.
#
#   scripts/bench.sh            # PAGES=2048 REPS=3 by default
#   PAGES=4096 REPS=5 scripts/bench.sh
#
# Builds the release binary once, runs the `touch` guest (guests/touch.c)
# with --json, and prints a table. Cycle figures come from rdtsc in guest
# ring 3; microseconds use TSC_MHZ (default: "cpu MHz" of /proc/cpuinfo,
# which is the TSC rate when the CPU has constant_tsc/tsc_known_freq).
# Needs /dev/kvm and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

PAGES=${PAGES:-2048}
REPS=${REPS:-3}
SHOOT_PAGES_1=${SHOOT_PAGES_1:-512}     # 1-frame flushes: this many calls
SHOOT_PAGES_N=${SHOOT_PAGES_N:-4096}    # batches of SHOOT_BATCH frames
SHOOT_BATCH=${SHOOT_BATCH:-512}
TSC_MHZ=${TSC_MHZ:-$(awk -F: '/^cpu MHz/ { print $2 + 0; exit }' /proc/cpuinfo)}

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/shadowvm
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# run NAME SHADOWVM-OPTIONS... -- GUEST-ARGS...: stdout and --json kept.
run() {
    local name=$1
    shift
    if ! timeout 300 "$bin" run touch --json "$@" >"$out/$name.out" 2>"$out/$name.json"; then
        echo "bench: run $name failed:" >&2
        cat "$out/$name.out" "$out/$name.json" >&2
        exit 1
    fi
}

echo "bench: $REPS reps of $PAGES pages per mode; shootdowns with 1 and 2 vCPUs" >&2
for r in $(seq "$REPS"); do
    run "shadow-$r" --paging shadow -- "pages=$PAGES"
    run "kvm-$r" --paging kvm -- "pages=$PAGES"
    for v in 1 2; do
        run "shoot1-v$v-$r" --paging shadow --vcpus "$v" -- "pages=$SHOOT_PAGES_1" chunk=1
        run "shootN-v$v-$r" --paging shadow --vcpus "$v" -- "pages=$SHOOT_PAGES_N" "chunk=$SHOOT_BATCH"
    done
done

python3 - "$out" "$REPS" "$TSC_MHZ" "$SHOOT_BATCH" <<'PY'
import json, re, statistics, sys

out, reps, mhz, batch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

def load(name):
    text = open(f"{out}/{name}.json").read()
    stats, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    guest = open(f"{out}/{name}.out").read()
    per = {k: int(v) for k, v in re.findall(r"touch: (first|retouch) \d+ pages \d+ cycles (\d+) cycles/page", guest)}
    per.update((k, int(v)) for k, v in re.findall(r"touch: (ping) \d+ calls (\d+) cycles/call", guest))
    return stats, per

def us(cycles):
    return cycles / mhz

med = statistics.median
runs = {m: [load(f"{m}-{r}") for r in range(1, reps + 1)] for m in ("shadow", "kvm")}
cyc = {m: {k: med(p[k] for _, p in runs[m]) for k in ("first", "retouch")} for m in runs}

print(f"TSC {mhz:.0f} MHz; medians of {reps} runs")
print()
print("Per page, ring 3 (rdtsc)        shadow            kvm        shadow/kvm")
for k, label in (("first", "first touch"), ("retouch", "re-touch")):
    s, v = cyc["shadow"][k], cyc["kvm"][k]
    print(f"  {label:<14} {s:>10.0f} cyc {us(s):>8.3f} us  {v:>8.0f} cyc {us(v):>8.3f} us  {s / v:>8.1f}x")

# Round trip of one shadow demand fault: the median run by first-touch cost.
st, per = sorted(runs["shadow"], key=lambda r: r[1]["first"])[reps // 2]
m = st["mmu"]
fixed = max(m["pf_fixed"], 1)
nres = max(st["hypercalls"].get("resolve_pf", 0), 1)
total = us(per["first"] - per["retouch"])
vmm = st["hypercall_us"].get("resolve_pf", 0.0) / nres
walk, host, inst = (m[k] / 1000 / fixed for k in ("pf_walk_ns", "pf_host_ns", "pf_install_ns"))
kvm_first = us(cyc["kvm"]["first"] - cyc["kvm"]["retouch"])
print()
print("Shadow demand fault round trip (per fault)                 us")
print(f"  guest-side (first touch - re-touch)                {total:>9.2f}")
print(f"    outside the VMM: exit/entry, emulated ring-0 #PF")
print(f"    handler, host KVM shadowing                      {total - vmm:>9.2f}")
print(f"    VMM RESOLVE_PF handling ({nres} calls)            {vmm:>9.2f}")
print(f"      walk (pf_walk_ns)                              {walk:>9.2f}")
print(f"      host fault (pf_host_ns, hva_to_pfn)            {host:>9.2f}")
print(f"      install (pf_install_ns, lock..flush)           {inst:>9.2f}")
print(f"      rest (decode, registers, dispatch)             {vmm - walk - host - inst:>9.2f}")
print(f"  for scale: kvm-mode first touch - re-touch          {kvm_first:>9.2f}")
ping = med(p["ping"] for _, p in runs["shadow"])
nping = max(st["hypercalls"].get("host_op", 0), 1)
print(f"  for scale: ring-0 PING hypercall, guest-side        {us(ping):>9.2f}"
      f"  (VMM {st['hypercall_us'].get('host_op', 0.0) / nping:.2f})")

print()
print("TLB shootdown (HostTlbFlush::flush_frames)   1 vCPU       2 vCPUs   (median run)")
for tag, label in (("shoot1", "1 frame"), ("shootN", f"{batch} frames")):
    cells = []
    for v in (1, 2):
        per_run = []
        for r in range(1, reps + 1):
            h = load(f"{tag}-v{v}-{r}")[0]["host_invalidate"]
            n = max(h["flushes"], 1)
            per_run.append((h["flush_ns"] / 1000 / n, h["mprotect_calls"] / n, h["memslot_bounces"], h["frames"] / n))
        cells.append(sorted(per_run)[reps // 2])
    print(f"  {label:<12} us per call          {cells[0][0]:>9.1f}     {cells[1][0]:>9.1f}")
    print(f"  {'':<12} us per frame         {cells[0][0] / cells[0][3]:>9.2f}     {cells[1][0] / cells[1][3]:>9.2f}")
    print(f"  {'':<12} mprotect pairs/call  {cells[0][1]:>9.2f}     {cells[1][1]:>9.2f}"
          f"   (memslot bounces: {cells[0][2]}, {cells[1][2]})")
PY
