#!/usr/bin/env bash
# Issue 5's figures in one command: first-touch and re-touch cost per page,
# shadow vs kvm paging; the shadow fault round trip broken down; the cost of
# a TLB shootdown (HostTlbFlush::flush_frames) with 1 and 2 vCPUs; the
# hypercall round trip (PING).
#
#   scripts/bench.sh            # PAGES=2048 REPS=3 by default
#   PAGES=4096 REPS=5 scripts/bench.sh
#   BASE=main scripts/bench.sh  # also build git revision `main` and compare
#
# Builds the release binary once, runs the `touch` guest (guests/touch.c)
# with --json, and prints a table. Cycle figures come from rdtsc in guest
# ring 3; microseconds use TSC_MHZ (default: "cpu MHz" of /proc/cpuinfo,
# which is the TSC rate when the CPU has constant_tsc/tsc_known_freq).
#
# With BASE=<rev>, the tree at <rev> is exported (git archive), built into
# target/bench-base, and both binaries run in the same loop, alternately
# (base, this, base, this, ...), so that both see the same machine load; a
# last table gives every figure of both and their ratio (this / base).
# Needs /dev/kvm and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

PAGES=${PAGES:-2048}
REPS=${REPS:-3}
SHOOT_PAGES_1=${SHOOT_PAGES_1:-512}     # 1-frame flushes: this many calls
SHOOT_PAGES_N=${SHOOT_PAGES_N:-4096}    # batches of SHOOT_BATCH frames
SHOOT_BATCH=${SHOOT_BATCH:-512}
TSC_MHZ=${TSC_MHZ:-$(awk -F: '/^cpu MHz/ { print $2 + 0; exit }' /proc/cpuinfo)}
BASE=${BASE:-}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo build --release --quiet
target=${CARGO_TARGET_DIR:-target}
bins=("this=$target/release/shadowvm")
if [ -n "$BASE" ]; then
    rev=$(git rev-parse --short "$BASE")
    echo "bench: building the base binary at $BASE ($rev)" >&2
    mkdir -p "$out/base-src"
    git archive "$rev" | tar -x -C "$out/base-src"
    CARGO_TARGET_DIR="$PWD/$target/bench-base" cargo build --release --quiet \
        --manifest-path "$out/base-src/Cargo.toml"
    bins=("base=$target/bench-base/release/shadowvm" "${bins[@]}")
fi

# run BIN NAME SHADOWVM-OPTIONS... -- GUEST-ARGS...: stdout and --json kept.
run() {
    local bin=$1 name=$2
    shift 2
    if ! timeout 300 "$bin" run touch --json "$@" >"$out/$name.out" 2>"$out/$name.json"; then
        echo "bench: run $name failed:" >&2
        cat "$out/$name.out" "$out/$name.json" >&2
        exit 1
    fi
}

