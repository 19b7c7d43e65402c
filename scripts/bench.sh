#!/usr/bin/env bash
# Issue 5's figures in one command: first-touch and re-touch cost per page,
# shadow vs kvm paging; the shadow fault round trip broken down; the cost of
# a TLB shootdown (HostTlbFlush::flush_frames) with 1 and 2 vCPUs; the
# hypercall round trip (PING). Then issue 12's targets: first touch and
# re-touch in both modes, in the same run, over
#   (a) 64 KiB host folios (--host-mthp 64K) and --prefetch 16, through
#       4 KiB guest pages (touch pt4k=1): shadow within 2.5x kvm;
#   (b) THP (--host-thp always, which also gives kvm mode's guest RAM
#       MADV_HUGEPAGE) and the boot map's 2 MiB guest pages: shadow <= kvm;
# re-touch equal within 10%; the memory cost of fault-around (host pages
# populated per page touched, dense and every 16th page) beside it, and
# POPULATE (touch populate=1) reported on its own.
#
#   scripts/bench.sh            # PAGES=2048 REPS=3 by default
#   PAGES=4096 REPS=5 scripts/bench.sh
#   SECTIONS=targets scripts/bench.sh   # only issue 12's targets (or: issue5)
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
# Issue 12's targets run only for a binary that has them (--host-mthp and
# touch's pt4k=1); the comparison covers the figures both have.
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
SECTIONS=${SECTIONS:-all}               # all, issue5 or targets
TARGET_PAGES=${TARGET_PAGES:-$PAGES}    # issue 12: pages touched densely
SPARSE_PAGES=${SPARSE_PAGES:-512}       # ... and every SPARSE_STRIDE-th page
SPARSE_STRIDE=${SPARSE_STRIDE:-16}
case $SECTIONS in all | issue5 | targets) ;; *) echo "bench: SECTIONS is all, issue5 or targets" >&2; exit 2 ;; esac

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

