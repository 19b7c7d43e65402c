#!/usr/bin/env bash
# Before/after for the hot paths: the fault path (`mmu_fault/{cold,warm}`),
# the rmap zap (`mmu_zap/{rmap,rmap_mmu_only}`)
# and notifier dispatch (`dispatch/{0,1,4}_notifiers/...` and
# notifier_dispatch's interleaved table), this tree against git revision
# BASE, both bench binaries run alternately (base, this, this, base, ...)
# so both see the same machine load. Prints min / median over the rounds
# of each side and their ratio (this / base: below 1 is faster).
#
#   BASE=ef6ed2f scripts/bench_ab.sh        # ROUNDS=6 by default
#   BASE=main ROUNDS=10 scripts/bench_ab.sh
#   BENCH_CODE=base BASE=... scripts/bench_ab.sh   # BASE's benches, not ours
#
# BASE is exported with `git archive` into target/bench-ab/base and built
# there; this tree's benches build into the usual target directory.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:?set BASE to the git revision to compare against}
ROUNDS=${ROUNDS:-6}
OUT=target/bench-ab
MMU_FILTER='^mmu_(fault/(cold|warm)|zap/(rmap|rmap_mmu_only))/1000$'
DISPATCH_FILTER='^dispatch/[014]_notifiers/(invalidate_range_start_end|change_pte|clear_young)$'
CRITERION=(--warm-up-time 0.5 --measurement-time 1 --noplot)

# The bench executables cargo builds for `dir` (target dir `target`).
bench_bins() {
    local dir=$1 target=$2
    (cd "$dir" && CARGO_TARGET_DIR=$target cargo bench --bench mmu --bench notifier_dispatch \
        --no-run --message-format=json 2>/dev/null) |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])'
}

rm -rf "$OUT/base" && mkdir -p "$OUT/base" "$OUT/logs"
git archive "$BASE" | tar -x -C "$OUT/base"
# The same benchmark code against both libraries (BENCH_CODE=base keeps
# BASE's own): a change of the harness alone moves these figures by a few
# percent.
if [[ ${BENCH_CODE:-this} == this ]]; then
    cp benches/mmu.rs benches/notifier_dispatch.rs "$OUT/base/benches/"
fi
echo "building $BASE and this tree's benches..." >&2
declare -A BIN
while read -r name exe; do BIN[base_$name]=$exe; done < <(bench_bins "$OUT/base" "$PWD/$OUT/base-target")
while read -r name exe; do BIN[this_$name]=$exe; done < <(bench_bins . "$PWD/target")
for k in base_mmu base_notifier_dispatch this_mmu this_notifier_dispatch; do
    [[ -n ${BIN[$k]:-} ]] || { echo "bench_ab: no executable for $k" >&2; exit 1; }
done

rm -f "$OUT"/logs/*.log
for r in $(seq "$ROUNDS"); do
    # Which side goes first alternates too, so that neither always runs
    # right after the other's benchmarks.
    if ((r % 2)); then order="base this"; else order="this base"; fi
    for side in $order; do
        echo "round $r/$ROUNDS: $side" >&2
        "${BIN[${side}_mmu]}" --bench "$MMU_FILTER" "${CRITERION[@]}" \
            >>"$OUT/logs/$side.log" 2>/dev/null
        "${BIN[${side}_notifier_dispatch]}" --bench "$DISPATCH_FILTER" "${CRITERION[@]}" \
            >>"$OUT/logs/$side.log" 2>/dev/null
    done
done

python3 - "$OUT/logs/base.log" "$OUT/logs/this.log" "$BASE" "$ROUNDS" <<'EOF'
import re, statistics, sys

UNITS = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6}

def parse(path):
    """Benchmark -> list of ns figures: criterion's point estimate per run,
    and the interleaved table's per-repetition minimum."""
    out, name = {}, None
    for line in open(path, encoding="utf-8"):
        if line and not line[0].isspace() and not line.startswith(("|", "Benchmarking", "Interleaved", "Found", "Gnuplot", "  ")):
            head = line.split()[0] if line.split() else ""
            if "/" in head:
                name = head
        m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m and name:
            out.setdefault(name, []).append(float(m.group(1)) * UNITS[m.group(2)])
            name = None
        m = re.match(r"\| (\w+) \| ([\d.]+) / [\d.]+ \| ([\d.]+) / [\d.]+ \| ([\d.]+) / [\d.]+ \|", line)
        if m:
            for n, v in zip((0, 1, 4), m.groups()[1:]):
                out.setdefault(f"interleaved {n}/{m.group(1)} (min)", []).append(float(v))
    return out

base, this = parse(sys.argv[1]), parse(sys.argv[2])
print(f"\nthis tree / {sys.argv[3]}, {sys.argv[4]} alternating rounds, ns (min / median over rounds):\n")
print("| benchmark | base | this | ratio (min / median) |")
print("| --- | ---: | ---: | ---: |")
for k in sorted(set(base) & set(this)):
    b, t = base[k], this[k]
    bm, bd, tm, td = min(b), statistics.median(b), min(t), statistics.median(t)
    print(f"| `{k}` | {bm:.1f} / {bd:.1f} | {tm:.1f} / {td:.1f} | {tm / bm:.2f} / {td / bd:.2f} |")
missing = sorted(set(base) ^ set(this))
if missing:
    print("\nonly one side has: " + ", ".join(missing))
EOF