echo "bench: $REPS reps of $PAGES pages per mode; shootdowns with 1 and 2 vCPUs" >&2
for r in $(seq "$REPS"); do
    for b in "${bins[@]}"; do
        tag=${b%%=*}
        bin=${b#*=}
        run "$bin" "$tag-shadow-$r" --paging shadow -- "pages=$PAGES"
        run "$bin" "$tag-kvm-$r" --paging kvm -- "pages=$PAGES"
        for v in 1 2; do
            run "$bin" "$tag-shoot1-v$v-$r" --paging shadow --vcpus "$v" -- "pages=$SHOOT_PAGES_1" chunk=1
            run "$bin" "$tag-shootN-v$v-$r" --paging shadow --vcpus "$v" -- "pages=$SHOOT_PAGES_N" "chunk=$SHOOT_BATCH"
        done
    done
done

python3 - "$out" "$REPS" "$TSC_MHZ" "$SHOOT_BATCH" "${bins[@]%%=*}" <<'PY'
import json, re, statistics, sys

out, reps, mhz, batch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
tags = sys.argv[5:]

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

def figures(tag):
    """Every figure of one binary, as {name: value in us}, and prints its tables."""
    runs = {m: [load(f"{tag}-{m}-{r}") for r in range(1, reps + 1)] for m in ("shadow", "kvm")}
    cyc = {m: {k: med(p[k] for _, p in runs[m]) for k in ("first", "retouch")} for m in runs}
    fig = {}

    print(f"[{tag}] TSC {mhz:.0f} MHz; medians of {reps} runs")
    print()
    print("Per page, ring 3 (rdtsc)        shadow            kvm        shadow/kvm")
    for k, label in (("first", "first touch"), ("retouch", "re-touch")):
        s, v = cyc["shadow"][k], cyc["kvm"][k]
        fig[f"{label}, shadow (us/page)"] = us(s)
        fig[f"{label}, kvm (us/page)"] = us(v)
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
    print(f"    outside the VMM: exit/entry, emulated ring-1 #PF")
    print(f"    handler, host KVM shadowing                      {total - vmm:>9.2f}")
    print(f"    VMM RESOLVE_PF handling ({nres} calls)            {vmm:>9.2f}")
    print(f"      walk (pf_walk_ns)                              {walk:>9.2f}")
    print(f"      host fault (pf_host_ns, hva_to_pfn)            {host:>9.2f}")
    print(f"      install (pf_install_ns, lock..flush)           {inst:>9.2f}")
    print(f"      rest (decode, registers, dispatch)             {vmm - walk - host - inst:>9.2f}")
    print(f"  for scale: kvm-mode first touch - re-touch          {kvm_first:>9.2f}")
    fig["RESOLVE_PF in the VMM (us)"] = vmm
    for mode in ("shadow", "kvm"):
        ping = med(p["ping"] for _, p in runs[mode])
        fig[f"PING hypercall round trip, {mode} (us)"] = us(ping)
    nping = max(st["hypercalls"].get("host_op", 0), 1)
    print(f"  for scale: ring-1 PING hypercall, guest-side        {fig['PING hypercall round trip, shadow (us)']:>9.2f}"
          f"  (VMM {st['hypercall_us'].get('host_op', 0.0) / nping:.2f})")

    print()
    print("TLB shootdown (HostTlbFlush::flush_frames)   1 vCPU       2 vCPUs   (median run)")
    for kind, label in (("shoot1", "1 frame"), ("shootN", f"{batch} frames")):
        cells = []
        for v in (1, 2):
            per_run = []
            for r in range(1, reps + 1):
                h = load(f"{tag}-{kind}-v{v}-{r}")[0]["host_invalidate"]
                n = max(h["flushes"], 1)
                per_run.append((h["flush_ns"] / 1000 / n, h["mprotect_calls"] / n, h["memslot_bounces"], h["frames"] / n))
            cells.append(sorted(per_run)[reps // 2])
            fig[f"shootdown, {label}, {v} vCPU (us/call)"] = cells[-1][0]
        print(f"  {label:<12} us per call          {cells[0][0]:>9.1f}     {cells[1][0]:>9.1f}")
        print(f"  {'':<12} us per frame         {cells[0][0] / cells[0][3]:>9.2f}     {cells[1][0] / cells[1][3]:>9.2f}")
        print(f"  {'':<12} mprotect pairs/call  {cells[0][1]:>9.2f}     {cells[1][1]:>9.2f}"
              f"   (memslot bounces: {cells[0][2]}, {cells[1][2]})")
    print()
    return fig

figs = {tag: figures(tag) for tag in tags}
if "base" in figs:
    print("Base and this tree, same run (medians; ratio = this / base, above 1 is slower)")
    print(f"  {'figure':<44} {'base':>10} {'this':>10} {'ratio':>7}")
    for name, b in figs["base"].items():
        t = figs["this"][name]
        print(f"  {name:<44} {b:>10.3f} {t:>10.3f} {t / b if b else float('nan'):>7.3f}")
PY