# Issue 12's configurations: name, shadow-mode options, kvm-mode options,
# guest words. The kvm-mode host is the real one: its THP and mTHP are what
# sysfs says (printed below); --host-thp always gives guest RAM
# MADV_HUGEPAGE there, --host-mthp has no kvm-mode meaning.
# The buffer starts on a 2 MiB boundary (align=2M): shadow mode mlocks the
# image, which splits its VMA, so the rest of the image's 2 MiB can never
# be a huge page there (docs/PERFORMANCE.md has the unaligned figure).
CONFIGS=(
    "a|--host-mthp 64K --prefetch 16|--host-thp never|pt4k=1 align=2M"
    "b|--host-thp always|--host-thp always|pt4k=0 align=2M"
)
# The machine is itself a VM: memory its kernel has never handed out before
# is backed by the outer host only on first touch, and a huge page there
# costs ~6 ms to populate instead of ~0.3 ms. Whichever mode's run happens
# to get such memory pays it (the order of runs decided it). So before each
# issue-12 run, both modes alike, 256 MiB are populated with huge pages and
# freed again, leaving backed memory at the head of the free lists.
warm() {
    python3 -c '
import ctypes
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
n = 256 << 20
a = libc.mmap(None, n, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
libc.madvise(a, n, 14)                  # MADV_HUGEPAGE
libc.madvise(a, n, 23)                  # MADV_POPULATE_WRITE
libc.munmap(a, n)
'
}
has_targets() {
    "$1" run --help 2>/dev/null | grep -q -- --host-mthp &&
        "$1" guests 2>/dev/null | grep -q pt4k
}
sysfs() { cat "/sys/kernel/mm/transparent_hugepage/$1" 2>/dev/null || echo "?"; }
target_tags=()
for b in "${bins[@]}"; do
    if [ "$SECTIONS" != issue5 ] && has_targets "${b#*=}"; then
        target_tags+=("${b%%=*}")
    elif [ "$SECTIONS" != issue5 ]; then
        echo "bench: ${b%%=*} has no issue-12 options: its targets are left out" >&2
    fi
done

echo "bench: $REPS reps of $PAGES pages per mode; shootdowns with 1 and 2 vCPUs ($SECTIONS)" >&2
for r in $(seq "$REPS"); do
    for b in "${bins[@]}"; do
        tag=${b%%=*}
        bin=${b#*=}
        if [ "$SECTIONS" != targets ]; then
            run "$bin" "$tag-shadow-$r" --paging shadow -- "pages=$PAGES"
            run "$bin" "$tag-kvm-$r" --paging kvm -- "pages=$PAGES"
            for v in 1 2; do
                run "$bin" "$tag-shoot1-v$v-$r" --paging shadow --vcpus "$v" -- "pages=$SHOOT_PAGES_1" chunk=1
                run "$bin" "$tag-shootN-v$v-$r" --paging shadow --vcpus "$v" -- "pages=$SHOOT_PAGES_N" "chunk=$SHOOT_BATCH"
            done
        fi
        [[ " ${target_tags[*]} " == *" $tag "* ]] || continue
        for c in "${CONFIGS[@]}"; do
            IFS='|' read -r name sopts kopts words <<<"$c"
            # shellcheck disable=SC2086 # the options are words
            {
                # Odd reps run shadow mode first, even reps kvm mode.
                modes=(shadow kvm)
                [ $((r % 2)) -eq 0 ] && modes=(kvm shadow)
                for pop in "" populate=1; do
                    for m in "${modes[@]}"; do
                        opts=$sopts
                        [ "$m" = kvm ] && opts=$kopts
                        warm
                        run "$bin" "$tag-$name-$m${pop:+pop}-$r" --paging "$m" $opts -- \
                            "pages=$TARGET_PAGES" $words $pop
                    done
                done
                warm
                run "$bin" "$tag-$name-sparse-$r" --paging shadow $sopts -- \
                    "pages=$SPARSE_PAGES" "stride=$SPARSE_STRIDE" $words
                # The guest's own pages (image, stacks, tables): subtracted.
                run "$bin" "$tag-$name-base-$r" --paging shadow $sopts -- pages=1 $words
            }
        done
    done
done

{
    echo "bench: machine: $(nproc) CPUs, $(awk -F: '/^model name/ { sub(/^ /, "", $2); print $2; exit }' /proc/cpuinfo)," \
        "load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "bench: real host (kvm mode): THP $(sysfs enabled), 64 KiB mTHP $(sysfs hugepages-64kB/enabled)"
    for c in "${CONFIGS[@]}"; do
        IFS='|' read -r name sopts kopts words <<<"$c"
        echo "bench: ($name) shadow: $sopts, $words; kvm: $kopts, $words"
    done
} >"$out/settings"
[ ${#target_tags[@]} -gt 0 ] && cat "$out/settings"

python3 - "$out" "$REPS" "$TSC_MHZ" "$SHOOT_BATCH" "$SECTIONS" "$TARGET_PAGES" "$SPARSE_PAGES" \
    "${target_tags[*]:-}" "${bins[@]%%=*}" <<'PY'
import json, re, statistics, sys

out, reps, mhz, batch, sections = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tpages, spages = int(sys.argv[6]), int(sys.argv[7])
target_tags = sys.argv[8].split()
tags = sys.argv[9:]

def load(name):
    text = open(f"{out}/{name}.json").read()
    stats, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    guest = open(f"{out}/{name}.out").read()
    per = {k: int(v) for k, v in re.findall(r"touch: (first|retouch) \d+ pages \d+ cycles (\d+) cycles/page", guest)}
    per.update((k, int(v)) for k, v in re.findall(r"touch: (ping) \d+ calls (\d+) cycles/call", guest))
    per.update((k, int(v)) for k, v in re.findall(r"touch: (populate) \d+ pages \d+ cycles (\d+) cycles/page", guest))
    return stats, per

def us(cycles):
    return cycles / mhz

med = statistics.median

def host_pages(st):
    """Host pages the mm filled with zeros: one per small fault, a folio's
    worth per large one (pgfault_zero counts a folio once)."""
    extra = sum(m["anon_fault_alloc"] * (m["size_kb"] // 4 - 1) for m in st.get("host_mthp", []))
    return st["host_mm"]["pgfault_zero"] + extra

def targets(tag):
    """Issue 12's targets for one binary: prints the table, returns figures."""
    fig = {}
    print(f"[{tag}] issue 12 targets: {tpages} pages, medians of {reps} runs, TSC {mhz:.0f} MHz")
    print()
    print("  config                      first touch (cyc/page)        re-touch (cyc/page)     faults/page  host pages/page touched")
    print("                              shadow      kvm    ratio      shadow   kvm   ratio     shadow       dense   every 16th")
    verdicts = []
    for name, limit, label in (("a", 2.5, "(a) 64K mTHP, prefetch 16, 4K"), ("b", 1.0, "(b) THP, 2 MiB guest pages")):
        runs = {m: [load(f"{tag}-{name}-{m}-{r}") for r in range(1, reps + 1)]
                for m in ("shadow", "kvm", "shadowpop", "kvmpop", "sparse", "base")}
        c = {m: {k: med(p[k] for _, p in runs[m]) for k in ("first", "retouch")}
             for m in ("shadow", "kvm", "shadowpop", "kvmpop")}
        base_pf = med(s["mmu"]["pf_fixed"] for s, _ in runs["base"])
        faults = med(s["mmu"]["pf_fixed"] for s, _ in runs["shadow"]) - base_pf
        base_pages = med(host_pages(s) for s, _ in runs["base"])
        dense = (med(host_pages(s) for s, _ in runs["shadow"]) - base_pages) / (tpages - 1)
        sparse = (med(host_pages(s) for s, _ in runs["sparse"]) - base_pages) / (spages - 1)
        first = c["shadow"]["first"] / c["kvm"]["first"]
        retouch = c["shadow"]["retouch"] / c["kvm"]["retouch"]
        print(f"  {label:<27} {c['shadow']['first']:>7.0f} {c['kvm']['first']:>8.0f} {first:>7.2f}x"
              f"   {c['shadow']['retouch']:>7.0f} {c['kvm']['retouch']:>5.0f} {retouch:>6.2f}x"
              f"   {faults / tpages:>8.4f}   {dense:>9.2f}   {sparse:>9.2f}")
        verdicts.append(f"  ({name}) first touch shadow/kvm {first:.2f}x, target <= {limit}x: "
                        f"{'met' if first <= limit else f'MISSED by {first / limit:.2f}x'}; "
                        f"re-touch {retouch:.2f}x, target 0.90-1.10: {'met' if 0.9 <= retouch <= 1.1 else 'MISSED'}")
        fig[f"({name}) first touch, shadow (us/page)"] = us(c["shadow"]["first"])
        fig[f"({name}) first touch, kvm (us/page)"] = us(c["kvm"]["first"])
        fig[f"({name}) first touch shadow/kvm"] = first
        fig[f"({name}) re-touch shadow/kvm"] = retouch
        fig[f"({name}) shadow faults per page"] = faults / tpages
        # POPULATE, apart: its own cost, then the first touch it leaves.
        pop = {m: med(p.get("populate", 0) for _, p in runs[m]) for m in ("shadowpop", "kvmpop")}
        st, _ = sorted(runs["shadowpop"], key=lambda r: r[1]["first"])[reps // 2]
        mm = st["mmu"]
        verdicts.append(f"      POPULATE: {pop['shadowpop']:.0f} / {pop['kvmpop']:.0f} cyc/page (shadow / kvm), "
                        f"then first touch {c['shadowpop']['first']:.0f} / {c['kvmpop']['first']:.0f} cyc/page "
                        f"({c['shadowpop']['first'] / c['kvmpop']['first']:.2f}x); "
                        f"{mm['prefault_pages']} pages pre-faulted, pf_fixed {mm['pf_fixed']} "
                        f"({base_pf:.0f} in the 1-page run); "
                        f"host populate_fault {st['host_mm']['populate_fault']}, populate_present {st['host_mm']['populate_present']}")
        fig[f"({name}) POPULATE, shadow (us/page)"] = us(pop["shadowpop"])
        fig[f"({name}) POPULATE, kvm (us/page)"] = us(pop["kvmpop"])
        fig[f"({name}) first touch after POPULATE, shadow (us/page)"] = us(c["shadowpop"]["first"])
        fig[f"({name}) first touch after POPULATE, kvm (us/page)"] = us(c["kvmpop"]["first"])
    print()
    print("\n".join(verdicts))
    print()
    return fig

def figures(tag):
    """Every figure of one binary, as {name: value in us}, and prints its tables."""
    if sections == "targets":
        return targets(tag) if tag in target_tags else {}
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
    if tag in target_tags:
        fig.update(targets(tag))
    return fig

figs = {tag: figures(tag) for tag in tags}
if "base" in figs:
    print("Base and this tree, same run (medians; ratio = this / base, above 1 is slower)")
    print(f"  {'figure':<52} {'base':>10} {'this':>10} {'ratio':>7}")
    for name, b in figs["base"].items():
        if name not in figs["this"]:
            continue
        t = figs["this"][name]
        print(f"  {name:<52} {b:>10.3f} {t:>10.3f} {t / b if b else float('nan'):>7.3f}")
PY
